"""When the Triton kernels run, and the launch settings they share.

`use_triton(*tensors)` is the one switch every public op consults:

- Triton importable, and either every tensor is on CUDA, or ``TRITON_INTERPRET=1`` was set before
  ``forge.kernels`` was imported (then the kernels run in Triton's CPU interpreter, as the tests do);
- and ``FORGE_KERNELS`` is not ``off`` (``FORGE_KERNELS=off`` forces the PyTorch paths anywhere).

Otherwise the op runs its PyTorch path, so every op works on a machine without a GPU.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated (at import), so this module reads it once
at import too: setting it later changes nothing, for the kernels and for `use_triton` alike.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # macOS / Windows: no Triton wheel; every op takes its PyTorch path

    class _NoTriton:
        """Stands in for `triton` and `triton.language` so the kernel files still import."""

        constexpr = None  # used only as an annotation

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

        def __getattr__(self, name):
            raise RuntimeError(f"triton is not installed (triton.{name})")

    triton = tl = _NoTriton()
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """True when the Triton kernels should run for these tensors (see the module docstring)."""
    if not HAS_TRITON or os.environ.get("FORGE_KERNELS", "").lower() == "off":
        return False
    if INTERPRET:
        return True
    return all(t.is_cuda for t in tensors if t is not None)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# Triton's largest block per program for the row-wise ops (one row of up to 64K elements in registers
# is what Liger and Unsloth use too; a wider row loops over blocks where the kernel supports it).
MAX_FUSED_SIZE = 65536


def row_warps(block: int) -> int:
    """num_warps for a kernel whose program handles one row of `block` elements."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs(device: torch.device) -> int:
    """How many persistent programs a grid-stride kernel launches: one per SM on a GPU, 4 in the interpreter."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls of an op run in: autocast's when it is on for x's device, else x's own."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def no_autocast(device: torch.device):
    """A context that turns autocast off, so ops that cast explicitly get exactly the dtypes they ask for."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()
