"""How fast this GPU copies to pinned host memory and multiplies bf16 matrices, measured once (a few ms)."""

from __future__ import annotations

from typing import NamedTuple

import torch

COPY_MIB = 32  # the measured copy: large enough for the link's full rate
MATMUL = (4096, 4096, 4096)  # m, k, n of the measured product (96 MiB): near the rate of a layer's GEMMs


class LinkSpeed(NamedTuple):
    """Device-to-host copy rate into pinned memory (bytes/s) and bf16 matmul rate (FLOP/s)."""

    copy_bytes_per_s: float
    matmul_flops_per_s: float

    def line(self) -> str:
        """e.g. 'copies to pinned memory at 55.2 GB/s, bf16 matmuls at 780 TFLOP/s'."""
        return (
            f"copies to pinned memory at {self.copy_bytes_per_s / 1e9:.1f} GB/s, "
            f"bf16 matmuls at {self.matmul_flops_per_s / 1e12:.0f} TFLOP/s"
        )


def measure_link(device: torch.device, repeats: int = 3) -> LinkSpeed:
    """Time a device-to-host copy into pinned memory and a bf16 matmul on `device` (CUDA), best of `repeats`
    after a warm-up. Synchronizes with the device: call it before training, not inside the loop."""
    n = COPY_MIB * 2**20
    source = torch.empty(n, dtype=torch.uint8, device=device)
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    m, k, cols = MATMUL
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(k, cols, device=device, dtype=torch.bfloat16)
    copy_s = _best_seconds(lambda: host.copy_(source, non_blocking=True), device, repeats)
    matmul_s = _best_seconds(lambda: torch.mm(a, b), device, repeats)
    return LinkSpeed(n / copy_s, 2 * m * k * cols / matmul_s)


def _best_seconds(work, device: torch.device, repeats: int) -> float:
    with torch.cuda.device(device):
        work()
        best = float("inf")
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            work()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1000)
    return best
