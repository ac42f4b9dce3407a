"""Plan the GGUF tensors of a model (names, shapes, types) and produce each one's data on demand."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import gguf
import numpy as np
import torch

from .architectures import GLOBAL_TENSORS
from .errors import ConversionError
from .hf_config import ModelConfig
from .hparams import rope_dimensions
from .rope import check_rope_type, llama3_rope_factors
from .safetensors_io import StoredTensor

Q = gguf.GGMLQuantizationType
T = gguf.MODEL_TENSOR
OUT_TYPES = {"f16": Q.F16, "bf16": Q.BF16, "f32": Q.F32}
FILE_TYPES = {
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "f32": gguf.LlamaFileType.ALL_F32,
}
BLOCK_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
ITEM_BYTES = {Q.F32: 4, Q.F16: 2, Q.BF16: 2}
CONVERT_CHUNK = 1 << 24  # elements converted at a time (32 MiB of 16-bit output)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some checkpoints save; recomputed by llama.cpp


@dataclass
class PlannedTensor:
    """One tensor of the output file: its GGUF name, shape, type, and where its data comes from."""

    name: str
    shape: tuple[int, ...]
    ggml_type: gguf.GGMLQuantizationType
    source: StoredTensor | None = None
    constant: torch.Tensor | None = None  # generated tensors (rope factors)
    permute_heads: int = 0  # >0: Q/K rows from rotate-half to interleaved order, this many heads
    norm_offset: float = 0.0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEM_BYTES[self.ggml_type]

    @property
    def numpy_dtype(self) -> type:
        """The numpy dtype GGUFWriter records the tensor as (bf16 travels as raw 16-bit words)."""
        return {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.uint16}[self.ggml_type]

    def numpy(self) -> np.ndarray:
        """The tensor's data in its output type, ready for the file (loads only this tensor).

        16-bit outputs are converted chunk by chunk into one preallocated tensor, so the peak is the source
        tensor plus its converted copy; a source already in the output type is passed through as read.
        """
        data = self.constant if self.constant is not None else self.source.read()
        if self.permute_heads:
            data = _rotate_half_to_interleaved(data, self.permute_heads)
        if self.norm_offset:
            data = data.to(torch.float32) + self.norm_offset
        if self.ggml_type == Q.F32:
            return data.to(torch.float32).numpy()
        dtype = torch.bfloat16 if self.ggml_type == Q.BF16 else torch.float16
        out = data if data.dtype == dtype else self._convert(data, dtype)
        return out.view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16 else out.numpy()

    def _convert(self, data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(data.shape, dtype=dtype)
        src, dst = data.reshape(-1), out.view(-1)
        for start in range(0, src.numel(), CONVERT_CHUNK):
            chunk = dst[start : start + CONVERT_CHUNK]
            chunk.copy_(src[start : start + CONVERT_CHUNK])
            if dtype == torch.float16 and torch.isinf(chunk).any():
                raise ConversionError(
                    f"{self.source.file if self.source else self.name}: tensor {self.name!r} has values beyond "
                    "float16's range; convert with out_type='bf16'"
                )
        return out


def plan_tensors(cfg: ModelConfig, stored: dict[str, StoredTensor], out_type: str) -> list[PlannedTensor]:
    """Every tensor the GGUF file will hold, in file order, checked against the architecture's tables."""
    spec = cfg.spec
    weight_type = OUT_TYPES[out_type]
    planned: list[tuple[tuple[int, str], PlannedTensor]] = []
    layers: dict[int | None, set[str]] = {}  # layer (None: not in a layer) -> GGUF names within it
    for hf_name, source in stored.items():
        name = _text_model_name(hf_name, spec.text_prefixes, spec.skip_prefixes)
        if name is None or name.endswith(IGNORED_SUFFIXES):
            continue
        base, dot, suffix = name.rpartition(".")
        match = BLOCK_NAME.match(base)
        bid = int(match.group(1)) if match else None
        kind = spec.block_tensors.get(match.group(2)) if match else GLOBAL_TENSORS.get(base)
        if kind is None or suffix not in ("weight", "bias"):
            raise ConversionError(
                f"{source.file}: tensor {hf_name!r} has no GGUF name for {cfg.architecture} "
                f"(known per-layer modules: {', '.join(spec.block_tensors)})"
            )
        if kind == T.OUTPUT and not spec.has_output_tensor and not cfg.tie_word_embeddings:
            raise ConversionError(
                f"{cfg.path}: tie_word_embeddings is false, but llama.cpp's {spec.arch_name} always uses the "
                "token embedding as the output layer"
            )
        if kind == T.OUTPUT and (cfg.tie_word_embeddings or not spec.has_output_tensor):
            continue  # llama.cpp reuses token_embd
        if bid is not None and bid >= cfg.n_layers:
            raise ConversionError(f"{source.file}: tensor {hf_name!r} is beyond num_hidden_layers={cfg.n_layers}")
        tensor = PlannedTensor(
            name=gguf.TENSOR_NAMES[kind].format(bid=bid) + dot + suffix,
            shape=source.shape,
            ggml_type=weight_type if len(source.shape) >= 2 else Q.F32,
            source=source,
        )
        if spec.permute_qk and kind in (T.ATTN_Q, T.ATTN_K):
            tensor.permute_heads = cfg.n_heads if kind == T.ATTN_Q else cfg.n_kv_heads
            if source.shape[0] % (2 * tensor.permute_heads):
                raise ConversionError(
                    f"{source.file}: tensor {hf_name!r} has {source.shape[0]} rows, not a whole number of "
                    f"{tensor.permute_heads} heads of even size"
                )
        if spec.norm_offset and base.endswith("norm") and suffix == "weight":
            tensor.norm_offset = spec.norm_offset
        order = bid if bid is not None else (-1 if kind == T.TOKEN_EMBD else cfg.n_layers)
        planned.append(((order, tensor.name), tensor))
        layers.setdefault(bid, set()).add(tensor.name if bid is None else tensor.name.split(".", 2)[2])
    if gguf.TENSOR_NAMES[T.TOKEN_EMBD] + ".weight" not in layers.get(None, set()):
        raise ConversionError(f"{cfg.path.parent}: no token embedding (model.embed_tokens.weight) in the weights")
    _check_layers_complete(layers, cfg)
    planned += [((-1, t.name), t) for t in _rope_factor_tensors(cfg)]
    return [t for _, t in sorted(planned, key=lambda item: item[0])]


