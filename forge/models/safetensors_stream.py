"""Write a safetensors file one tensor at a time: the header is planned from shapes and dtypes up front."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

CODES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int32: "I32",
    torch.int64: "I64",
}


def write_streaming(
    path: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], tensors: Iterator[torch.Tensor]
) -> None:
    """Write `path` holding the planned (name, dtype, shape) tensors, taken one by one from `tensors`.

    Only one tensor is in memory at a time; each produced tensor must match its plan exactly.
    """
    header: dict[str, dict] = {}
    offset = 0
    for name, dtype, shape in plan:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (name, dtype, shape), tensor in zip(plan, tensors, strict=True):
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(
                    f"{path}: tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {shape}"
                )
            f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
