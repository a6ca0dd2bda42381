"""Phoneme timings from Piper: a voice patched once to report how many audio
samples each phoneme got (`piper.patch_voice_with_alignment`, which needs the
`onnx` package), kept in the cache folder beside the original's config, so
loading it later costs nothing extra."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def aligned_model(model_path: Path, cache_dir: Path) -> Path | None:
    """The path of a copy of `model_path` that reports phoneme alignments,
    made on first use under `cache_dir/piper-aligned/`; None when it cannot
    be made (no `onnx` package, or a model without the duration tensor)."""
    stat = model_path.stat()
    key = hashlib.sha256(
        f"{model_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    ).hexdigest()[:12]
    folder = cache_dir / "piper-aligned"
    target = folder / f"{model_path.stem}.{key}.onnx"
    config = model_path.with_name(model_path.name + ".json")
    if target.exists():
        return target
    try:
        import onnx
        from piper.patch_voice_with_alignment import add_alignment_output
    except ImportError:
        log.warning("The onnx package is missing: Piper voices will not report phoneme timings.")
        return None
    model = onnx.load(str(model_path))
    try:
        add_alignment_output(model)
    except ValueError as error:  # already patched, or no duration tensor
        log.info("Not patching %s for alignments: %s", model_path.name, error)
        return model_path if "already" in str(error).lower() else None
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    onnx.save(model, str(partial))
    if config.exists():
        shutil.copyfile(config, target.with_name(target.name + ".json"))
    partial.replace(target)
    return target


def phoneme_timings(chunk: object, start_s: float = 0.0) -> list[tuple[str, float, float]]:
    """(phoneme, start s, duration s) of one Piper AudioChunk with alignments,
    counted from `start_s`; empty when the voice reported none."""
    alignments = getattr(chunk, "phoneme_alignments", None)
    if not alignments:
        return []
    rate = float(chunk.sample_rate)  # type: ignore[attr-defined]
    timings = []
    at = 0
    for alignment in alignments:
        timings.append((alignment.phoneme, start_s + at / rate, alignment.num_samples / rate))
        at += alignment.num_samples
    return timings
