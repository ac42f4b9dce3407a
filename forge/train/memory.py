"""Memory readings: free device memory (or RAM) and the peak a run reached."""

from __future__ import annotations

import resource
import sys

import torch


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory of the device (CUDA) or available RAM (CPU, Linux); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_memory() -> tuple[float, str]:
    """(peak MiB, what was measured): CUDA's peak allocation when on GPU, else the process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process_peak_rss"
