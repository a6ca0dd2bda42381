"""GPU readings through NVML (`nvidia-ml-py`), where there is a GPU.

On a host without an NVIDIA driver (this project's CI, any CPU box) NVML does
not initialise: the monitor is simply unavailable, exports no GPU series and
never blocks serving. Where it works, every program exports memory,
utilisation and temperature per GPU, and reports NOT_SERVING when GPU memory
is over 90% (the same rule as RSS), so the watchdog restarts it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from prometheus_client import Gauge

log = logging.getLogger("talker.gpu")

GPU_AVAILABLE = Gauge("talker_gpu_available", "1 when NVML reads at least one GPU, else 0.")
GPU_MEMORY_USED = Gauge("talker_gpu_memory_used_bytes", "GPU memory in use.", ["gpu"])
GPU_MEMORY_TOTAL = Gauge("talker_gpu_memory_total_bytes", "GPU memory in all.", ["gpu"])
GPU_UTILIZATION = Gauge("talker_gpu_utilization_ratio", "GPU busy share, 0 to 1.", ["gpu"])
GPU_TEMPERATURE = Gauge("talker_gpu_temperature_celsius", "GPU core temperature.", ["gpu"])


@dataclass(frozen=True)
class GpuReading:
    index: int
    memory_used: int
    memory_total: int
    utilization: float
    temperature_c: float

    @property
    def memory_fraction(self) -> float:
        return self.memory_used / self.memory_total if self.memory_total else 0.0


class GpuMonitor:
    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[Any] = []
        self.unavailable_reason = ""
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [
                pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
            ]
            self._nvml = pynvml
        except Exception as error:  # no library, no driver, no device: all mean "no GPU"
            self.unavailable_reason = f"{type(error).__name__}: {error}"
        GPU_AVAILABLE.set(1 if self._handles else 0)
        if not self._handles:
            log.debug("no GPU readings", extra={"reason": self.unavailable_reason or "no devices"})

    @property
    def available(self) -> bool:
        return bool(self._handles)

    def read(self) -> list[GpuReading]:
        """Reads every GPU and updates the gauges; [] without a GPU."""
        nvml = self._nvml
        readings = []
        for index, handle in enumerate(self._handles):
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                busy = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
                temperature = float(
                    nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
                )
            except Exception as error:  # a GPU that fell off the bus is reported, not fatal
                log.warning("GPU read failed", extra={"gpu": index, "error": str(error)})
                continue
            reading = GpuReading(index, int(memory.used), int(memory.total), busy, temperature)
            label = str(index)
            GPU_MEMORY_USED.labels(label).set(reading.memory_used)
            GPU_MEMORY_TOTAL.labels(label).set(reading.memory_total)
            GPU_UTILIZATION.labels(label).set(reading.utilization)
            GPU_TEMPERATURE.labels(label).set(reading.temperature_c)
            readings.append(reading)
        return readings
