"""Bootstrap of a talker gRPC program: server, health, reflection, the
observing interceptor, /metrics, model loading behind NOT_SERVING, and a
graceful stop on SIGTERM. Each service's `server.py` supplies only its
servicer and its model loader."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import metrics
from services.common.gpu import GpuMonitor
from services.common.interceptors import ObservingInterceptor
from services.common.logs import configure_logging
from services.common.settings import ServiceSettings

log = logging.getLogger("talker.runtime")
SettingsT = TypeVar("SettingsT", bound=ServiceSettings)

# Above this share of its memory ceiling a program reports NOT_SERVING.
MEMORY_HIGH_WATER = 0.9
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def channel_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    """Message bounds and keepalive shared by servers and the channels that call them."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Clients may ping every 10 s to keep long device streams open through NATs.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


class GrpcProgram:
    """One gRPC server with its model. `load` runs in a thread after the
    server is up, so health answers NOT_SERVING while the model loads."""

    def __init__(
        self,
        settings: ServiceSettings,
        service_names: Sequence[str],
        add_servicers: Callable[[aio.Server], None],
        load: Callable[[], None],
        engine: object = None,
        interceptors: Sequence[aio.ServerInterceptor] = (),
        credentials: grpc.ServerCredentials | None = None,
        on_stop: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        #: The model object behind the servicer, for benchmarks and tests to compare against.
        self.engine = engine
        self.service_names = list(service_names)
        self._add_servicers = add_servicers
        self._load = load
        # Run inside the observing interceptor, so they see the trace id and are counted.
        self._interceptors = list(interceptors)
        self._credentials = credentials
        self._on_stop = on_stop
        #: Runs on the loader's thread once the model is loaded, before SERVING.
        self.after_load: Callable[[], None] | None = None
        #: Runs on the loop right after SERVING is reported (a service of the
        #: program may then say NOT_SERVING for its own reasons).
        self.on_ready: Callable[[], Awaitable[None]] | None = None
        self._ready = False
        self._conditions: set[str] = set()
        self._memory_task: asyncio.Task[None] | None = None
        self._load_task: asyncio.Task[None] | None = None
        self.health = health.aio.HealthServicer()
        self.server: aio.Server | None = None
        self.port = 0
        self.metrics_port = 0

    @property
    def ready(self) -> bool:
        return self._ready

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING / NOT_SERVING for the program and each of its services."""
        status = SERVING if serving and not self._conditions else NOT_SERVING
        self._ready = serving
        metrics.READY.set(1 if status == SERVING else 0)
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def set_condition(self, condition: str, active: bool) -> None:
        """Conditions that make a loaded program NOT_SERVING until they clear:
        "queue_full" (so balancers and the watchdog see the pressure) and
        "memory" / "gpu_memory" (over 90% of the RSS ceiling or of GPU memory: the
        watchdog restarts it after it drains)."""
        before = set(self._conditions)
        if active:
            self._conditions.add(condition)
        else:
            self._conditions.discard(condition)
        if before == self._conditions:
            return
        log.warning(
            "not serving" if self._conditions else "serving again",
            extra={"conditions": sorted(self._conditions)},
        )
        if not self._ready or bool(before) == bool(self._conditions):
            return  # loading or draining (NOT_SERVING already), or no change of status
        status = NOT_SERVING if self._conditions else SERVING
        # talker_ready follows health: the not-serving alert must see a program over
        # its memory ceiling or with a full queue, not only one still loading.
        metrics.READY.set(1 if status == SERVING else 0)
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def set_overloaded(self, overloaded: bool) -> None:
        await self.set_condition("queue_full", overloaded)

    async def _watch_resources(self) -> None:
        """Memory ceiling (RSS) and GPU memory: over 90% of either, NOT_SERVING."""
        limit = self.settings.memory_limit_bytes()
        metrics.MEMORY_LIMIT.set(limit)
        gpu = GpuMonitor()
        while True:
            # /proc reads never block on disk; NVML reads take microseconds.
            if limit:
                await self.set_condition(
                    "memory", metrics.process_rss_bytes() > MEMORY_HIGH_WATER * limit
                )
            if gpu.available:
                readings = gpu.read()
                await self.set_condition(
                    "gpu_memory", any(r.memory_fraction > MEMORY_HIGH_WATER for r in readings)
                )
            await asyncio.sleep(2.0)

    async def start(self) -> int:
        """Bind, start serving health at once, and begin loading the model."""
        settings = self.settings
        loop = asyncio.get_running_loop()
        # Engines run in threads (to_thread); the default pool of cpu+4 is too
        # small for many live streams that each hand every chunk to a thread.
        loop.set_default_executor(ThreadPoolExecutor(max_workers=settings.max_concurrent_rpcs + 8))
        self.server = aio.server(
            interceptors=[
                ObservingInterceptor(settings.program, lambda: self._ready, settings.model_id()),
                *self._interceptors,
            ],
            options=channel_options(settings),
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        self._add_servicers(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        await self.set_serving(False)
        address = f"{settings.host}:{settings.port}"
        if self._credentials is not None:
            self.port = self.server.add_secure_port(address, self._credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        await self.server.start()
        self.metrics_port = metrics.start_metrics_endpoint(settings.host, settings.metrics_port)
        log.info(
            "listening",
            extra={"address": f"{settings.host}:{self.port}", "services": self.service_names},
        )
        self._load_task = asyncio.create_task(self._load_model())
        self._memory_task = asyncio.create_task(self._watch_resources())
        return self.port

    async def _load_model(self) -> None:
        started = loop_time()
        await asyncio.to_thread(self._load)
        if self.after_load is not None:
            await asyncio.to_thread(self.after_load)
        await self.set_serving(True)
        if self.on_ready is not None:
            await self.on_ready()
        log.info("serving", extra={"load_s": round(loop_time() - started, 3)})

    async def wait_ready(self) -> None:
        """Returns once the model is loaded; raises what the loader raised."""
        assert self._load_task is not None, "start() first"
        await self._load_task

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop taking calls, give in-flight ones the grace period, then cancel them."""
        if self.server is None:
            return
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        self._ready = False
        metrics.READY.set(0)
        await self.health.enter_graceful_shutdown()
        if self._memory_task is not None:
            self._memory_task.cancel()
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        await self.server.stop(grace)
        if self._on_stop is not None:
            await self._on_stop()
        log.info("stopped", extra={"grace_s": grace})

    async def run_until_terminated(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop gracefully. Exits 1 if the model cannot load."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await self.start()
        assert self._load_task is not None
        stop_wait = asyncio.create_task(stop.wait())
        await asyncio.wait({self._load_task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if self._load_task.done() and self._load_task.exception() is not None:
            error = self._load_task.exception()
            log.critical("model failed to load; exiting", exc_info=error)
            await self.stop(0)
            sys.exit(1)
        await stop_wait
        log.info("termination requested; draining")
        await self.stop()


def loop_time() -> float:
    return asyncio.get_running_loop().time()


def _then_lower_priority(after_load: Callable[[], None] | None, niceness: int) -> None:
    """The program's own step after loading (at full priority too), then the nice value."""
    if after_load is not None:
        after_load()
    lower_cpu_priority(niceness)


def lower_cpu_priority(niceness: int, thread_only: bool = False) -> None:
    """Raises the nice value of this process (or only of the calling thread) to
    `niceness`; threads started afterwards inherit it. Linux keeps the value per
    thread, so every thread running now is set. Never lowers it: that would need
    privileges, and an operator's `nice` outside stays in force."""
    if niceness <= 0:
        return
    threads = [threading.get_native_id()] if thread_only else _thread_ids()
    for thread in threads:
        with contextlib.suppress(OSError):  # gone, or not allowed: leave it as it is
            current = os.getpriority(os.PRIO_PROCESS, thread)
            os.setpriority(os.PRIO_PROCESS, thread, max(current, niceness))


def _thread_ids() -> list[int]:
    try:
        return [int(task) for task in os.listdir("/proc/self/task")]
    except OSError:  # no procfs: the process as a whole (one value on other systems)
        return [0]


def load_settings(settings_class: type[SettingsT], argv: list[str] | None = None) -> SettingsT:
    """`settings_class.load`, a refused setting logged as one record before the exit."""
    try:
        return settings_class.load(argv)
    except SystemExit as error:
        if isinstance(error.code, str):
            log.critical(error.code)
            raise SystemExit(2) from None
        raise


def run_program(
    settings_class: type[ServiceSettings],
    build: Callable[[Any], GrpcProgram],
    argv: list[str] | None = None,
) -> None:
    """Entry point of `python -m services.<name>`: settings from the environment
    and command-line flags, JSON logging, then serve until terminated."""
    # Logging first, so even a refused setting is a JSON line in the program's log.
    configure_logging(settings_class.program)
    settings = load_settings(settings_class, sys.argv[1:] if argv is None else argv)
    logging.getLogger().setLevel(settings.log_level.upper())
    program = build(settings)
    # The nice value applies once the model is loaded (to every thread then, the
    # engine's own pools too): a restart loads at full priority. Under contention
    # a niced load was the slowest part of a restart: chat at nice 5 took 65 s to
    # load on a host with a load average of 25, and the watchdog restarted it again.
    program.after_load = functools.partial(
        _then_lower_priority, program.after_load, settings.cpu_niceness
    )
    asyncio.run(program.run_until_terminated())
