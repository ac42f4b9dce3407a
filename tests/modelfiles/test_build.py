"""Modelfiles built from GGUF files: validated, and their TEMPLATE, read back from the file, renders like HF."""

from __future__ import annotations

import dataclasses
import re

import pytest
from forge.modelfiles import (
    ModelfileError,
    TemplateTranslationError,
    modelfile_for_gguf,
    parse_modelfile,
    read_gguf_chat_info,
    validate,
)
from transformers import AutoTokenizer

PARAMETERS = {"temperature": 0.6, "top_p": 0.9, "top_k": 40, "num_ctx": 4096, "repeat_penalty": 1.1, "seed": 7,
              "num_predict": 256, "min_p": 0.05}


def assert_file_renders_like(go_render, text: str, hf, convs, leading_bos: str) -> None:
    """The TEMPLATE and SYSTEM as Ollama reads them from the file render each conversation as HF does."""
    mf = parse_modelfile(text)
    system = mf.system or ""
    expected = [hf.apply_chat_template(([{"role": "system", "content": system}] if system else []) + c,
                                       tokenize=False, add_generation_prompt=True) for c in convs]
    results = go_render(mf.template, convs, system=system)
    assert [leading_bos + r["output"] for r in results] == expected
    assert not any(r["error"] for r in results)


def test_modelfile_of_each_family_gguf(family, tmp_path, go_render) -> None:
    gguf = family.write_gguf(tmp_path / "model-q4_k_m.gguf")
    system = "You are Forge's test model.\nBe brief." if family.accepts_system else None
    built = modelfile_for_gguf(gguf, model="./model-q4_k_m.gguf", system=system, parameters=PARAMETERS,
                               license="Apache-2.0")
    mf = validate(built.text)
    assert mf == built.modelfile
    assert built.text.startswith("# Written by Forge.\n")
    assert "\nFROM ./model-q4_k_m.gguf\n" in built.text
    assert mf.stops == list(family.stop)
    assert dict(p for p in mf.parameters if p[0] != "stop") == PARAMETERS
    assert (mf.system, mf.licenses, mf.adapter) == (system, ("Apache-2.0",), None)
    convs = [c for c in family.conversations() if c[0]["role"] != "system"]
    assert_file_renders_like(go_render, built.text, family.tokenizer(), convs, built.translation.leading_bos)


def test_modelfile_of_the_real_smollm2_gguf(smollm2_gguf, smollm2_chat_info, smollm2_hf_dir, families,
                                            go_render) -> None:
    built = modelfile_for_gguf(smollm2_gguf, model=f"./{smollm2_gguf.name}", info=smollm2_chat_info)
    mf = validate(built.text)
    assert mf.stops == ["<|im_end|>"] and mf.system is None
    assert built.translation.default_system.startswith("You are a helpful AI assistant named SmolLM")
    hf = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    assert_file_renders_like(go_render, built.text, hf, families["chatml"].conversations(), "")


def test_adapter_mode_puts_the_lora_over_the_exact_base(families, tmp_path) -> None:
    base = families["llama3"].write_gguf(tmp_path / "base-f16.gguf")
    built = modelfile_for_gguf(base, model="./base-f16.gguf", adapter="./adapter-f16.gguf")
    assert built.text.splitlines()[3:5] == ["FROM ./base-f16.gguf", "ADAPTER ./adapter-f16.gguf"]
    assert validate(built.text).adapter == "./adapter-f16.gguf"


def test_adapter_mode_is_refused_where_ollama_cannot_load_adapters(families, tmp_path) -> None:
    base = families["chatml"].write_gguf(tmp_path / "base-f16.gguf")
    info = read_gguf_chat_info(base)
    assert info.architecture == "llama"
    qwen3 = dataclasses.replace(info, architecture="qwen3")  # Ollama runs qwen3 on its own engine
    with pytest.raises(ModelfileError, match=r"runs qwen3 models on its own engine, .* use the merged GGUF"):
        modelfile_for_gguf(base, model="./base-f16.gguf", adapter="./adapter-f16.gguf", info=qwen3)
    assert modelfile_for_gguf(base, model="./model-q4_k_m.gguf", info=qwen3).modelfile.adapter is None


def test_system_prompt_is_refused_when_the_template_refuses_system_messages(families, tmp_path) -> None:
    gguf = families["mistral"].write_gguf(tmp_path / "model.gguf")
    with pytest.raises(TemplateTranslationError, match="does not accept a system message"):
        modelfile_for_gguf(gguf, model="./model.gguf", system="Be brief.")


def test_template_override_is_used_as_given_with_the_derived_stops(families, tmp_path) -> None:
    gguf = families["phi3"].write_gguf(tmp_path / "model.gguf")
    override = "{{ range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n"
    built = modelfile_for_gguf(gguf, model="./model.gguf", template=override)
    assert built.translation is None
    assert built.modelfile.template == override and built.modelfile.stops == ["<|end|>"]
    assert "ollama.template" in built.text


@pytest.mark.parametrize(("parameters", "reason"), [
    ({"stop": "</s>"}, "parameter 'stop' is derived from the chat template"),
    ({"temperature": "warm"}, "parameter 'temperature' takes a number, got 'warm'"),
    ({"mirostat": 2}, "parameter 'mirostat' is deprecated"),
])
def test_bad_user_parameters_are_refused_by_name(parameters, reason, families, tmp_path) -> None:
    gguf = families["chatml"].write_gguf(tmp_path / "model.gguf")
    with pytest.raises(ValueError, match=re.escape(reason)):
        modelfile_for_gguf(gguf, model="./model.gguf", parameters=parameters)


def test_gguf_without_a_chat_template_is_refused(families, tmp_path) -> None:
    gguf = families["chatml"].write_gguf(tmp_path / "model.gguf")
    info = read_gguf_chat_info(gguf)
    bare = type(info)(None, info.add_bos_token, info.special_tokens, info.template_variables)
    with pytest.raises(TemplateTranslationError, match="has no tokenizer.chat_template"):
        modelfile_for_gguf(gguf, model="./model.gguf", info=bare)


def _line_of(text: str, prefix: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith(prefix))


def test_a_hand_broken_generated_modelfile_fails_with_the_line_and_reason(families, tmp_path) -> None:
    gguf = families["gemma"].write_gguf(tmp_path / "model.gguf")
    text = modelfile_for_gguf(gguf, model="./model.gguf", parameters={"temperature": 0.6}).text
    breaks = [
        (text.replace("PARAMETER temperature 0.6", "PARAMETER temperature warm"),
         _line_of(text, "PARAMETER temperature"), "parameter 'temperature' takes a number, got 'warm'"),
        (text.replace('{{- end }}"""', "{{- end }}"), _line_of(text, "TEMPLATE"),
         "TEMPLATE opens a quote that is never closed"),
        (text.replace("PARAMETER stop", "PARAMETER stopp"), _line_of(text, "PARAMETER stop"),
         "unknown parameter 'stopp'"),
        (text.replace("FROM ./model.gguf\n", "FROM ./model.gguf\nFROM ./other.gguf\n"), _line_of(text, "FROM") + 1,
         "a second FROM"),
        (text.replace("FROM ./model.gguf\n", ""), None, "no FROM instruction"),
    ]
    for broken, line, reason in breaks:
        assert broken != text
        with pytest.raises(ModelfileError) as error:
            validate(broken)
        assert (error.value.line, reason in error.value.reason) == (line, True), str(error.value)
