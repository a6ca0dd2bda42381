"""Neural voice cloning with a Coqui XTTS model (coqui-tts, import name `TTS`)
loaded from a folder on disk: speaker conditioning computed once per voice and
kept beside its profile, speech streamed as XTTS makes it.

XTTS weights are not on PyPI (XTTS-v2 is under the CPML); the folder is a
setting. `TTS` and torch are imported only when a folder is configured:
importing TTS alone takes seconds, and the service starts without it."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import Histogram

from services.common.audio import resample
from services.common.errors import PreconditionFailed
from services.common.metrics import LATENCY_BUCKETS

log = logging.getLogger("talker.synthesize.coqui")

CHUNK_SECONDS = Histogram(
    "talker_synthesize_xtts_chunk_seconds",
    "Time XTTS takes to make one streamed chunk.",
    buckets=LATENCY_BUCKETS,
)

# What XTTS's loader reads from the folder (dvae.pth, mel_stats.pth and
# speakers_xtts.pth of XTTS-v2 are optional for inference).
REQUIRED_FILES = ("config.json", "model.pth", "vocab.json")
# XTTS computes speaker conditioning at 22.05 kHz (its mel front end's rate).
CONDITIONING_RATE_HZ = 22_050
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+")


@dataclass
class SpeakerConditioning:
    """What XTTS needs of a speaker: GPT conditioning latents and the decoder's
    speaker embedding, both torch tensors. Computed once from the reference."""

    gpt_cond_latent: Any
    speaker_embedding: Any
    model_fingerprint: str


class CoquiCloner:
    """One XTTS model. Blocking, plain Python; one inference at a time."""

    def __init__(self, model_dir: Path, stream_chunk_tokens: int = 20) -> None:
        self.model_dir = model_dir
        self.stream_chunk_tokens = stream_chunk_tokens
        self.model: Any = None
        self.config: Any = None
        self.fingerprint = ""
        self.sample_rate_hz = 24_000
        self.languages: list[str] = []
        # The GPT keeps the current prefix (the speaker latents and text) on the
        # module between generate steps, so two inferences must never interleave.
        self._lock = threading.Lock()

    def load(self) -> None:
        folder = self.model_dir
        missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
        if missing:
            raise PreconditionFailed(
                f"The Coqui model folder {str(folder)!r} lacks {', '.join(missing)}; it must "
                "hold an XTTS model (config.json, model.pth, vocab.json), e.g. XTTS-v2."
            )
        started = time.perf_counter()
        from TTS.tts.configs.xtts_config import XttsConfig
        from TTS.tts.models.xtts import Xtts

        _adapt_to_installed_transformers()
        config = XttsConfig()
        config.load_json(str(folder / "config.json"))
        if config.model != "xtts":
            raise PreconditionFailed(
                f"The Coqui model in {str(folder)!r} is a {config.model!r} model; only XTTS "
                "models (e.g. XTTS-v2) can clone voices here."
            )
        model = Xtts(config)
        model.load_checkpoint(config, checkpoint_dir=str(folder), eval=True)
        self.model, self.config = model, config
        self.sample_rate_hz = int(config.model_args.output_sample_rate)
        self.languages = list(config.languages)
        self.fingerprint = model_fingerprint(folder)
        log.info(
            "coqui model loaded",
            extra={
                "model_dir": str(folder),
                "languages": self.languages,
                "sample_rate_hz": self.sample_rate_hz,
                "load_s": round(time.perf_counter() - started, 3),
            },
        )

    def language_code(self, language: str) -> str:
        """The model's code for a voice language ("en_US" -> "en", "zh" -> "zh-cn")."""
        wanted = language.lower().replace("_", "-")
        primary = wanted.split("-")[0]
        for code in (wanted, primary, f"{primary}-cn"):
            if code in self.languages:
                return code
        raise PreconditionFailed(
            f"The cloning model does not speak {language or 'an unset language'!r}; it "
            f"speaks: {', '.join(self.languages)}. Set the voice's language to one of them."
        )

    def speaker_conditioning(self, audio: np.ndarray, rate_hz: int) -> SpeakerConditioning:
        """Conditioning of one reference recording (float32 mono).

        Computed from the decoded samples rather than through XTTS's
        `get_conditioning_latents(path)`, which reads files with torchaudio's
        torchcodec loader: no temp file, and no dependence on that loader."""
        import torch

        config = self.config
        samples = resample(audio.astype(np.float32), rate_hz, CONDITIONING_RATE_HZ)
        samples = samples[: CONDITIONING_RATE_HZ * int(config.max_ref_len)]
        if config.sound_norm_refs:
            samples = samples / (np.abs(samples).max() or 1.0) * 0.75
        tensor = torch.from_numpy(np.ascontiguousarray(samples))[None, :]
        with self._lock, torch.inference_mode():
            speaker_embedding = self.model.get_speaker_embedding(tensor, CONDITIONING_RATE_HZ)
            gpt_cond_latent = self.model.get_gpt_cond_latents(
                tensor,
                CONDITIONING_RATE_HZ,
                length=int(config.gpt_cond_len),
                chunk_length=int(config.gpt_cond_chunk_len),
            )
        return SpeakerConditioning(gpt_cond_latent, speaker_embedding, self.fingerprint)

    @staticmethod
    def save_conditioning(conditioning: SpeakerConditioning, path: Path) -> None:
        """Written to a temp name and renamed, like the profiles beside it."""
        import torch

        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        torch.save(
            {
                "gpt_cond_latent": conditioning.gpt_cond_latent.cpu(),
                "speaker_embedding": conditioning.speaker_embedding.cpu(),
                "model_fingerprint": conditioning.model_fingerprint,
            },
            partial,
        )
        partial.replace(path)

    @staticmethod
    def load_conditioning(path: Path) -> SpeakerConditioning:
        import torch

        stored = torch.load(path, map_location="cpu", weights_only=True)
        return SpeakerConditioning(
            stored["gpt_cond_latent"], stored["speaker_embedding"], stored["model_fingerprint"]
        )

    def synthesize(
        self,
        text: str,
        language: str,
        conditioning: SpeakerConditioning,
        speaking_rate: float = 1.0,
        stop: threading.Event | None = None,
    ) -> Iterator[tuple[np.ndarray, bool]]:
        """(float32 audio at `sample_rate_hz`, ends a sentence) as XTTS streams it,
        one sentence of the text after another. Blocking."""
        config = self.config
        code = self.language_code(language)
        limit = self.model.tokenizer.char_limits.get(code.split("-")[0], 250)
        with self._lock:
            for sentence in split_sentences(text, limit):
                chunks = self.model.inference_stream(
                    sentence,
                    code,
                    conditioning.gpt_cond_latent,
                    conditioning.speaker_embedding,
                    stream_chunk_size=self.stream_chunk_tokens,
                    temperature=config.temperature,
                    length_penalty=config.length_penalty,
                    repetition_penalty=config.repetition_penalty,
                    top_k=config.top_k,
                    top_p=config.top_p,
                    speed=speaking_rate,
                )
                try:
                    started = time.perf_counter()
                    for chunk in chunks:
                        CHUNK_SECONDS.observe(time.perf_counter() - started)
                        yield chunk.detach().cpu().numpy().astype(np.float32, copy=False), False
                        if stop is not None and stop.is_set():
                            return
                        started = time.perf_counter()
                finally:
                    chunks.close()  # frees the GPT's cache when the client went away
                yield np.zeros(0, np.float32), True


