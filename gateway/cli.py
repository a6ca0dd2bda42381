"""`talker`: the command line of the digital human.

    talker ask --audio q.wav --portrait face.jpg --out answer.mp4
    talker ask --text "What is the capital of France?"
    talker converse --wav q.wav            (plays a recording as a live device)
    talker voices add "Ana" --wav ana.wav --consent | voices list | voices rm ID
    talker avatars add face.jpg | avatars list | avatars rm ID
    talker health

Talks to the gateway (and, for voices and avatars, to the synthesize and
animate programs on this host). Every failure is one sentence, no traceback."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from tqdm import tqdm

from operations.programs import PROGRAMS, program_settings
from services.common.audio import wav_bytes
from talker.v1 import (
    animate_pb2,
    animate_pb2_grpc,
    audio_pb2,
    synthesize_pb2,
    synthesize_pb2_grpc,
    talker_pb2,
    talker_pb2_grpc,
)

MODES = {
    "text": talker_pb2.REPLY_MODE_TEXT,
    "audio": talker_pb2.REPLY_MODE_AUDIO,
    "video": talker_pb2.REPLY_MODE_AUDIO_VIDEO,
}
CHUNK_MS = 20


class CliError(Exception):
    """A sentence for the person at the terminal."""


def address_of(program: str) -> str:
    settings = program_settings(program)
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"{host}:{settings.port}"


# ---- connections -----------------------------------------------------------------
class Connection:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.trace_id = args.trace_id or f"cli-{os.urandom(6).hex()}"

    def metadata(self) -> list[tuple[str, str]]:
        pairs = [("x-trace-id", self.trace_id)]
        if self.args.api_key:
            pairs.append(("authorization", f"Bearer {self.args.api_key}"))
        return pairs

    def channel(self, address: str, tls: bool = False) -> grpc.Channel:
        if tls:
            root = Path(self.args.tls_ca).read_bytes() if self.args.tls_ca else None
            return grpc.secure_channel(address, grpc.ssl_channel_credentials(root))
        return grpc.insecure_channel(address)

    def gateway(self) -> talker_pb2_grpc.TalkerServiceStub:
        address = self.args.gateway or address_of("gateway")
        return talker_pb2_grpc.TalkerServiceStub(self.channel(address, bool(self.args.tls_ca)))

    def synthesize(self) -> synthesize_pb2_grpc.SynthesizeServiceStub:
        return synthesize_pb2_grpc.SynthesizeServiceStub(
            self.channel(self.args.synthesize or address_of("synthesize"))
        )

    def animate(self) -> animate_pb2_grpc.AnimateServiceStub:
        return animate_pb2_grpc.AnimateServiceStub(
            self.channel(self.args.animate or address_of("animate"))
        )


def read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise CliError(f"The {what} {path} does not exist.") from None
    except IsADirectoryError:
        raise CliError(f"The {what} {path} is a folder, not a file.") from None
    except OSError as error:
        raise CliError(f"The {what} {path} cannot be read: {error.strerror}.") from None


def write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise CliError(f"Cannot write {path}: {error.strerror}.") from None


def clip_of(data: bytes, path: str) -> talker_pb2.AudioClip:
    suffix = Path(path).suffix.lower()
    encoding = {
        ".wav": audio_pb2.AUDIO_ENCODING_WAV,
        ".flac": audio_pb2.AUDIO_ENCODING_FLAC,
        ".ogg": audio_pb2.AUDIO_ENCODING_OGG,
    }.get(suffix)
    if encoding is None:
        raise CliError(f"{path}: use a .wav, .flac or .ogg recording.")
    return talker_pb2.AudioClip(format=audio_pb2.AudioFormat(encoding=encoding), audio=data)


def ensure_avatar(conn: Connection, portrait: str) -> str:
    """The avatar of a portrait file, created once and found again by content."""
    image = read_file(portrait, "portrait")
    name = f"portrait-{hashlib.sha256(image).hexdigest()[:16]}"
    stub = conn.animate()
    for avatar in stub.ListAvatars(animate_pb2.ListAvatarsRequest(), timeout=30).avatars:
        if avatar.display_name == name:
            return str(avatar.avatar_id)
    avatar = stub.CreateAvatar(
        animate_pb2.CreateAvatarRequest(image=image, display_name=name), timeout=120
    ).avatar
    return str(avatar.avatar_id)


# ---- commands ---------------------------------------------------------------------
def cmd_ask(args: argparse.Namespace) -> None:
    conn = Connection(args)
    if bool(args.text) == bool(args.audio):
        raise CliError("Give the question as --text or as --audio (one of them).")
    avatar_id = args.avatar or (ensure_avatar(conn, args.portrait) if args.portrait else "")
    out = Path(args.out) if args.out else None
    if out is not None and not out.parent.is_dir():
        raise CliError(f"The folder of --out ({out.parent}) does not exist.")
    render = bool(out and out.suffix.lower() == ".mp4")
    if render and not avatar_id:
        raise CliError("An mp4 answer needs a face: add --portrait FILE or --avatar ID.")
    mode = MODES[args.mode] if args.mode else (MODES["audio"] if out else MODES["text"])
    request = talker_pb2.AskRequest(
        user_id=args.user,
        scene=args.scene,
        session_id=args.session,
        mode=mode,
        voice_id=args.voice,
        avatar_id=avatar_id,
        render_mp4=render,
    )
    if args.text:
        request.text = args.text
    else:
        request.audio.CopyFrom(clip_of(read_file(args.audio, "recording"), args.audio))
    audio, rate, mp4 = bytearray(), 0, bytearray()
    bar: Any = None
    call = conn.gateway().Ask(request, metadata=conn.metadata(), timeout=args.timeout)
    for response in call:
        event = response.event
        which = event.WhichOneof("event")
        if which == "started":
            print(f"trace id  {event.started.trace_id}   session {event.started.session_id}")
        elif which == "transcript":
            print(f"you       {event.transcript.text.strip()}")
        elif which == "reply_delta" and not args.quiet:
            print(event.reply_delta.text, end="", flush=True)
        elif which == "reply_audio":
            audio.extend(event.reply_audio.audio)
            rate = event.reply_audio.format.sample_rate_hz
        elif which == "render_progress":
            if bar is None:
                print()
                bar = tqdm(total=100, unit="%", desc="rendering", leave=False)
            bar.n = round(event.render_progress.fraction * 100)
            bar.refresh()
        elif which == "mp4_chunk":
            mp4.extend(event.mp4_chunk.content)
        elif which == "turn_finished":
            if bar is not None:
                bar.close()
            finished = event.turn_finished
            print(f"\ntalker    {finished.reply_text}")
            timings = finished.timings
            print(
                f"timings   first token {timings.first_token_ms} ms, first audio "
                f"{timings.first_audio_ms} ms, total {timings.total_ms} ms"
            )
            if finished.archive_path:
                print(f"archived  {finished.archive_path}")
    if out is not None:
        if render:
            write_atomically(out, bytes(mp4))
        else:
            if not audio:
                raise CliError("The reply has no audio to write (was --mode text?).")
            write_atomically(out, wav_bytes(bytes(audio), rate))
        print(f"wrote     {out} ({out.stat().st_size} bytes)")


def read_wav(path: str) -> tuple[bytes, int]:
    data = read_file(path, "recording")
    import io

    try:
        with wave.open(io.BytesIO(data)) as file:
            if file.getsampwidth() != 2 or file.getnchannels() != 1:
                raise CliError(f"{path}: converse plays 16-bit mono WAV; convert it first.")
            return file.readframes(file.getnframes()), file.getframerate()
    except (wave.Error, EOFError):
        raise CliError(f"{path} is not a WAV file.") from None


def cmd_converse(args: argparse.Namespace) -> None:
    conn = Connection(args)
    pcm, rate = read_wav(args.wav)
    avatar_id = args.avatar or (ensure_avatar(conn, args.portrait) if args.portrait else "")
    mode = MODES[args.mode] if args.mode else (MODES["video"] if avatar_id else MODES["audio"])
    config = talker_pb2.ConverseConfig(
        user_id=args.user,
        scene=args.scene,
        session_id=args.session,
        mode=mode,
        voice_id=args.voice,
        avatar_id=avatar_id,
        interim_results=True,
        input_format=audio_pb2.AudioFormat(
            encoding=audio_pb2.AUDIO_ENCODING_PCM_S16LE, sample_rate_hz=rate, channels=1
        ),
    )
    step = rate * CHUNK_MS // 1000 * 2

    def requests() -> Iterator[talker_pb2.ConverseRequest]:
        yield talker_pb2.ConverseRequest(config=config)
        started = time.monotonic()
        # Real-time pace, like a microphone: chunk n leaves at n * 20 ms.
        for n, offset in enumerate(range(0, len(pcm), step)):
            delay = started + n * CHUNK_MS / 1000 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            yield talker_pb2.ConverseRequest(audio=pcm[offset : offset + step])
        # A second of silence so the last utterance ends, then half-close.
        for _ in range(1000 // CHUNK_MS):
            time.sleep(CHUNK_MS / 1000)
            yield talker_pb2.ConverseRequest(audio=bytes(step))

    audio_ms: dict[int, int] = {}
    frames: dict[int, int] = {}
    began = time.monotonic()
    for response in conn.gateway().Converse(requests(), metadata=conn.metadata()):
        event = response.event
        which = event.WhichOneof("event")
        at = f"{time.monotonic() - began:6.2f}s turn {event.turn_index}"
        if which == "started":
            print(f"{at} started: trace id {event.started.trace_id}")
        elif which == "speech":
            print(f"{at} {speech_name(event.speech.type)} at {event.speech.offset_ms} ms")
        elif which == "transcript" and event.transcript.is_final:
            print(f"{at} heard: {event.transcript.text.strip()}")
        elif which == "reply_sentence":
            print(f"{at} reply: {event.reply_sentence.text}")
        elif which == "reply_audio":
            audio_ms[event.turn_index] = (
                audio_ms.get(event.turn_index, 0) + event.reply_audio.duration_ms
            )
        elif which == "video_frame":
            frames[event.turn_index] = frames.get(event.turn_index, 0) + 1
        elif which == "interrupted":
            print(f"{at} interrupted after {event.interrupted.audio_sent_ms} ms of audio")
        elif which == "error":
            print(f"{at} error in {event.error.message}")
        elif which == "turn_finished":
            print(
                f"{at} finished: {audio_ms.get(event.turn_index, 0)} ms of audio, "
                f"{frames.get(event.turn_index, 0)} frames, first audio after "
                f"{event.turn_finished.timings.first_audio_ms} ms"
            )


def speech_name(kind: int) -> str:
    from talker.v1 import asr_pb2

    return asr_pb2.SpeechEventType.Name(kind).removeprefix("SPEECH_EVENT_TYPE_").lower()


def cmd_voices(args: argparse.Namespace) -> None:
    conn = Connection(args)
    stub = conn.synthesize()
    if args.action == "list":
        for voice in stub.ListVoices(synthesize_pb2.ListVoicesRequest(), timeout=30).voices:
            kind = synthesize_pb2.VoiceKind.Name(voice.kind).removeprefix("VOICE_KIND_").lower()
            print(f"{voice.voice_id:<40} {kind:<8} {voice.language:<4} {voice.display_name}")
    elif args.action == "rm":
        stub.DeleteVoice(synthesize_pb2.DeleteVoiceRequest(voice_id=args.id), timeout=30)
        print(f"deleted {args.id}")
    else:
        data = read_file(args.wav, "recording")
        clip = clip_of(data, args.wav)

        def requests() -> Iterator[synthesize_pb2.CreateVoiceRequest]:
            yield synthesize_pb2.CreateVoiceRequest(
                config=synthesize_pb2.CreateVoiceConfig(
                    display_name=args.name, format=clip.format, consent=args.consent
                )
            )
            for offset in range(0, len(data), 64 * 1024):
                yield synthesize_pb2.CreateVoiceRequest(audio=data[offset : offset + 64 * 1024])

        voice = create_voice_with_progress(stub, requests(), len(data))
        print(f"created {voice.voice_id} ({voice.display_name})")
        for warning in voice.quality.warnings:
            print(f"warning: {warning}")


def create_voice_with_progress(
    stub: synthesize_pb2_grpc.SynthesizeServiceStub,
    requests: Iterator[synthesize_pb2.CreateVoiceRequest],
    size: int,
) -> synthesize_pb2.Voice:
    """CreateVoice with what is happening on stderr: the upload by bytes, then the
    seconds spent measuring and matching (a 30 s reference takes a minute or more on
    a small CPU; silence that long looks like a hang)."""
    # One line on stderr: a bar by bytes while uploading, then the same line names
    # the server's step and counts the seconds (tqdm's elapsed time).
    bar = tqdm(total=size, unit="B", unit_scale=True, desc="uploading", leave=False)

    def counted() -> Iterator[synthesize_pb2.CreateVoiceRequest]:
        for request in requests:
            bar.update(len(request.audio))
            yield request
        bar.set_description("checking the recording and making the voice")

    call = stub.CreateVoice.future(counted(), timeout=300)
    try:
        while True:
            try:
                return call.result(timeout=0.5).voice
            except grpc.FutureTimeoutError:
                bar.refresh()
    finally:
        bar.close()


def cmd_avatars(args: argparse.Namespace) -> None:
    conn = Connection(args)
    stub = conn.animate()
    if args.action == "list":
        for avatar in stub.ListAvatars(animate_pb2.ListAvatarsRequest(), timeout=30).avatars:
            print(f"{avatar.avatar_id:<40} {avatar.width}x{avatar.height} {avatar.display_name}")
    elif args.action == "rm":
        stub.DeleteAvatar(animate_pb2.DeleteAvatarRequest(avatar_id=args.id), timeout=30)
        print(f"deleted {args.id}")
    else:
        image = read_file(args.image, "portrait")
        name = args.name or Path(args.image).stem
        with tqdm(total=1, desc="checking the portrait", leave=False):
            avatar = stub.CreateAvatar(
                animate_pb2.CreateAvatarRequest(image=image, display_name=name), timeout=120
            ).avatar
        print(f"created {avatar.avatar_id} ({avatar.display_name})")
        for check in avatar.checks:
            if check.severity >= animate_pb2.CHECK_SEVERITY_WARNING:
                print(f"warning: {check.message}")


def cmd_health(args: argparse.Namespace) -> None:
    """Every program on this host; with --gateway (or --synthesize / --animate),
    the one(s) named. The gateway's `talker.v1.TalkerService` status is SERVING only
    while every stage behind it is, so a remote gateway's answer covers its stages."""
    from services.common.health_probe import probe

    named = {"gateway": args.gateway, "synthesize": args.synthesize, "animate": args.animate}
    chosen = {name: address for name, address in named.items() if address}
    if not chosen:
        chosen = {program: address_of(program) for program in PROGRAMS}
    failed = 0
    for program, address in chosen.items():
        service = "talker.v1.TalkerService" if program == "gateway" else ""
        status = probe(address, timeout_s=2, service=service)
        failed += status != "SERVING"
        print(f"{program:<12} {address:<22} {status}")
    if failed:
        raise CliError(f"{failed} program(s) not SERVING; `make logs` shows why.")


