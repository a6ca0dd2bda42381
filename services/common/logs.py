"""Structured logs: one JSON object a line on stderr, each carrying the
program name and the trace id of the call being served.

Every line a program writes is JSON, also what it does not write through
`logging`: Python warnings become records (`logging.captureWarnings`), an
uncaught exception is a `critical` record, and whatever else reaches file
descriptors 1 and 2 (tqdm bars, prints, C libraries such as onnxruntime or
llama.cpp writing to stderr) is read from a pipe and wrapped into a record
(`logger` "stdout" / "stderr"), so a log shipper can parse every line."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import sys
import threading
import time
from typing import IO, Any

from services.common.tracing import current_trace_id

# Attributes every LogRecord has; anything else was passed with `extra=` and
# belongs in the JSON object as a field of its own.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    def __init__(self, program: str) -> None:
        super().__init__()
        self.program = program

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "program": self.program,
            "logger": record.name,
            "event": record.getMessage(),
        }
        trace_id = current_trace_id.get()
        if trace_id:
            entry["trace_id"] = trace_id
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def json_line(program: str, level: str, logger: str, event: str) -> str:
    """One record in the JSON shape of `JsonFormatter`, for text that did not come
    through `logging` (the pipe reader below, programs that wrap another's output)."""
    now = time.time()
    entry = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
        "level": level,
        "program": program,
        "logger": logger,
        "event": event,
    }
    return json.dumps(entry, ensure_ascii=False)


# A pipe this large holds a long burst of C-library output (a model loader's
# table) while the reader waits for the GIL, so a writer that holds it never blocks.
_PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class _StreamCapture:
    """Points one file descriptor (1 or 2) at a pipe; a thread turns every line that
    comes through it into a JSON record written to `out`."""

    def __init__(self, fd: int, program: str, level: str, out: IO[str], lock: threading.Lock):
        self.fd, self.program, self.level, self.out, self.lock = fd, program, level, out, lock
        self.logger = "stdout" if fd == 1 else "stderr"
        read_end, write_end = os.pipe()
        # A lower system limit: the default 64 KiB still works.
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_end, _F_SETPIPE_SZ, _PIPE_BYTES)
        self.saved = os.dup(fd)
        os.dup2(write_end, fd)
        os.close(write_end)
        self.reader = os.fdopen(read_end, "rb", buffering=0)
        self.thread = threading.Thread(target=self._pump, name=f"log-{self.logger}", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        pending = b""
        while chunk := self.reader.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._emit(line)
            if len(pending) > 65536:  # a bar that never ends its line
                self._emit(pending)
                pending = b""
        if pending:
            self._emit(pending)

    def _emit(self, raw: bytes) -> None:
        # A progress bar redraws with carriage returns: keep what a terminal shows last.
        text = raw.decode("utf-8", errors="replace").split("\r")
        shown = next((part for part in reversed(text) if part.strip()), "").rstrip()
        if not shown:
            return
        with self.lock:
            self.out.write(json_line(self.program, self.level, self.logger, shown) + "\n")
            self.out.flush()

    def restore(self) -> None:
        """Give the descriptor back and let the thread drain what is left (at exit)."""
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.saved, self.fd)
        self.thread.join(2)


_captures: list[_StreamCapture] = []


class _LockedStream:
    """The real stderr, shared by the log handler and the pipe readers line by line."""

    def __init__(self, out: IO[str], lock: threading.Lock) -> None:
        self.out, self.lock = out, lock

    def write(self, text: str) -> int:
        with self.lock:
            written = self.out.write(text)
            self.out.flush()
        return written

    def flush(self) -> None:
        self.out.flush()


def configure_logging(program: str, level: str = "INFO", capture_output: bool = True) -> None:
    """JSON records on stderr. With `capture_output` (the programs' entry points) also
    every other line written to stdout or stderr, wrapped (see the module's doc)."""
    lock = threading.Lock()
    if capture_output and not _captures and os.environ.get("TALKER_LOG_CAPTURE", "1") != "0":
        sys.stdout.flush()
        sys.stderr.flush()
        real = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
        _captures.append(_StreamCapture(1, program, "info", real, lock))
        _captures.append(_StreamCapture(2, program, "warning", real, lock))
        atexit.register(_restore_streams)
        stream: Any = _LockedStream(real, lock)
    else:
        stream = sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(program))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # faster-whisper logs every VAD pass at INFO; keep its warnings only.
    logging.getLogger("faster_whisper").setLevel(logging.WARNING)
    # warnings.warn (PIL's DecompressionBombWarning, deprecations) as records.
    logging.captureWarnings(True)
    if capture_output:
        sys.excepthook = _log_uncaught
        threading.excepthook = lambda hook: _log_uncaught(
            hook.exc_type, hook.exc_value or hook.exc_type(), hook.exc_traceback
        )


def _log_uncaught(kind: type[BaseException], error: BaseException, traceback: Any) -> None:
    logging.getLogger("talker").critical(
        "uncaught exception; exiting", exc_info=(kind, error, traceback)
    )


def _restore_streams() -> None:
    while _captures:
        _captures.pop().restore()
