"""What every benchmark script shares: the machine description and the JSON report writer.

The scripts run as ``python benchmarks/bench_x.py`` from the repository root; they put the root on
``sys.path`` and import this module as ``benchmarks.common``.
"""
from __future__ import annotations

import datetime
import json
import os
import platform

import numpy as np
import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str | None = None, **extra) -> dict:
    """CPU model and count, Python/numpy/torch versions, torch threads, the GPU (when ``device`` is a
    CUDA device and one is visible, else None), the local date-time (ISO, with UTC offset) and the
    load average at the time of the call; ``extra`` is added last (script-specific fields)."""
    info = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "gpu": None, "cuda": None,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    info.update(extra)
    return info


def write_report(path: str, report: dict) -> None:
    """Write ``report`` as indented JSON to ``path`` (making its folder) and say so."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"wrote {path}")


def sync(device) -> None:
    """Wait for the device's queued work (a no-op off CUDA): timers read only finished work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
