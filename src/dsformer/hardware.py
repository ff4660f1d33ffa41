"""A description of the machine a measurement ran on, stored next to every result."""

from __future__ import annotations

import importlib.util
import os
import platform
from typing import Any

import torch

from dsformer.errors import DsformerError


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict[str, Any]:
    """CPU model, cores, torch version and threads, and the GPU if there is one."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_features": torch.backends.cpu.get_cpu_capability(),  # the vector paths torch runs: AVX512, AVX2, ...
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def triton_installed() -> bool:
    """Whether Triton can be imported (it comes with CUDA builds of PyTorch)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, set before Triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(device: str) -> None:
    """``cpu``, ``cuda`` or ``cuda:N``, and CUDA only where there is a CUDA device."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise DsformerError(f"--device {device!r}: give cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise DsformerError(f"--device {device} was asked for but no CUDA device is available; use --device cpu")


def check_run_device(device: str) -> None:
    """:func:`check_device`, and for a training run in one process the GPU is picked by ``CUDA_VISIBLE_DEVICES``."""
    check_device(device)
    if device.startswith("cuda:") and device != "cuda:0" and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        raise DsformerError(f"--device {device}: pick the GPU with CUDA_VISIBLE_DEVICES and pass --device cuda")
