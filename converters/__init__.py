"""Hugging Face safetensors to GGUF: architectures, tensor names, tokenizer, quantization."""

from .adapter import AdapterConvertResult, convert_lora_to_gguf
from .architectures import SUPPORTED_ARCHITECTURES
from .convert import ConvertResult, convert_hf_to_gguf
from .errors import ConversionError
from .gguf_stats import GGUFSummary, read_gguf_summary
from .quantize import QUANT_TYPES, QuantizeResult, quantize_gguf

__all__ = [
    "QUANT_TYPES",
    "SUPPORTED_ARCHITECTURES",
    "AdapterConvertResult",
    "ConversionError",
    "ConvertResult",
    "GGUFSummary",
    "QuantizeResult",
    "convert_hf_to_gguf",
    "convert_lora_to_gguf",
    "quantize_gguf",
    "read_gguf_summary",
]
