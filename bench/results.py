"""Shared by the benchmark scripts: each owns one section of bench/RESULTS.md."""

from __future__ import annotations

import platform
import re
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = (
    "# Benchmark results\n\n"
    "Written by `make bench` (each script rewrites its own section). Machines are shared and\n"
    "noisy: numbers are medians of repeated runs, and the ratios (ours vs the baseline measured\n"
    "in the same run) are what to compare.\n"
)


def median(values: list[float]) -> float:
    return float(np.median(values))


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section ``name`` of RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    section = (
        f"<!-- {name}:start -->\n## {name}\n\n_{stamp}, {machine()}_\n\n{body.strip()}\n"
        f"<!-- {name}:end -->\n"
    )
    pattern = re.compile(
        rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->\n", re.S
    )
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text + "\n" + section
    RESULTS.write_text(text)
    print(section)
