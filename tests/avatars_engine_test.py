"""Avatars: portrait checks on skimage's astronaut and on bad portraits made
from it, through the real AnimateService in-process; avatars persist."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from PIL import Image
from skimage import data

from services.animate.config import AnimateSettings
from services.animate.server import build_program
from talker.v1 import animate_pb2, animate_pb2_grpc
from tests.processes import InProcessServer

ASTRONAUT = data.astronaut()


def encode(rgb: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=fmt)
    return buffer.getvalue()


def turned_left(rgb: np.ndarray, squeeze: float = 0.5, nose_x: int = 222) -> np.ndarray:
    """The half of the face left of the nose squeezed: the face now looks turned."""
    height, width = rgb.shape[:2]
    xs = np.arange(width, dtype=np.float32)
    source = np.where(xs < nose_x, nose_x - (nose_x - xs) / squeeze, xs)
    map_x = np.tile(source, (height, 1)).astype(np.float32)
    map_y = np.tile(np.arange(height, dtype=np.float32)[:, None], (1, width))
    return cv2.remap(rgb, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


BAD_PORTRAITS = {
    "rotated on its side": (np.ascontiguousarray(np.rot90(ASTRONAUT)), "No face was found"),
    "turned to a profile": (turned_left(ASTRONAUT), "The head is turned"),
    "blacked out": (np.zeros_like(ASTRONAUT), "No face was found"),
    "very dark": ((ASTRONAUT * 0.12).astype(np.uint8), "too dark"),
    "shrunk to 64x64": (cv2.resize(ASTRONAUT, (64, 64)), "at least 256 px"),
    "two faces side by side": (
        np.concatenate([ASTRONAUT[:, 64:448]] * 2, axis=1),
        "2 faces of similar size",
    ),
}


@pytest.fixture(scope="module")
def avatars_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("avatars")


@pytest.fixture(scope="module")
def animate(avatars_dir: Path) -> Iterator[animate_pb2_grpc.AnimateServiceStub]:
    server = InProcessServer(
        build_program(AnimateSettings(port=0, metrics_port=0, avatars_dir=avatars_dir))
    )
    server.start()
    with grpc.insecure_channel(server.address) as channel:
        yield animate_pb2_grpc.AnimateServiceStub(channel)
    server.stop()


def checks_of(avatar: animate_pb2.Avatar) -> dict[str, animate_pb2.PortraitCheck]:
    return {c.name: c for c in avatar.checks}


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_astronaut_passes_every_check(animate, fmt: str) -> None:
    request = animate_pb2.CreateAvatarRequest(
        image=encode(ASTRONAUT, fmt), display_name="Astronaut", validate_only=True
    )
    avatar = animate.CreateAvatar(request).avatar
    checks = checks_of(avatar)
    assert {
        "resolution",
        "face",
        "yaw",
        "pitch",
        "roll",
        "exposure",
        "even_light",
        "background",
    } <= set(checks)
    assert all(c.severity != animate_pb2.CHECK_SEVERITY_ERROR for c in avatar.checks), avatar.checks
    assert checks["yaw"].measured_value < 15 and checks["face"].passed
    box = avatar.face_box
    assert (
        150 < box.x < 200 and 50 < box.y < 100 and 80 < box.width < 110
    )  # dlib finds her, not the flag


@pytest.mark.parametrize("case", sorted(BAD_PORTRAITS))
def test_bad_portrait_is_refused_with_the_right_reason(animate, case: str) -> None:
    rgb, expected = BAD_PORTRAITS[case]
    with pytest.raises(grpc.RpcError) as raised:
        animate.CreateAvatar(animate_pb2.CreateAvatarRequest(image=encode(rgb), display_name=case))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in raised.value.details(), raised.value.details()
    # validate_only reports the same check as failed, without refusing.
    report = animate.CreateAvatar(
        animate_pb2.CreateAvatarRequest(image=encode(rgb), validate_only=True)
    ).avatar
    assert any(
        c.severity == animate_pb2.CHECK_SEVERITY_ERROR and expected in c.message
        for c in report.checks
    )


def test_not_an_image_and_unknown_ids_get_clear_errors(animate) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        animate.CreateAvatar(animate_pb2.CreateAvatarRequest(image=b"GIF89a not really"))
    assert (
        raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "not a readable image" in raised.value.details()
    )
    with pytest.raises(grpc.RpcError) as raised:
        animate.GetAvatar(animate_pb2.GetAvatarRequest(avatar_id="avatar-nope"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as raised:
        animate.DeleteAvatar(animate_pb2.DeleteAvatarRequest(avatar_id="../../etc"))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_avatars_persist_across_a_restart_and_can_be_deleted(animate, avatars_dir: Path) -> None:
    avatar = animate.CreateAvatar(
        animate_pb2.CreateAvatarRequest(image=encode(ASTRONAUT), display_name="Eileen")
    ).avatar
    assert avatar.avatar_id.startswith("avatar-")
    stored = avatars_dir / avatar.avatar_id
    assert (stored / "portrait.png").is_file() and (stored / "avatar.json").is_file()
    again = InProcessServer(
        build_program(AnimateSettings(port=0, metrics_port=0, avatars_dir=avatars_dir))
    )
    again.start()
    try:
        with grpc.insecure_channel(again.address) as channel:
            stub = animate_pb2_grpc.AnimateServiceStub(channel)
            listed = {
                a.avatar_id: a for a in stub.ListAvatars(animate_pb2.ListAvatarsRequest()).avatars
            }
            assert listed[avatar.avatar_id].display_name == "Eileen"
            assert listed[avatar.avatar_id].face_box == avatar.face_box
            stub.DeleteAvatar(animate_pb2.DeleteAvatarRequest(avatar_id=avatar.avatar_id))
    finally:
        again.stop()
    assert not stored.exists()
