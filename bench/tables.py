"""Percentiles and plain-text tables for benchmark output."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np


@functools.cache
def cpu_name() -> str:
    """The CPU model and its widest vector units, named under every table:
    machines differ, and a speed holds only for the CPU it was measured on."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    if "avx512f" in flags:
        units = "AVX-512" + (" (with BF16)" if "avx512_bf16" in flags else "")
    elif "avx2" in flags:
        units = "AVX2 only, no AVX-512"
    else:
        units = "no AVX2"
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    if forced:
        units += f"; torch limited to {forced}"
    return f"{model}, {os.cpu_count()} cores, {units}"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n## {title}")
    print(f"CPU: {cpu_name()}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
