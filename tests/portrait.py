"""The test portrait (skimage's astronaut, the same as the bundled sample) as
an avatar on a running AnimateService."""

from __future__ import annotations

import grpc

from gateway.samples import portrait
from talker.v1 import animate_pb2, animate_pb2_grpc


def create_astronaut(animate_address: str, name: str = "astronaut") -> str:
    """Creates the avatar and returns its id."""
    with grpc.insecure_channel(animate_address) as channel:
        stub = animate_pb2_grpc.AnimateServiceStub(channel)
        request = animate_pb2.CreateAvatarRequest(image=portrait(), display_name=name)
        return str(stub.CreateAvatar(request, timeout=120).avatar.avatar_id)
