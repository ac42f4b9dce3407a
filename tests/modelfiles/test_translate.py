"""The translated Go templates render, in Go's own text/template, what transformers' apply_chat_template renders."""

from __future__ import annotations

import dataclasses

import jinja2
import pytest
from forge.modelfiles import ChatTranslation, TemplateTranslationError, jinja_to_go_template, translate_chat_template
from forge.modelfiles.chat_format import GENERATION, LEADING_SYSTEM, START, WHITESPACE
from transformers import AutoTokenizer

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def translate(family, add_bos: bool | None = None) -> ChatTranslation:
    return translate_chat_template(family.template, bos_token=family.bos or "", eos_token=family.eos,
                                   add_bos_token=family.add_bos if add_bos is None else add_bos)


def assert_renders_like(go_render, translation: ChatTranslation, expected: list[str], convs, system="") -> None:
    results = go_render(translation.go_template, convs, system=system)
    assert len(results) == len(expected) == len(convs)
    for conv, want, got in zip(convs, expected, results, strict=True):
        assert got["error"] == "", (conv, got["error"])
        assert translation.leading_bos + got["output"] == want, conv


def test_family_template_renders_byte_identical_in_go(family, go_render) -> None:
    hf = family.tokenizer()
    convs = family.conversations()
    assert len(convs) >= 8
    expected = [hf.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    assert_renders_like(go_render, translate(family), expected, convs)


def test_smollm2_template_renders_byte_identical_in_go(smollm2_hf_dir, families, go_render) -> None:
    hf = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    translation = translate_chat_template(hf.chat_template, bos_token=hf.bos_token, eos_token=hf.eos_token,
                                          add_bos_token=False)
    assert translation.default_system == SMOLLM2_SYSTEM
    convs = families["chatml"].conversations()
    expected = [hf.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    assert_renders_like(go_render, translation, expected, convs)


def test_final_assistant_message_is_continued_like_continue_final_message(family, go_render) -> None:
    hf = family.tokenizer()
    convs = [[*c, {"role": "assistant", "content": "Sure, here is"}] for c in family.conversations()]
    expected = [hf.apply_chat_template(c, tokenize=False, continue_final_message=True) for c in convs]
    assert_renders_like(go_render, translate(family), expected, convs)


@pytest.mark.parametrize("name", ["chatml", "gemma", "alpaca"])
def test_modelfile_system_becomes_the_leading_system_message(name, families, go_render) -> None:
    family = families[name]
    hf = family.tokenizer()
    system = "Answer in one line.\nNo lists."
    convs = [c for c in family.conversations() if c[0]["role"] != "system"]
    expected = [hf.apply_chat_template([{"role": "system", "content": system}, *c], tokenize=False,
                                       add_generation_prompt=True) for c in convs]
    assert_renders_like(go_render, translate(family), expected, convs, system=system)


def test_messages_of_one_role_in_a_row_are_merged_as_ollama_does(families, go_render) -> None:
    sent = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
            {"role": "assistant", "content": "c"}, {"role": "assistant", "content": " d"},
            {"role": "user", "content": "e"}]
    merged = [{"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c\n\n d"},
              {"role": "user", "content": "e"}]
    llama3 = families["llama3"]
    expected = [llama3.tokenizer().apply_chat_template(merged, tokenize=False, add_generation_prompt=True)]
    assert_renders_like(go_render, translate(llama3), expected, [sent])


@pytest.mark.parametrize(("name", "messages", "reason"), [
    ("mistral", [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
     "does not accept a conversation that starts with a system message"),
    ("mistral", [{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}],
     "does not accept a conversation that starts with an assistant message"),
    ("gemma", [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
             {"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
     "does not accept a system message after an assistant message"),
    ("alpaca", [{"role": "user", "content": "u"}, {"role": "tool", "content": "{}"}],
     "accepts only system, user and assistant messages"),
])
def test_conversations_the_chat_template_rejects_fail_in_go(name, messages, reason, families, go_render) -> None:
    family = families[name]
    with pytest.raises(jinja2.TemplateError):
        family.tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    [result] = go_render(translate(family).go_template, [messages])
    assert result["output"] == ""
    assert f"forge: this model's chat template {reason}" in result["error"]


def test_bos_is_left_to_llama_cpp_exactly_when_it_adds_one(families, go_render) -> None:
    llama3 = families["llama3"]
    conv = [{"role": "user", "content": "Hi"}]
    expected = llama3.tokenizer().apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert expected.startswith("<|begin_of_text|>")
    added = translate(llama3, add_bos=True)
    kept = translate(llama3, add_bos=False)
    assert added.leading_bos == "<|begin_of_text|>" and "begin_of_text" not in added.go_template
    assert jinja_to_go_template(llama3.template, "<|begin_of_text|>", "<|eot_id|>", True) == added.go_template
    assert kept.leading_bos == ""
    [with_runtime_bos, with_template_bos] = [go_render(t.go_template, [conv])[0]["output"] for t in (added, kept)]
    assert "<|begin_of_text|>" + with_runtime_bos == with_template_bos == expected


def test_learned_formats_of_known_families(families) -> None:
    llama3, gemma, alpaca = (translate(families[name]) for name in ("llama3", "gemma", "alpaca"))
    assert llama3.format.junctions[("user", "assistant")] == (
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert llama3.format.junctions[("user", GENERATION)] == llama3.format.junctions[("user", "assistant")]
    assert set(llama3.format.content.values()) == {"strip"}
    # Gemma: a leading system prompt opens the first user turn as it is; later turns are trimmed
    assert dict(gemma.format.content) == {LEADING_SYSTEM: "keep", "system": "strip", "user": "strip",
                                          "assistant": "strip"}
    assert gemma.format.junctions[(START, LEADING_SYSTEM)] == "<start_of_turn>user\n"
    assert gemma.format.junctions[(LEADING_SYSTEM, "user")] == "\n\n"
    assert gemma.format.junctions[("user", "system")] == "<end_of_turn>\n<start_of_turn>system\n"
    assert translate(families["chatml"]).default_system == "You are a helpful assistant."
    assert alpaca.default_system.startswith("Below is an instruction")
    assert alpaca.leading_bos == "<s>"
    assert translate(families["zephyr"]).format.junctions[("user", GENERATION)] == "</s>\n<|assistant|>\n"
    mistral = translate(families["mistral"])
    assert not mistral.accepts_system and llama3.accepts_system and gemma.accepts_system


@pytest.mark.parametrize(("template", "reason"), [
    ("{{ strftime_now('%d %b %Y') }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}",
     "current date"),
    ("{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
     "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
     "{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
     "{%- if loop.last and system_message is defined %}{{- '[INST] ' + system_message + '\\n\\n' + "
     "message['content'] + '[/INST]' }}{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
     "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + '</s>' }}{%- endif %}"
     "{%- endfor %}",
     "moves, repeats or drops message contents"),
    ("{% for m in messages %}<{{ m.role }}>{{ m.content | replace('\\n', ' ') }}{% endfor %}",
     "changes leading system message contents beyond trimming whitespace"),
    ("{% for m in messages %}<{{ m.role }}>{{ m.content | upper }}{% endfor %}",
     "renders no conversation with its message contents in order"),
    ("{% for m in messages %}{% if loop.index0 > 1 %}[later]{% endif %}<{{ m.role }}>{{ m.content }}{% endfor %}",
     "depends on earlier messages"),
    ("{% for m in messages %}{% if m.content %}<{{ m.role }}>{% endif %}{{ m.content }}{% endfor %}",
     "renders [('system', ''"),
    ("{% for m in messages %}{{ m.content }", "does not compile"),
])
def test_templates_that_cannot_be_translated_faithfully_are_refused(template: str, reason: str) -> None:
    with pytest.raises(TemplateTranslationError, match="ollama.template") as error:
        translate_chat_template(template)
    assert reason in str(error.value)
    assert "\n" not in str(error.value)


def test_go_whitespace_trimming_matches_python_for_every_whitespace_character(go_render) -> None:
    assert set(WHITESPACE) == {c for c in map(chr, range(0x110000)) if c.isspace()}
    contents = [f"{c}{c}x{c}y {c}" for c in WHITESPACE] + ["".join(WHITESPACE), "", "x", WHITESPACE + "é" + "\u3000"]
    convs = [[{"role": "user", "content": c}] for c in contents]
    for expression, python in (("m.content | trim", str.strip), ("m.content.lstrip()", str.lstrip),
                               ("m.content.rstrip()", str.rstrip)):
        template = "{% for m in messages %}<{{ m.role }}>{{ " + expression + " }}|{% endfor %}"
        results = go_render(translate_chat_template(template).go_template, convs)
        assert [r["output"] for r in results] == [f"<user>{python(c)}|" for c in contents], expression


def test_any_template_text_survives_go_and_modelfile_quoting(families, go_render) -> None:
    odd = "«}} {{ \"quoted\" \\\\ ▁ zero\u200bwidth \t tab 🙂»"
    template = ("{% for m in messages %}{{ '" + odd + "' + m.role + '\\n' }}{{ m.content }}{% endfor %}"
                "{{ '}}' if add_generation_prompt }}")
    family = dataclasses.replace(families["chatml"], template=template)
    translation = translate(family)
    assert all(c == "\n" or " " <= c <= "~" for c in translation.go_template)
    convs = family.conversations()
    hf = family.tokenizer()
    expected = [hf.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    assert "\u200b" in expected[0]
    assert_renders_like(go_render, translation, expected, convs)
