"""Hugging Face safetensors to GGUF: architectures, tensor names, tokenizer, quantization."""

from .architectures import SUPPORTED_ARCHITECTURES
from .convert import ConvertResult, convert_hf_to_gguf
from .errors import ConversionError

__all__ = ["SUPPORTED_ARCHITECTURES", "ConversionError", "ConvertResult", "convert_hf_to_gguf"]
