"""Kernel tests run the Triton kernels: on a CUDA GPU when there is one, else in Triton's CPU interpreter.

TRITON_INTERPRET must be set before any kernel is decorated (at ``forge.kernels`` import), so it is set
here, at collection, and only when CUDA is unavailable: on a GPU the kernels compile for real.

Error measure, as the acceptance criteria state it: max|a - b| / max(1, max|ref|) ("max abs error relative
to scale"), for each output and each input gradient. Tolerances (the ``kc`` fixture's ``tol``):

- fp32: 1e-5, the criterion. Observed: <= 4e-7 (exactly 0 for NF4 dequantization and RoPE).
- bf16: 3e-2 against an fp32 reference on the same bf16-rounded inputs. bf16 keeps 8 significant bits (one
  rounding is up to 2^-8 = 3.9e-3 relative), outputs round once or twice, and Triton's interpreter
  truncates fp32 -> bf16 instead of rounding to nearest (up to 2^-7): a few ulps fit in 3e-2, while a
  real error (a wrong term, sign or scale) is far above it.
"""

import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max|a - ref| / max(1, max|ref|)."""
    a, ref = a.detach().float(), ref.detach().float()
    assert a.shape == ref.shape, (a.shape, ref.shape)
    if ref.numel() == 0:
        return 0.0
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


def assert_close(a: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    e = rel_err(a, ref)
    assert e < tol, f"{what}: max|a-b|/max(1,max|ref|) = {e:.3g} >= {tol:g}"


def grads(out, inputs, grad_out):
    """Gradients of sum(out * grad_out) with respect to inputs (out and grad_out may be sequences)."""
    if isinstance(out, (tuple, list)):
        loss = sum((o.float() * g.float()).sum() for o, g in zip(out, grad_out, strict=True))
    else:
        loss = (out.float() * grad_out.float()).sum()
    return torch.autograd.grad(loss, inputs)


@pytest.fixture
def kc():
    """The kernel tests' shared checks: device, tol, rel_err, assert_close, grads."""
    return SimpleNamespace(device=DEVICE, tol=TOL, rel_err=rel_err, assert_close=assert_close, grads=grads)


@pytest.fixture(autouse=True)
def _triton_path_is_live():
    """Fail loudly, rather than compare the reference with itself, when the Triton path cannot run."""
    from forge.kernels._device import HAS_TRITON, INTERPRET, use_triton

    if not HAS_TRITON:
        pytest.fail("triton is not installed")
    if not use_triton(torch.empty(0, device=DEVICE)):
        pytest.fail(
            f"Triton path inactive (INTERPRET={INTERPRET}, FORGE_KERNELS={os.environ.get('FORGE_KERNELS')!r}): "
            "forge.kernels was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1"
        )
    yield
