"""NF4 dequantization against bitsandbytes' own quantize_4bit / dequantize_4bit (real bitsandbytes)."""

import pytest
import torch
from forge.kernels import NF4Weight, as_dense, dequantize_nf4, dequantize_nf4_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

bnbf = pytest.importorskip("bitsandbytes.functional")


def _quantize(shape, dtype, blocksize, nested, quant_type="nf4", seed=0):
    torch.manual_seed(seed)
    w = torch.randn(shape, device=DEVICE).to(dtype)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    return packed, state


@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "plain-absmax"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nf4_matches_bitsandbytes(kc, nested, blocksize, dtype):
    # 96 x 200 = 19200 elements: 300 blocks of 64 (2 double-quant blocks of 256, the last ragged), 5 programs
    packed, state = _quantize((96, 200), dtype, blocksize, nested)
    assert bool(state.nested) == nested
    expected = bnbf.dequantize_4bit(packed, state)
    w = NF4Weight.from_bnb(packed, state)
    got = dequantize_nf4(w)
    ref = dequantize_nf4_reference(w)
    assert got.shape == expected.shape == (96, 200) and got.dtype == expected.dtype == dtype
    # fp32: the same fp32 operations as bitsandbytes (observed bit-exact); bf16: one final rounding,
    # which Triton's interpreter truncates instead of rounding to nearest (one bf16 ulp, 2^-7 relative)
    tol = 1e-6 if dtype == torch.float32 else 2**-7 + 1e-6
    kc.assert_close(got, expected, tol, "kernel vs bitsandbytes")
    kc.assert_close(ref, expected, 1e-6 if dtype == torch.float32 else 2**-7 + 1e-6, "reference vs bitsandbytes")


def test_nf4_fp32_is_bit_exact(kc):
    # Shapes here avoid one bitsandbytes 0.50 CPU bug: its native CPU dequantize (not its quantize, not its
    # CUDA or pure-PyTorch backends) misplaces blocks for some row lengths, e.g. (64, 96) with blocksize 64;
    # there we match bitsandbytes' own PyTorch backend, which round-trips correctly.
    packed, state = _quantize((64, 128), torch.float32, 64, True, seed=1)
    got = dequantize_nf4(NF4Weight.from_bnb(packed, state))
    expected = bnbf.dequantize_4bit(packed, state)
    if got.is_cuda:
        # bitsandbytes' CUDA kernel rounds the double-quantized absmax differently (FMA): on an H200, 336 of
        # 8192 values differed, by at most 1.8e-7 relative (about one fp32 ulp)
        torch.testing.assert_close(got, expected, rtol=2**-22, atol=0)
    else:
        assert torch.equal(got, expected)


def test_nf4_ragged_sizes_and_other_dtypes(kc):
    """Odd element counts (a half-used last byte, a partial last block) and a cast to another dtype."""
    packed, state = _quantize((7, 45), torch.float32, 64, True, seed=2)  # 315 elements
    w = NF4Weight.from_bnb(packed, state)
    expected = bnbf.dequantize_4bit(packed, state)
    kc.assert_close(dequantize_nf4(w), expected, 1e-6, "ragged")
    kc.assert_close(dequantize_nf4(w, torch.bfloat16), expected, 2**-7 + 1e-6, "ragged -> bf16")
    kc.assert_close(as_dense(w, torch.float32), expected, 1e-6, "as_dense")


def test_fp4_table_works_too(kc):
    packed, state = _quantize((32, 64), torch.float32, 64, True, quant_type="fp4", seed=3)
    w = NF4Weight.from_bnb(packed, state)
    kc.assert_close(dequantize_nf4(w), bnbf.dequantize_4bit(packed, state, quant_type="fp4"), 1e-6, "fp4")


def test_nf4_from_linear4bit(kc):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(4)
    lin = torch.nn.Linear(64, 32, bias=False)
    q = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(
        lin.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True
    )
    q = q.to(DEVICE)
    w = NF4Weight.from_linear4bit(q)
    expected = bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state)
    kc.assert_close(dequantize_nf4(w), expected, 1e-6, "Linear4bit")


def test_nf4_falls_back_without_triton(kc, monkeypatch):
    packed, state = _quantize((16, 64), torch.float32, 64, True, seed=5)
    monkeypatch.setenv("FORGE_KERNELS", "off")
    kc.assert_close(dequantize_nf4(NF4Weight.from_bnb(packed, state)), bnbf.dequantize_4bit(packed, state), 1e-6)


def test_as_dense_keeps_the_dequantized_weight_in_the_owners_dict():
    """With a `dense` dict, the weight is dequantized once per dtype and packed tensor: later calls return
    that very tensor; another dtype or a replaced packed tensor dequantizes anew (and the old copy goes)."""
    packed, state = _quantize((32, 64), torch.float32, 64, True, seed=3)
    kept: dict = {}
    w = NF4Weight.from_bnb(packed, state, dense=kept)
    first = as_dense(w, torch.bfloat16)
    assert torch.equal(first, dequantize_nf4(w, torch.bfloat16))
    assert as_dense(NF4Weight.from_bnb(packed, state, dense=kept), torch.bfloat16) is first  # a new view, one dict
    assert torch.equal(as_dense(w, torch.float32), dequantize_nf4(w, torch.float32)) and len(kept) == 1
    packed2, state2 = _quantize((32, 64), torch.float32, 64, True, seed=4)
    replaced = as_dense(NF4Weight.from_bnb(packed2, state2, dense=kept), torch.float32)
    assert torch.equal(replaced, dequantize_nf4(NF4Weight.from_bnb(packed2, state2), torch.float32))
    assert not torch.equal(replaced, as_dense(w, torch.float32))
    assert as_dense(NF4Weight.from_bnb(packed, state), torch.bfloat16) is not first  # no dict: dequantized each call
