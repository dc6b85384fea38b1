"""The one description of the machine a benchmark ran on (every `geosurge bench ...` prints it)."""

from __future__ import annotations

import importlib
import os
import platform
from collections.abc import Iterable

# The libraries whose versions change benchmark figures. A benchmark that does not use torch
# (bench partition) passes a shorter list so that describing the machine does not import it.
DEFAULT_LIBRARIES = ("numpy", "torch", "faiss")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def library_versions(names: Iterable[str]) -> dict[str, str]:
    """`{name: version}` of the importable ones among `names` (importing them)."""
    versions = {}
    for name in names:
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "?")
        except ImportError:
            continue
    return versions


def machine_info(libraries: Iterable[str] = DEFAULT_LIBRARIES) -> dict:
    """CPU model, usable cores, RAM, OS, GPUs torch sees, and the versions of `libraries`
    (those that cannot be imported are left out). JSON-ready."""
    info: dict = {
        "cpu": _cpu_model(),
        # usable cores, not installed ones: a container or taskset may allow fewer
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
    info["versions"] = versions = library_versions(libraries)
    if "torch" in versions:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpus"] = torch.cuda.device_count()
    if "faiss" in versions:
        import faiss

        info["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return info


def describe_machine(info: dict | None = None, libraries: Iterable[str] = DEFAULT_LIBRARIES) -> str:
    """One line for a benchmark's `machine:` header, from `info` (else `machine_info(libraries)`)."""
    info = machine_info(libraries) if info is None else info
    mem = f"{info['memory_gib']:.0f} GiB RAM" if info.get("memory_gib") is not None else "RAM unknown"
    gpu = f"GPU {info['gpu']} x{info['gpus']}" if "gpu" in info else "no GPU"
    notes = {"torch": f" ({info.get('torch_threads')} threads)", "faiss": f" ({info.get('faiss_gpus')} GPUs)"}
    libs = [f"Python {info['python']}"] + [f"{name} {version}{notes.get(name, '')}"
                                          for name, version in info.get("versions", {}).items()]
    return (f"{info['cpu']}, {info['cores']} usable cores (of {info['cpu_count']}), {mem}, {gpu}; "
            f"{info['os']}; " + ", ".join(libs))