# ---- parsing ----------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="talker", description=__doc__.split("\n\n")[0])
    root.add_argument(
        "--gateway",
        default=os.environ.get("TALKER_GATEWAY_ADDRESS", ""),
        help="host:port of the gateway",
    )
    root.add_argument("--synthesize", default="", help="host:port of SynthesizeService")
    root.add_argument("--animate", default="", help="host:port of AnimateService")
    root.add_argument(
        "--api-key", default=os.environ.get("TALKER_API_KEY", ""), help="gateway API key"
    )
    root.add_argument("--tls-ca", default="", help="CA certificate: talk TLS to the gateway")
    root.add_argument("--trace-id", default="", help="x-trace-id to send (default: a new one)")
    root.add_argument("--timeout", type=float, default=600, help="seconds to wait for an answer")
    commands = root.add_subparsers(dest="command", required=True)

    def who(command: argparse.ArgumentParser) -> None:
        command.add_argument("--user", default="", help="user id (archive names, logs)")
        command.add_argument("--scene", default="cli", help="scene label (archive names)")
        command.add_argument("--session", default="", help="chat session to continue")
        command.add_argument("--voice", default="", help="voice id (default voice if empty)")
        face = command.add_mutually_exclusive_group()
        face.add_argument("--portrait", default="", help="portrait image to speak with")
        face.add_argument("--avatar", default="", help="avatar id to speak with")
        command.add_argument("--mode", choices=sorted(MODES), help="what the reply is made of")

    ask = commands.add_parser("ask", help="one question, typed or recorded")
    ask.add_argument("--text", default="", help="the question as text")
    ask.add_argument("--audio", default="", help="the question as a .wav/.flac/.ogg recording")
    ask.add_argument("--out", default="", help="write the answer: .mp4 (needs a face) or .wav")
    ask.add_argument("--quiet", action="store_true", help="no reply text while it streams")
    who(ask)
    ask.set_defaults(run=cmd_ask)

    converse = commands.add_parser("converse", help="play a recording as a live device")
    converse.add_argument("--wav", required=True, help="16-bit mono WAV recording")
    who(converse)
    converse.set_defaults(run=cmd_converse)

    voices = commands.add_parser("voices", help="the voices to answer in").add_subparsers(
        dest="action", required=True
    )
    add = voices.add_parser("add", help="make a voice from a 10-60 s recording")
    add.add_argument("name")
    add.add_argument("--wav", required=True)
    add.add_argument("--consent", action="store_true", help="the speaker agreed to be cloned")
    voices.add_parser("list")
    rm = voices.add_parser("rm")
    rm.add_argument("id")
    for sub in voices.choices.values():
        sub.set_defaults(run=cmd_voices)

    avatars = commands.add_parser("avatars", help="the faces to speak with").add_subparsers(
        dest="action", required=True
    )
    add = avatars.add_parser("add", help="check a portrait and keep it")
    add.add_argument("image")
    add.add_argument("--name", default="")
    avatars.add_parser("list")
    rm = avatars.add_parser("rm")
    rm.add_argument("id")
    for sub in avatars.choices.values():
        sub.set_defaults(run=cmd_avatars)

    commands.add_parser("health", help="is every program SERVING?").set_defaults(run=cmd_health)
    return root


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except CliError as error:
        sys.exit(f"talker: {error}")
    except grpc.RpcError as error:
        code = error.code()
        details = error.details()
        if code is grpc.StatusCode.UNAVAILABLE and "failed to connect" in (details or "").lower():
            sys.exit(f"talker: cannot reach the server ({details}). Is `make run` running?")
        sys.exit(f"talker: {code.name}: {details}")
    except KeyboardInterrupt:
        sys.exit("talker: interrupted.")


if __name__ == "__main__":
    main()
