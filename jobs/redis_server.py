"""`python -m jobs.redis_server`: runs redis-server (Debian package
`redis-server`) in the foreground for supervisord, with the settings of
`RedisSettings` (TALKER_REDIS_*): bound to loopback by default, append-only
file on (fsync on every write by default), data under TALKER_VAR_DIR/redis.

It replaces itself with redis-server (exec), so supervisord's pid is Redis's
own: `kill -9` and SIGTERM (save and exit) reach Redis directly. Redis's own
log lines are not JSON; before the exec a forked child takes Redis's stdout
and stderr through a pipe and writes each line as a JSON record (level from
Redis's marker), so var/log/redis.log parses like every other log. The
child ends when Redis does (end of the pipe)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys

from pipeline.config import RedisSettings
from services.common.logs import json_line

# "3542:M 02 Dec 2026 05:47:45.239 * Ready to accept connections"
REDIS_LINE = re.compile(rb"^\d+:[XCSM] \d{2} \w{3} \d{4} [\d:.]+ ([.*#-]) (.*)$")
LEVELS = {b".": "debug", b"-": "debug", b"*": "info", b"#": "warning"}


def command(settings: RedisSettings, binary: str) -> list[str]:
    return [
        binary,
        "--bind", settings.host,
        "--port", str(settings.port),
        "--protected-mode", "yes",
        "--daemonize", "no",
        "--dir", str(settings.data_dir),
        "--appendonly", "yes",
        "--appendfsync", settings.appendfsync,
        "--maxmemory", f"{settings.maxmemory_mb}mb",
        # Jobs are never evicted to make room: a full Redis refuses new ones instead.
        "--maxmemory-policy", "noeviction",
        # Logs to stdout, which supervisord writes to var/log/redis.log.
        "--logfile", "",
    ]  # fmt: skip


def main() -> None:
    try:
        settings = RedisSettings.load(sys.argv[1:])
    except SystemExit as error:  # a refused setting: one JSON record, not a bare line
        say("critical", str(error.code))
        raise SystemExit(2) from None
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if binary is None:
        say(
            "critical",
            "redis-server is not installed. Install the Debian package "
            "(`make system-deps`, or apt-get install redis-server).",
        )
        raise SystemExit(1)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    argv = command(settings, binary)
    say("info", f"exec {' '.join(argv)}")
    read_end, write_end = os.pipe()
    if os.fork() == 0:
        os.close(write_end)
        translate(read_end)
        os._exit(0)
    os.close(read_end)
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)
    os.execv(binary, argv)


def say(level: str, event: str) -> None:
    print(json_line("redis", level, "talker.jobs.redis", event), flush=True)


def translate(read_end: int) -> None:
    """Redis's lines from the pipe, as JSON records on stdout, until Redis exits."""
    # Signals for Redis (an operator's SIGTERM to the group, a Ctrl-C) must not
    # end the translator first and cut Redis's last lines.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with os.fdopen(read_end, "rb") as lines:
        for raw in lines:
            match = REDIS_LINE.match(raw.rstrip(b"\n"))
            level, text = (LEVELS[match[1]], match[2]) if match else ("info", raw.strip())
            if text:
                event = text.decode("utf-8", errors="replace")
                print(json_line("redis", level, "redis-server", event), flush=True)


if __name__ == "__main__":
    main()