def split_sentences(text: str, limit: int) -> list[str]:
    """Sentences, each at most `limit` characters (XTTS's per-language limit):
    a longer one is cut at its last comma, or else its last space, before it."""
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(text.strip()):
        while len(sentence) > limit:
            head = sentence[:limit]
            cut = max(head.rfind(", "), head.rfind("; "))
            cut = cut + 1 if cut > limit // 3 else head.rfind(" ")
            if cut <= 0:
                cut = limit
            pieces.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if sentence:
            pieces.append(sentence)
    return pieces


def model_fingerprint(folder: Path) -> str:
    """Identifies a model, so conditioning made with another one is not reused."""
    digest = hashlib.sha256()
    for name in ("config.json", "vocab.json"):
        digest.update((folder / name).read_bytes())
    digest.update(str((folder / "model.pth").stat().st_size).encode())
    return digest.hexdigest()[:16]


# ---- compatibility shims --------------------------------------------------
# The one place where coqui-tts 0.28 is adapted to the libraries installed
# beside it. Each shim checks whether it is still needed, so an upgrade that
# fixes the cause turns it into a no-op.


def _adapt_to_installed_transformers() -> None:
    """transformers 5.x `generate()` passes the KV cache to the model as `cache=`
    (it was `past_key_values=`); XTTS's GPT2InferenceModel.forward still reads
    `past_key_values` and gets None, failing at the second token. The chat
    service needs transformers 5, so the model is adapted, not the library.
    (It then hands `past_key_values` on to GPT2Model, which transformers 5.24
    still accepts with a FutureWarning.)"""
    import inspect

    from TTS.tts.layers.xtts.gpt_inference import GPT2InferenceModel

    forward = GPT2InferenceModel.forward
    if "cache" in inspect.signature(forward).parameters or getattr(forward, "_talker_shim", False):
        return

    def forward_taking_cache(self: Any, *args: Any, cache: Any = None, **kwargs: Any) -> Any:
        if cache is not None:
            kwargs.setdefault("past_key_values", cache)
        return forward(self, *args, **kwargs)

    forward_taking_cache._talker_shim = True  # type: ignore[attr-defined]
    GPT2InferenceModel.forward = forward_taking_cache
