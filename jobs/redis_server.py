"""`python -m jobs.redis_server`: runs redis-server (Debian package
`redis-server`) in the foreground for supervisord, with the settings of
`RedisSettings` (TALKER_REDIS_*): bound to loopback by default, append-only
file on (fsync on every write by default), data under TALKER_VAR_DIR/redis.

It replaces itself with redis-server (exec), so supervisord's pid is Redis's
own: `kill -9` and SIGTERM (save and exit) reach Redis directly."""

from __future__ import annotations

import os
import shutil
import sys

from jobs.config import RedisSettings


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
    settings = RedisSettings.load(sys.argv[1:])
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if binary is None:
        raise SystemExit(
            "redis: redis-server is not installed. Install the Debian package "
            "(`make system-deps`, or apt-get install redis-server)."
        )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    argv = command(settings, binary)
    print(f"exec {' '.join(argv)}", flush=True)
    os.execv(binary, argv)


if __name__ == "__main__":
    main()
