"""Where a benchmark ran, in the two lines every benchmark prints under its figures.

Figures on a shared machine mean little without the processor, the load and the library versions beside
them, so each benchmark names the packages it exercises and prints this.
"""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version


def processor() -> str:
    """The GPU's name when torch sees one, else the CPU model and core count."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def describe(packages: tuple[str, ...], extra: str = "") -> str:
    """'date, processor, platform, Python, load[, extra]' and a line of ``packages``' installed versions."""

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    first = (
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}, {processor()}, {platform.platform()}, "
        f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}"
    )
    return first + (f", {extra}" if extra else "") + "\n" + ", ".join(f"{p} {installed(p)}" for p in packages)
