"""Facts about a GGUF file read back from disk: architecture, file type, tensors, bits per weight."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf

from .errors import ConversionError


@dataclass(frozen=True)
class GGUFSummary:
    """What a GGUF file holds, as recorded in its own header."""

    architecture: str
    file_type: int  # llama.cpp's LLAMA_FTYPE value (general.file_type)
    tensor_count: int
    parameter_count: int
    size_bytes: int  # the whole file
    tensor_bytes: int  # tensor data only
    tensor_types: dict[str, int]  # GGML type name -> number of tensors

    @property
    def bits_per_weight(self) -> float:
        """Tensor data bits per parameter, the figure llama.cpp reports as BPW."""
        return 8 * self.tensor_bytes / self.parameter_count if self.parameter_count else 0.0


def read_gguf_summary(path: Path) -> GGUFSummary:
    """Read a GGUF file's header and tensor table (the tensor data is memory-mapped, not loaded)."""
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: not a readable GGUF file: {e}") from e
    arch = _field(reader, gguf.Keys.General.ARCHITECTURE, path)
    file_type = _field(reader, gguf.Keys.General.FILE_TYPE, path)
    tensors = reader.tensors
    return GGUFSummary(
        architecture=str(arch),
        file_type=int(file_type),
        tensor_count=len(tensors),
        parameter_count=sum(int(t.n_elements) for t in tensors),
        size_bytes=path.stat().st_size,
        tensor_bytes=sum(int(t.n_bytes) for t in tensors),
        tensor_types=dict(Counter(t.tensor_type.name for t in tensors)),
    )


def _field(reader: gguf.GGUFReader, key: str, path: Path) -> object:
    field = reader.get_field(key)
    if field is None:
        raise ConversionError(f"{path}: missing GGUF key {key!r}")
    return field.contents()
