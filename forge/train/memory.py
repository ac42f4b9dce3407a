"""Memory readings: free device memory (or RAM) and the peak a run reached."""

from __future__ import annotations

import resource
import sys

import torch


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory of the device (CUDA) or available RAM (CPU, Linux); None when unknown.

    On CUDA a process cap (`torch.cuda.set_per_process_memory_fraction`, e.g. to share a GPU) counts: the
    free memory is then at most the cap less what this process's allocator already holds."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        fraction = torch.cuda.get_per_process_memory_fraction(index)
        if fraction < 1.0:
            free = min(free, max(0, int(fraction * total) - torch.cuda.memory_reserved(index)))
        return free
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
