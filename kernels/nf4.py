"""NF4 dequantization of bitsandbytes' packed 4-bit weights, double-quantized absmax included.

bitsandbytes' format (``bitsandbytes.functional.quantize_4bit``, ``Linear4bit``'s ``Params4bit``):

- the weight [out, in] is flattened row-major; element i belongs to block ``i // blocksize``;
- ``packed`` holds two 4-bit codes a byte: element 2j in the high nibble, 2j+1 in the low one
  (stored as uint8, or viewed as another ``quant_storage`` dtype: we reinterpret it as uint8);
- the value is ``code[nibble] * absmax[block]`` computed in fp32, then cast to the weight's dtype;
  ``code`` is the 16-entry NF4 table (FP4's table works the same way);
- double quantization (``compress_statistics=True``, ``quant_state.nested``): absmax itself is stored
  as uint8 codes of an 8-bit blockwise quantization with its own blocks of ``blocksize2`` (256):
  ``absmax[b] = code2[absmax_u8[b]] * absmax2[b // blocksize2] + offset``, in fp32.

The kernel does exactly those fp32 operations, so its result equals ``dequantize_4bit``'s bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._device import tl, triton, use_triton

# The NF4 table (bitsandbytes' ``get_4bit_type("nf4")``, the quantiles of N(0, 1) scaled to [-1, 1]).
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

ELEMENTS_PER_PROGRAM = 4096  # a program dequantizes this many elements (whole absmax blocks); 4 warps

# ----------------------------------------------------------------------------------------- Triton


@triton.jit
def _nf4_dequant_kernel(
    PACKED,
    ABSMAX,
    CODE,
    ABSMAX2,
    CODE2,
    OFFSET,
    OUT,
    n_bytes,
    n,
    n_blocks,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    ROWS: tl.constexpr,
):
    # ROWS absmax blocks a program, one a row: each block's scale is computed once, and the row's
    # BLOCKSIZE outputs (high nibble first, then low, byte by byte) are stored contiguously.
    blk = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    in_range = blk < n_blocks
    byte = blk[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    p = tl.load(PACKED + byte, mask=byte < n_bytes, other=0).to(tl.int32)
    v = tl.interleave(tl.load(CODE + (p >> 4)), tl.load(CODE + (p & 15)))  # [ROWS, BLOCKSIZE]
    if NESTED:
        q = tl.load(ABSMAX + blk, mask=in_range, other=0).to(tl.int32)
        scale = tl.load(CODE2 + q, mask=in_range, other=0.0) * tl.load(
            ABSMAX2 + blk // BLOCKSIZE2, mask=in_range, other=0.0
        )
        scale = scale + tl.load(OFFSET)
    else:
        scale = tl.load(ABSMAX + blk, mask=in_range, other=0.0)
    idx = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # flat element index
    tl.store(OUT + idx, (v * scale[:, None]).to(OUT.dtype.element_ty), mask=idx < n)


# ---------------------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class NF4Weight:
    """A frozen 4-bit weight in bitsandbytes' packed format, as plain tensors (see the module docstring).

    packed: uint8 (or any dtype, reinterpreted), ceil(numel / 2) bytes; absmax: fp32 [n_blocks], or uint8
    [n_blocks] when nested; shape: the weight's shape, (out, in); blocksize: elements per absmax;
    code: fp32 [16]; dtype: the dequantized dtype. Nested only: absmax2 fp32 [ceil(n_blocks / blocksize2)],
    code2 fp32 [256], offset fp32 (0-dim or [1]), blocksize2.
    dense: a dict its owner keeps across calls (None: none) in which `as_dense` leaves the dequantized
    weight for the next call, trading the dense weight's memory for the dequantization.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    blocksize: int
    code: torch.Tensor
    dtype: torch.dtype
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    blocksize2: int = 256
    dense: dict | None = field(default=None, compare=False, repr=False)

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state, dense: dict | None = None) -> NF4Weight:
        """From a ``Params4bit``'s data and its ``quant_state`` (``bitsandbytes.functional.QuantState``).

        Reads only attributes (absmax, shape, blocksize, code, dtype, nested, state2, offset): no import
        of bitsandbytes here. dense: see the class.
        """
        qs = quant_state
        dev = packed.device
        code = qs.code if getattr(qs, "code", None) is not None else torch.tensor(NF4_CODE)
        kw = {}
        if getattr(qs, "nested", False):
            off = qs.offset if torch.is_tensor(qs.offset) else torch.tensor(float(qs.offset))
            kw = dict(
                absmax2=qs.state2.absmax.to(dev, torch.float32).contiguous(),
                code2=qs.state2.code.to(dev, torch.float32).contiguous(),
                offset=off.to(dev, torch.float32).reshape(1),
                blocksize2=int(qs.state2.blocksize),
            )
        return cls(
            packed=packed,
            absmax=qs.absmax.to(dev).contiguous(),
            shape=tuple(qs.shape),
            blocksize=int(qs.blocksize),
            code=code.to(dev, torch.float32).contiguous(),
            dtype=qs.dtype,
            dense=dense,
            **kw,
        )

    @classmethod
    def from_linear4bit(cls, module, dense: dict | None = None) -> NF4Weight:
        """From a ``bitsandbytes.nn.Linear4bit`` (its ``weight`` and ``weight.quant_state``)."""
        return cls.from_bnb(module.weight.data, module.weight.quant_state, dense)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self, dtype)


