"""Ollama Modelfiles: chat template to Go template, stop tokens, parameters, validation."""

from .build import OLLAMA_ENGINE_ARCHITECTURES, BuiltModelfile, modelfile_for_gguf
from .chat_format import ChatFormat
from .gguf_info import GGUFChatInfo, read_gguf_chat_info
from .modelfile import Modelfile, ModelfileError, parse_modelfile, render_modelfile, validate
from .parameters import PARAMETER_TYPES, check_parameter
from .stops import StopTokenError, stop_tokens
from .translate import ChatTranslation, TemplateTranslationError, jinja_to_go_template, translate_chat_template

__all__ = [
    "OLLAMA_ENGINE_ARCHITECTURES",
    "PARAMETER_TYPES",
    "BuiltModelfile",
    "ChatFormat",
    "ChatTranslation",
    "GGUFChatInfo",
    "Modelfile",
    "ModelfileError",
    "StopTokenError",
    "TemplateTranslationError",
    "check_parameter",
    "jinja_to_go_template",
    "modelfile_for_gguf",
    "parse_modelfile",
    "read_gguf_chat_info",
    "render_modelfile",
    "stop_tokens",
    "translate_chat_template",
    "validate",
]