def _check_layers_complete(layers: dict[int | None, set[str]], cfg: ModelConfig) -> None:
    """Every layer holds the same tensors as layer 0 (a missing shard or tensor fails here, not in llama.cpp)."""
    first = layers.get(0, set())
    for bid in range(cfg.n_layers):
        missing = first - layers.get(bid, set())
        if not first or missing:
            raise ConversionError(
                f"{cfg.path.parent}: layer {bid} of {cfg.n_layers} lacks {sorted(missing) or 'all its tensors'} "
                "in the safetensors weights"
            )


def _text_model_name(name: str, text_prefixes: tuple[str, ...], skip_prefixes: tuple[str, ...]) -> str | None:
    if name.startswith(skip_prefixes):
        return None
    for prefix in text_prefixes:
        if name.startswith(prefix):
            return "model." + name[len(prefix) :]
    return name


def _rope_factor_tensors(cfg: ModelConfig) -> list[PlannedTensor]:
    rope = cfg.rope_full
    rope_type = check_rope_type(rope, str(cfg.path))
    if rope_type == "llama3":
        factors = llama3_rope_factors(rope, cfg.head_dim)
        return [
            PlannedTensor(gguf.TENSOR_NAMES[T.ROPE_FREQS] + ".weight", tuple(factors.shape), Q.F32, constant=factors)
        ]
    if rope_type == "longrope":
        half = rope_dimensions(cfg) // 2
        out = []
        for kind, key in ((T.ROPE_FACTORS_LONG, "long_factor"), (T.ROPE_FACTORS_SHORT, "short_factor")):
            values = rope.get(key)
            if not values or len(values) != half:
                raise ConversionError(f"{cfg.path}: longrope needs {key} with {half} values (rotary dims / 2)")
            factors = torch.tensor(values, dtype=torch.float32)
            out.append(PlannedTensor(gguf.TENSOR_NAMES[kind] + ".weight", (half,), Q.F32, constant=factors))
        return out
    return []


def _rotate_half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from HF's [first halves | second halves] to llama.cpp's adjacent pairs."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
