"""Build the Modelfile for a GGUF: translated template, stop tokens, system prompt, parameters, license."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .gguf_info import GGUFChatInfo, read_gguf_chat_info
from .modelfile import Modelfile, ModelfileError, render_modelfile, validate
from .parameters import check_parameter
from .stops import stop_tokens
from .translate import ChatTranslation, TemplateTranslationError, translate_chat_template

# GGUF architectures Ollama runs on its own engine instead of llama.cpp (Ollama's OllamaEngineRequired list);
# that engine refuses an ADAPTER when the model loads ("loras are not yet implemented").
OLLAMA_ENGINE_ARCHITECTURES = frozenset({
    "bert", "deepseek2", "deepseekocr", "gemma3", "gemma3n", "gemma4", "gptoss", "gpt-oss", "llama4", "mistral3",
    "mllama", "nomic-bert", "olmo3", "qwen25vl", "qwen3", "qwen3moe", "qwen35", "qwen35moe", "qwen3next", "qwen3vl",
    "qwen3vlmoe", "glm4moelite", "glmocr", "lfm2", "lfm2moe",
})


@dataclass(frozen=True)
class BuiltModelfile:
    """A Modelfile, its validated text, and the translation it came from (None for an overridden template)."""

    modelfile: Modelfile
    text: str
    translation: ChatTranslation | None


def _header(translation: ChatTranslation | None) -> list[str]:
    lines = ["Written by Forge."]
    if translation is None:
        lines.append("TEMPLATE: from the config (ollama.template), used as given.")
        return lines
    lines.append("TEMPLATE: translated from the GGUF's chat template and checked against it.")
    if translation.leading_bos:
        lines.append(f"llama.cpp adds {translation.leading_bos} itself (add_bos_token), so TEMPLATE leaves it out.")
    return lines


def modelfile_for_gguf(gguf: str | Path, *, model: str, system: str | None = None,
                       parameters: Mapping[str, object] | None = None, license: str | None = None,
                       template: str | None = None, adapter: str | None = None,
                       info: GGUFChatInfo | None = None) -> BuiltModelfile:
    """The Modelfile serving gguf as `FROM model` (a path relative to the Modelfile, e.g. ./model-q4_k_m.gguf).

    With adapter (e.g. ./adapter.gguf) gguf is the base model and the LoRA GGUF is applied over it; refused for
    architectures Ollama runs on its own engine, which does not load adapters (OLLAMA_ENGINE_ARCHITECTURES).
    template overrides the translation of the GGUF's chat template; stop tokens always come from the
    GGUF's chat template and vocabulary. parameters are user PARAMETERs (temperature, top_p, …) checked by
    name and type. info saves reading the GGUF again. Raises TemplateTranslationError, StopTokenError,
    ModelfileError or ValueError with a one-line reason.
    """
    info = info or read_gguf_chat_info(gguf)
    if adapter is not None and info.architecture in OLLAMA_ENGINE_ARCHITECTURES:
        raise ModelfileError(f"Ollama runs {info.architecture} models on its own engine, which does not load LoRA "
                             "adapters (\"loras are not yet implemented\"); use the merged GGUF", source=str(gguf))
    if info.chat_template is None:
        raise TemplateTranslationError(f"{gguf}: the GGUF has no tokenizer.chat_template to take the chat format "
                                       "and its stop tokens from")
    translation = None
    if template is None:
        translation = translate_chat_template(info.chat_template, bos_token=info.bos_token,
                                              eos_token=info.eos_token, add_bos_token=info.add_bos_token,
                                              variables=info.template_variables)
        template = translation.go_template
    if system is not None and translation is not None and not translation.accepts_system:
        raise TemplateTranslationError(f"{gguf}: the chat template does not accept a system message, so SYSTEM "
                                       "cannot be set; remove the system prompt or set ollama.template")
    stops = stop_tokens(info.chat_template, info.special_tokens, bos_token=info.bos_token,
                        eos_token=info.eos_token, variables=info.template_variables)
    user_parameters = []
    for name, value in (parameters or {}).items():
        if name == "stop":
            raise ValueError("parameter 'stop' is derived from the chat template and cannot be set")
        user_parameters.append((name, check_parameter(name, value)))
    mf = Modelfile(model=model, adapter=adapter, template=template, system=system,
                   parameters=(*(("stop", s) for s in stops), *user_parameters),
                   licenses=(license,) if license else ())
    text = render_modelfile(mf, header=_header(translation))
    validate(text)
    return BuiltModelfile(modelfile=mf, text=text, translation=translation)
