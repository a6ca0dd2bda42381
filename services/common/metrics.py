"""Prometheus metrics every program exports, and the /metrics endpoint.

Process RSS and CPU come from prometheus-client's default process collector
(`process_resident_memory_bytes`, `process_cpu_seconds_total`)."""

from __future__ import annotations

import logging
import os

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# Buckets span a 1 ms health probe to a multi-minute render.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
)

REQUESTS = Counter(
    "talker_grpc_requests_total",
    "gRPC calls finished, by method and status code.",
    ["method", "code"],
)
REQUEST_SECONDS = Histogram(
    "talker_grpc_request_duration_seconds",
    "Wall time of a gRPC call from its start to its last message.",
    ["method"],
    buckets=LATENCY_BUCKETS,
)
IN_FLIGHT = Gauge("talker_grpc_in_flight", "gRPC calls being served now.", ["method"])
ERRORS = Counter(
    "talker_grpc_errors_total", "gRPC calls that ended with an error, by code.", ["method", "code"]
)
READY = Gauge("talker_ready", "1 when the program reports SERVING, else 0.")
MEMORY_LIMIT = Gauge(
    "talker_memory_limit_bytes", "The memory ceiling (RSS) of this program; 0 = none."
)
QUEUE_DEPTH = Gauge("talker_queue_depth", "Work items waiting for a model, by queue.", ["queue"])


def start_metrics_endpoint(host: str, port: int) -> int:
    """Serve /metrics on host:port in a background thread; returns the bound port."""
    if port <= 0:  # 0 (and a worker's -1): no endpoint here
        return 0
    server, _thread = start_http_server(port, addr=host)
    bound = int(server.server_port)
    log.info("metrics endpoint listening", extra={"address": f"http://{host}:{bound}/metrics"})
    return bound


def process_rss_bytes() -> int:
    """Resident memory of this process (Linux /proc)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
