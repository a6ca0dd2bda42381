"""The Wav2Lip network (Prajwal et al., 2020) in torch, with its face crop /
paste pipeline, used when `TALKER_ANIMATE_WAV2LIP_CHECKPOINT` points at
wav2lip.pth or wav2lip_gan.pth. No checkpoint ships: their license is
non-commercial. Layer names follow the original code, so its checkpoints load
as they are ("module." prefixes from DataParallel are stripped)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from scipy.signal import lfilter
from torch import nn

from services.common.errors import PreconditionFailed

SAMPLE_RATE_HZ = 16_000
FACE_SIZE = 96
MEL_STEP = 16  # mel frames the network hears per video frame (200 ms)
MEL_PER_SECOND = 80  # hop 200 at 16 kHz
FACE_PADDING = (0, 10, 0, 0)
BATCH = 32  # frames per forward pass: bounded memory on long renders  # top, bottom, left, right: the chin needs room


class Conv2d(nn.Module):
    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int,
        stride: int | tuple[int, int],
        padding: int,
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.Conv2d(cin, cout, kernel_size, stride, padding), nn.BatchNorm2d(cout)
        )
        self.act = nn.ReLU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return self.act(out)


class Conv2dTranspose(nn.Module):
    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int,
        stride: int,
        padding: int,
        output_padding: int = 0,
    ) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ConvTranspose2d(cin, cout, kernel_size, stride, padding, output_padding),
            nn.BatchNorm2d(cout),
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv_block(x))


def _residuals(channels: int, count: int) -> list[nn.Module]:
    return [Conv2d(channels, channels, 3, 1, 1, residual=True) for _ in range(count)]


class Wav2Lip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.face_encoder_blocks = nn.ModuleList(
            [
                nn.Sequential(Conv2d(6, 16, 7, 1, 3)),
                nn.Sequential(Conv2d(16, 32, 3, 2, 1), *_residuals(32, 2)),
                nn.Sequential(Conv2d(32, 64, 3, 2, 1), *_residuals(64, 3)),
                nn.Sequential(Conv2d(64, 128, 3, 2, 1), *_residuals(128, 2)),
                nn.Sequential(Conv2d(128, 256, 3, 2, 1), *_residuals(256, 2)),
                nn.Sequential(Conv2d(256, 512, 3, 2, 1), *_residuals(512, 1)),
                nn.Sequential(Conv2d(512, 512, 3, 1, 0), Conv2d(512, 512, 1, 1, 0)),
            ]
        )
        self.audio_encoder = nn.Sequential(
            Conv2d(1, 32, 3, 1, 1),
            *_residuals(32, 2),
            Conv2d(32, 64, 3, (3, 1), 1),
            *_residuals(64, 2),
            Conv2d(64, 128, 3, 3, 1),
            *_residuals(128, 2),
            Conv2d(128, 256, 3, (3, 2), 1),
            *_residuals(256, 1),
            Conv2d(256, 512, 3, 1, 0),
            Conv2d(512, 512, 1, 1, 0),
        )
        self.face_decoder_blocks = nn.ModuleList(
            [
                nn.Sequential(Conv2d(512, 512, 1, 1, 0)),
                nn.Sequential(Conv2dTranspose(1024, 512, 3, 1, 0), *_residuals(512, 1)),
                nn.Sequential(Conv2dTranspose(1024, 512, 3, 2, 1, 1), *_residuals(512, 2)),
                nn.Sequential(Conv2dTranspose(768, 384, 3, 2, 1, 1), *_residuals(384, 2)),
                nn.Sequential(Conv2dTranspose(512, 256, 3, 2, 1, 1), *_residuals(256, 2)),
                nn.Sequential(Conv2dTranspose(320, 128, 3, 2, 1, 1), *_residuals(128, 2)),
                nn.Sequential(Conv2dTranspose(160, 64, 3, 2, 1, 1), *_residuals(64, 2)),
            ]
        )
        self.output_block = nn.Sequential(
            Conv2d(80, 32, 3, 1, 1), nn.Conv2d(32, 3, 1, 1, 0), nn.Sigmoid()
        )

    def forward(self, audio: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        """audio (B, 1, 80, 16) mel windows, faces (B, 6, 96, 96) in [0, 1] -> (B, 3, 96, 96)."""
        features = []
        x = faces
        for block in self.face_encoder_blocks:
            x = block(x)
            features.append(x)
        x = self.audio_encoder(audio)
        for block in self.face_decoder_blocks:
            x = torch.cat((block(x), features.pop()), dim=1)
        return self.output_block(x)


def load_wav2lip(path: Path) -> Wav2Lip:
    if not path.is_file():
        raise PreconditionFailed(f"TALKER_ANIMATE_WAV2LIP_CHECKPOINT={path} does not exist.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    model = Wav2Lip()
    try:
        model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    except RuntimeError as error:
        raise PreconditionFailed(
            f"{path} is not a Wav2Lip checkpoint: {str(error)[:200]}"
        ) from None
    return model.eval()


_MEL_BASIS: np.ndarray | None = None


def melspectrogram(audio: np.ndarray) -> np.ndarray:
    """Wav2Lip's own mel: 16 kHz, n_fft 800, hop 200, 80 mels 55-7600 Hz,
    pre-emphasis 0.97, dB normalised symmetric to [-4, 4]. (80, frames)."""
    global _MEL_BASIS
    import librosa

    if _MEL_BASIS is None:
        _MEL_BASIS = librosa.filters.mel(
            sr=SAMPLE_RATE_HZ, n_fft=800, n_mels=80, fmin=55, fmax=7600
        )
    emphasised = lfilter([1, -0.97], [1], audio)
    spectrum = np.abs(librosa.stft(y=emphasised, n_fft=800, hop_length=200, win_length=800))
    level = 20 * np.log10(np.maximum(1e-5, _MEL_BASIS @ spectrum)) - 20
    return np.clip(8 * ((level + 100) / 100) - 4, -4, 4).astype(np.float32)


class Wav2LipAnimator:
    """Same interface as PortraitAnimator: audio in, frames out."""

    def __init__(
        self, model: Wav2Lip, portrait: np.ndarray, face_box: tuple[int, int, int, int], fps: float
    ) -> None:
        self.model = model
        self.portrait = portrait
        self.fps = fps
        height, width = portrait.shape[:2]
        x, y, w, h = face_box
        top, bottom, left, right = FACE_PADDING
        self.crop = (
            max(0, y - top),
            min(height, y + h + bottom),
            max(0, x - left),
            min(width, x + w + right),
        )
        y0, y1, x0, x1 = self.crop
        face = cv2.resize(portrait[y0:y1, x0:x1], (FACE_SIZE, FACE_SIZE)).astype(np.float32) / 255.0
        masked = face.copy()
        masked[FACE_SIZE // 2 :] = 0  # the network paints the lower half
        self._faces = torch.from_numpy(np.concatenate([masked, face], axis=2).transpose(2, 0, 1))
        self._audio = np.zeros(0, dtype=np.float32)
        self.frame_index = 0

    def add_spans(self, spans: list[Any]) -> None:
        """Wav2Lip reads the lips off the audio itself: phoneme timings are not used."""

    def frames_for(
        self, audio: np.ndarray, final: bool = False
    ) -> Iterator[tuple[int, np.ndarray, float]]:
        self._audio = np.concatenate([self._audio, audio])
        duration_s = len(self._audio) / SAMPLE_RATE_HZ
        total = int(np.ceil(duration_s * self.fps)) if final else int(duration_s * self.fps)
        if total <= self.frame_index:
            return
        # The window of the last frame reaches 200 ms ahead; pad with silence at the end.
        padded = np.concatenate([self._audio, np.zeros(SAMPLE_RATE_HZ // 4, np.float32)])
        mel = melspectrogram(padded)
        windows = []
        for index in range(self.frame_index, total):
            start = min(int(MEL_PER_SECOND * index / self.fps), mel.shape[1] - MEL_STEP)
            windows.append(mel[:, start : start + MEL_STEP])
        y0, y1, x0, x1 = self.crop
        for batch_start in range(0, len(windows), BATCH):
            batch = windows[batch_start : batch_start + BATCH]
            with torch.inference_mode():
                out = self.model(
                    torch.from_numpy(np.stack(batch)[:, None]),
                    self._faces[None].expand(len(batch), -1, -1, -1),
                )
            for face in (out.numpy().transpose(0, 2, 3, 1) * 255).astype(np.uint8):
                frame = self.portrait.copy()
                frame[y0:y1, x0:x1] = cv2.resize(face, (x1 - x0, y1 - y0))
                yield self.frame_index, frame, 0.0
                self.frame_index += 1
