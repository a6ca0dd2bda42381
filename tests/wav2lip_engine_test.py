"""The Wav2Lip backend: a randomly initialised network saved the way the
original checkpoints are (state_dict under "state_dict", DataParallel's
"module." prefixes), loaded by setting, and rendered through the real
AnimateService: frames are pasted only inside the face crop."""

from __future__ import annotations

import io
from pathlib import Path

import av
import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from services.animate.config import AnimateSettings
from services.animate.server import build_program
from services.animate.wav2lip import FACE_PADDING, Wav2Lip
from talker.v1 import animate_pb2, animate_pb2_grpc, audio_pb2
from tests.processes import InProcessServer
from tests.speech import piper_speech, to_wav


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    state = {f"module.{k}": v for k, v in Wav2Lip().state_dict().items()}
    path = tmp_path_factory.mktemp("wav2lip") / "wav2lip.pth"
    torch.save({"state_dict": state, "global_step": 0}, path)
    return path


def test_wav2lip_checkpoint_renders_inside_the_face_only(checkpoint: Path, tmp_path: Path) -> None:
    settings = AnimateSettings(
        port=0, metrics_port=0, avatars_dir=tmp_path, wav2lip_checkpoint=str(checkpoint)
    )
    server = InProcessServer(build_program(settings))
    server.start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = animate_pb2_grpc.AnimateServiceStub(channel)
            portrait = data.astronaut()
            buffer = io.BytesIO()
            Image.fromarray(portrait).save(buffer, format="PNG")
            avatar = stub.CreateAvatar(
                animate_pb2.CreateAvatarRequest(image=buffer.getvalue())
            ).avatar
            speech = piper_speech("Hello from the network.")
            request = animate_pb2.RenderRequest(
                avatar_id=avatar.avatar_id,
                audio=to_wav(speech, 16_000),
                format=audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_WAV),
            )
            responses = list(stub.Render(request, timeout=300))
    finally:
        server.stop()
    mp4 = b"".join(r.chunk.content for r in responses if r.HasField("chunk"))
    result = responses[-1].result
    assert result.frame_count == int(np.ceil(len(speech) / 16_000 * 25))
    with av.open(io.BytesIO(mp4)) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
    box = avatar.face_box
    top, bottom, left, right = FACE_PADDING
    y0, y1 = box.y - top, box.y + box.height + bottom
    x0, x1 = box.x - left, box.x + box.width + right
    difference = np.abs(frame.astype(int) - portrait.astype(int)).mean(axis=2)
    inside = difference[y0:y1, x0:x1].mean()
    outside = np.concatenate([difference[: y0 - 8].ravel(), difference[y1 + 8 :].ravel()]).mean()
    # A random network paints noise into the crop; everything else is the portrait (plus H.264 loss).
    assert inside > 20 and outside < 6, (inside, outside)
