"""Probe a program through the standard grpc.health.v1 protocol (the watchdog,
the readiness wait, the tests and the benches all ask this way)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def probe(address: str, timeout_s: float = 1.0, service: str = "") -> str:
    """The health status name at `address` ("SERVING", "NOT_SERVING", ...) or
    the gRPC error code name when the probe itself failed ("UNAVAILABLE")."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
