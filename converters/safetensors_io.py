"""Index the safetensors shards of an HF folder and read one tensor at a time, without memory-mapping.

Reading each tensor's bytes with a plain file read keeps the resident memory to the tensor being
converted; a memory map would count every page touched so far as resident until the shard is closed.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConversionError

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes live."""

    name: str
    file: Path
    dtype: str  # safetensors dtype code: F32, F16, BF16
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    def read(self) -> torch.Tensor:
        """Load this tensor (a fresh CPU tensor owning its memory)."""
        buffer = bytearray(self.nbytes)
        with open(self.file, "rb") as f:
            f.seek(self.offset)
            if f.readinto(buffer) != self.nbytes:
                raise ConversionError(f"{self.file}: tensor {self.name!r} is truncated")
        if self.nbytes == 0:
            return torch.empty(self.shape, dtype=DTYPES[self.dtype])
        return torch.frombuffer(buffer, dtype=DTYPES[self.dtype]).reshape(self.shape)


def index_safetensors(hf_dir: Path) -> dict[str, StoredTensor]:
    """All tensors of the folder's safetensors files (sharded or not), by name."""
    index_file = hf_dir / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text(encoding="utf-8")).get("weight_map", {})
        files = sorted({hf_dir / f for f in weight_map.values()})
    else:
        files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{hf_dir}: no *.safetensors weights found")
    tensors: dict[str, StoredTensor] = {}
    for file in files:
        for t in _read_header(file):
            if t.name in tensors:
                raise ConversionError(f"{file}: tensor {t.name!r} also stored in {tensors[t.name].file.name}")
            tensors[t.name] = t
    return tensors


def _read_header(file: Path) -> list[StoredTensor]:
    if not file.is_file():
        raise ConversionError(f"{file}: listed in the safetensors index but missing")
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{file}: unreadable safetensors header: {e}") from e
    data_start = 8 + header_len
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise ConversionError(
                f"{file}: tensor {name!r} is {info['dtype']}; the GGUF converter takes F32/F16/BF16 weights "
                "(merge and dequantize first)"
            )
        begin, end = info["data_offsets"]
        out.append(StoredTensor(name, file, info["dtype"], tuple(info["shape"]), data_start + begin, end - begin))
    return out
