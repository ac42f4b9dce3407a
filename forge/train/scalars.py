"""Scalars the step computes on the device, read on the host without stalling the GPU."""

from __future__ import annotations

import torch


class DeviceScalars:
    """Copies 0-dim device tensors to pinned host memory behind the work already queued, without waiting.

    `values()` waits for that copy only, so reading step N's loss after step N+1 has been queued keeps the
    GPU busy (a plain ``float(loss)`` would drain the whole queue first). On CPU the values are at hand.
    """

    def __init__(self, *tensors: torch.Tensor) -> None:
        stacked = torch.stack([t.detach().reshape(()).to(torch.float64) for t in tensors])
        self._event = None
        if stacked.is_cuda:
            self._host = torch.empty(stacked.shape, dtype=torch.float64, pin_memory=True)
            self._host.copy_(stacked, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = stacked

    def values(self) -> list[float]:
        """The scalars as Python floats (waits for the device work that made them, nothing after it)."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()
