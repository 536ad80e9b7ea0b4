"""What this host's torch can train on: one answer for the service, its launchers and the training processes.

torch is imported on the first question, not with this module, and only on a host with a GPU driver: a server
on a CPU-only host never imports it (seconds of CPU at each start).
"""

from __future__ import annotations

import functools
import os

# torch.cuda finds a GPU only through NVIDIA's driver (which shows itself in /proc) or AMD's (ROCm's /dev/kfd)
GPU_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/kfd")


@functools.cache
def cuda_available() -> bool:
    if not any(os.path.exists(p) for p in GPU_DRIVER_PATHS):
        return False
    import torch

    return torch.cuda.is_available()


def device_type() -> str:
    return "cuda" if cuda_available() else "cpu"


def backend() -> str:
    """The torch.distributed backend of a job's process group."""
    return "nccl" if cuda_available() else "gloo"
