"""Modelfiles are written so that Ollama's grammar reads back exactly what was meant, and bad ones are named."""

from __future__ import annotations

import pytest
from forge.modelfiles import Modelfile, ModelfileError, parse_modelfile, render_modelfile, validate

TRICKY_TEMPLATE = (
    '"{{- range .Messages }}{{ "<|im_start|>" }}{{ .Role }}\n'
    "{{ .Content }}{{ \"<|im_end|>\\n\" }}\n{{- end }}}}\"\" ' \\ \t end with a quote\""
)


def test_everything_written_reads_back_exactly() -> None:
    mf = Modelfile(
        model="./model-q4_k_m.gguf",
        adapter="./adapter lora.gguf",
        template=TRICKY_TEMPLATE,
        system='  Be "brief".\nAnswer in French. # not a comment\n',
        parameters=(("stop", "<|im_end|>"), ("stop", '"quoted"'), ("temperature", 0.7), ("num_ctx", 4096),
                    ("use_mmap", False), ("min_p", 1e-05)),
        licenses=("Apache License\n  Version 2.0", "MIT"),
        messages=(("user", "Hi"), ("assistant", "Hello!\n")),
        requires="0.6.0",
    )
    text = render_modelfile(mf, header=["Written by a test."])
    assert parse_modelfile(text) == mf
    lines = text.splitlines()
    assert lines[:3] == ["# Written by a test.", "FROM ./model-q4_k_m.gguf", 'ADAPTER "./adapter lora.gguf"']
    assert 'PARAMETER stop "<|im_end|>"' in lines and "PARAMETER temperature 0.7" in lines
    assert "PARAMETER use_mmap false" in lines


def test_ollama_grammar_is_followed() -> None:
    text = (
        "\ufeff# a comment line\n"
        "from ./m.gguf\n"
        "  # indented comment\n"
        'template """{{ .Prompt }}"""\n'
        "Parameter\tstop \"<|im_end|>\"\n"
        "PARAMETER stop </s>   \n"
        'SYSTEM "two\n'
        'lines with # and ""quotes"""\n'
        "license MIT # license text, not a comment\n"
        'MESSAGE user """hi"""\n'
    )
    assert parse_modelfile(text) == Modelfile(
        model="./m.gguf", template="{{ .Prompt }}", system='two\nlines with # and ""quotes""',
        parameters=(("stop", "<|im_end|>"), ("stop", "</s>")), licenses=("MIT # license text, not a comment",),
        messages=(("user", "hi"),))


def test_windows_line_endings_and_empty_values() -> None:
    mf = parse_modelfile('FROM m\r\nSYSTEM """"""\r\nTEMPLATE """a\r\nb"""\r\n')
    assert (mf.model, mf.system, mf.template) == ("m", "", "a\r\nb")


@pytest.mark.parametrize(("text", "line", "reason"), [
    ("FROM m\nPARAMETER temperature hot\n", 2, "parameter 'temperature' takes a number, got 'hot'"),
    ("FROM m\nPARAMETER temprature 0.7\n", 2, "unknown parameter 'temprature'"),
    ("FROM m\nPARAMETER mirostat 1\n", 2, "parameter 'mirostat' is deprecated"),
    ("FROM m\n\nPARAMETER num_ctx 4096\nPARAMETER num_ctx 8192\n", 4, "set again (first on line 3)"),
    ('FROM m\nTEMPLATE """{{ .Prompt }}\nSYSTEM x\n', 2, "TEMPLATE opens a quote that is never closed"),
    ('FROM m\nSYSTEM "a\nb\n', 2, "SYSTEM opens a quote that is never closed"),
    ("SYSTEM hi\n", None, "no FROM instruction"),
    ("FROM m\nSYSTEM a\n# x\nSYSTEM b\n", 4, "a second SYSTEM (first on line 2)"),
    ('FROM m\nSYSTEM """one\nnon\u00a0breaking"""\n', 3, "SYSTEM contains U+00A0"),
    ("FROM m\nPARAMETER stop\n", 2, "PARAMETER takes a parameter name after exactly one space"),
    ("FROM m\nPARAMETER  top_k 5\n", 2, "PARAMETER takes a parameter name after exactly one space"),
    ("FROM m\nPARAMETER top-k 5\n", 2, "PARAMETER takes a parameter name after exactly one space"),
    ("FROM m\nMESSAGE bot hi\n", 2, "MESSAGE role must be one of system, user, assistant, got 'bot'"),
    ("FROM m\n\n\nFROB x\n", 4, "unknown instruction 'FROB'"),
    ("FROM m\n= x\n", 2, "unknown instruction '='"),
    ("FROM\n", 1, "FROM must be followed by a space and a value"),
    ("FROM \nSYSTEM x\n", 1, "FROM needs a value"),
    ("FROM m\nREQUIRES latest\n", 2, "REQUIRES takes a version"),
    ("FROM m\nRENDERER qwen3\n", 2, "RENDERER is valid for Ollama but not supported by Forge"),
])
def test_broken_modelfiles_name_the_line_and_the_reason(text: str, line: int | None, reason: str) -> None:
    with pytest.raises(ModelfileError) as error:
        parse_modelfile(text, source="runs/x/ollama/Modelfile")
    assert error.value.line == line
    assert reason in error.value.reason
    where = f", line {line}" if line else ""
    assert str(error.value) == f"runs/x/ollama/Modelfile{where}: {error.value.reason}"


@pytest.mark.parametrize(("mf", "reason"), [
    (lambda: Modelfile(model="m", system='say """hi"""'), 'SYSTEM contains """'),
    (lambda: Modelfile(model="m", system="tab\tok but no\u00a0break"), "SYSTEM contains U+00A0"),
    (lambda: Modelfile(model="m", template="{{ \x00 }}"), "TEMPLATE contains U+0000"),
    (lambda: Modelfile(model="m", parameters=(("top_p", 2.0),)), "parameter 'top_p' must be [0.0, 1.0]"),
    (lambda: Modelfile(model="m", parameters=(("seed", 1), ("seed", 2))), "parameter 'seed' is set twice"),
    (lambda: Modelfile(model="m", messages=(("tool", "x"),)), "MESSAGE role must be one of"),
])
def test_what_ollama_would_read_differently_is_not_written(mf, reason: str) -> None:
    with pytest.raises(ModelfileError, match="^Modelfile: .*") as error:
        render_modelfile(mf())
    assert reason in str(error.value)


@pytest.mark.parametrize(("text", "reason"), [
    ('FROM m\nPARAMETER stop "x"\n', "no TEMPLATE"),
    ('FROM m\nTEMPLATE """{{ .Prompt }}"""\nPARAMETER stop "x"\n', "does not iterate .Messages"),
    ('FROM m\nTEMPLATE """{{ range .Messages }}{{ end }}"""\n', "no PARAMETER stop"),
])
def test_validate_asks_what_forge_always_writes(text: str, reason: str) -> None:
    parse_modelfile(text)
    with pytest.raises(ModelfileError, match=reason):
        validate(text)