# -------------------------------------------------------------------------------------- reference


def dequantize_nf4_reference(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The same arithmetic in plain PyTorch (as bitsandbytes' default backend does it)."""
    n = 1
    for s in w.shape:
        n *= s
    p = w.packed.reshape(-1).view(torch.uint8).long()
    nib = torch.stack((p >> 4, p & 15), dim=1).reshape(-1)[:n]
    absmax = w.absmax
    if w.nested:
        absmax = w.code2[absmax.long()] * w.absmax2.repeat_interleave(w.blocksize2)[: absmax.numel()]
        absmax = absmax + w.offset.reshape(())
    scale = absmax.float().repeat_interleave(w.blocksize)[:n]
    return (w.code[nib] * scale).reshape(w.shape).to(dtype or w.dtype)


# ----------------------------------------------------------------------------------------- public


def dequantize_nf4(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight, shape ``w.shape``, in ``dtype`` (default: the weight's own dtype). No autograd."""
    dtype = dtype or w.dtype
    if not use_triton(w.packed):
        return dequantize_nf4_reference(w, dtype)
    n = 1
    for s in w.shape:
        n *= s
    packed = w.packed.reshape(-1).view(torch.uint8)
    n_bytes = (n + 1) // 2
    out = torch.empty(w.shape, dtype=dtype, device=w.packed.device)
    if n == 0:
        return out
    nested = w.nested
    absmax2 = w.absmax2 if nested else w.absmax
    code2 = w.code2 if nested else w.code
    offset = w.offset if nested else w.code
    n_blocks = triton.cdiv(n, w.blocksize)
    rows = max(1, ELEMENTS_PER_PROGRAM // w.blocksize)
    _nf4_dequant_kernel[(triton.cdiv(n_blocks, rows),)](
        packed,
        w.absmax,
        w.code,
        absmax2,
        code2,
        offset,
        out,
        n_bytes,
        n,
        n_blocks,
        BLOCKSIZE=w.blocksize,
        BLOCKSIZE2=w.blocksize2,
        NESTED=nested,
        ROWS=rows,
        num_warps=4,
    )
    return out


def as_dense(weight, dtype: torch.dtype) -> torch.Tensor:
    """A frozen weight as a dense tensor in dtype: NF4Weight is dequantized (or taken from its `dense` dict,
    where the last call left it), a tensor cast (no copy if same)."""
    if not isinstance(weight, NF4Weight):
        return weight.to(dtype)
    if weight.dense is None:
        return dequantize_nf4(weight, dtype)
    # Keyed by the packed bytes' address, with those bytes held alive by the entry: a replaced weight can
    # never take that address while its predecessor is cached, so it is dequantized anew.
    key = (dtype, weight.packed.data_ptr())
    entry = weight.dense.get(key)
    if entry is None:
        weight.dense.clear()
        entry = weight.dense[key] = (weight.packed, dequantize_nf4(weight, dtype))
    return entry[1]
