"""Fixtures for the Modelfile tests.

go_render: Go's own text/template, built once per session, rendering an Ollama TEMPLATE as Ollama does.
family / families: chat templates of the known families, written for these tests in the style their
models ship, each with a real (tiny) transformers tokenizer, a real GGUF holding its vocabulary and
template, and the conversation corpus to render.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

GO_PROGRAM = Path(__file__).parent / "gotemplate"

GoRender = Callable[..., list[dict[str, str]]]

CONTENTS = (
    "Hello!",
    "What is the capital of France?",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🙂🚀, مرحبا, Ελληνικά",
    "",
    "  padded with spaces and a tab\t",
    "line one\nline two\n\n- a bullet\n",
    'quotes "double" and \'single\', braces {{ .Content }} {% if x %}, a backslash \\ and <b>tags</b>',
    "\u3000ideographic space, no-break\u00a0space\n",
    "Paris.",
    "   \n ",
)
SYSTEM_PROMPTS = ("You are a terse assistant.", "Réponds en français 🇫🇷.\nSois bref.", "")


@dataclass(frozen=True)
class Family:
    """A chat template family: its Jinja template, special tokens, and what a translation must find."""

    name: str
    template: str
    bos: str | None
    eos: str
    add_bos: bool
    specials: tuple[str, ...]  # control tokens besides bos/eos/unk
    stop: tuple[str, ...]  # the tokens that end an assistant turn
    accepts_system: bool

    def tokenizer(self) -> PreTrainedTokenizerFast:
        """A word-level transformers tokenizer with the family's BOS/EOS and chat template."""
        backend = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
        return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=self.bos, eos_token=self.eos,
                                       unk_token="<unk>", chat_template=self.template)

    def conversations(self) -> list[list[dict[str, str]]]:
        """The corpus: system or not (where accepted), 1 to 4 user turns with replies between, ending with a user."""
        out = []
        pick = 0
        for turns in range(1, 5):
            for system in ((None, *SYSTEM_PROMPTS) if self.accepts_system else (None,)):
                for _ in range(2):
                    messages = [{"role": "system", "content": system}] if system is not None else []
                    for turn in range(turns):
                        if turn:
                            messages.append({"role": "assistant", "content": CONTENTS[pick % len(CONTENTS)]})
                            pick += 1
                        messages.append({"role": "user", "content": CONTENTS[pick % len(CONTENTS)]})
                        pick += 1
                    out.append(messages)
        return out

    def write_gguf(self, path: Path, *, drop: tuple[str, ...] = ()) -> Path:
        """A GGUF holding only the family's tokenizer (special tokens as control tokens, minus `drop`)."""
        specials = [t for t in dict.fromkeys(["<unk>", self.bos or "<|fake_bos|>", self.eos, *self.specials])
                    if t not in drop]
        tokens = [*specials, "Hello", "!", "\n", "▁the"]
        types = [gguf.TokenType.CONTROL] * len(specials) + [gguf.TokenType.NORMAL] * 4
        types[0] = gguf.TokenType.UNKNOWN
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_unk_token_id(0)
        if self.bos is not None:
            writer.add_bos_token_id(tokens.index(self.bos))
        if self.eos in tokens:
            writer.add_eos_token_id(tokens.index(self.eos))
        writer.add_add_bos_token(self.add_bos)
        writer.add_chat_template(self.template)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path


CHATML = Family(
    name="chatml",
    template=(
        "{%- if messages[0]['role'] != 'system' %}"
        "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}\n"
        "{%- for message in messages %}\n"
        "    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n"
    ),
    bos=None, eos="<|im_end|>", add_bos=False,
    specials=("<|im_start|>", "<|endoftext|>"), stop=("<|im_end|>",), accepts_system=True,
)

LLAMA3 = Family(
    name="llama3",
    template=(
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        "+ message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    bos="<|begin_of_text|>", eos="<|eot_id|>", add_bos=True,
    specials=("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"), stop=("<|eot_id|>",),
    accepts_system=True,
)

MISTRAL = Family(
    name="mistral",
    template=(
        "{{ bos_token }}{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
    ),
    bos="<s>", eos="</s>", add_bos=True, specials=(), stop=("</s>",), accepts_system=False,
)

GEMMA = Family(
    name="gemma",
    template=(
        "{{ bos_token }}\n"
        "{%- if messages[0]['role'] == 'system' -%}\n"
        "    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
        "    {%- set loop_messages = messages[1:] -%}\n"
        "{%- else -%}\n"
        "    {%- set first_user_prefix = '' -%}\n"
        "    {%- set loop_messages = messages -%}\n"
        "{%- endif -%}\n"
        "{%- for message in loop_messages -%}\n"
        "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
        "        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\n"
        "    {%- endif -%}\n"
        "    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}\n"
        "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}\n"
        "    {{- message['content'] | trim }}\n"
        "    {{- '<end_of_turn>\\n' }}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}\n"
        "    {{ '<start_of_turn>model\\n' }}\n"
        "{%- endif -%}\n"
    ),
    bos="<bos>", eos="<eos>", add_bos=True, specials=("<start_of_turn>", "<end_of_turn>"),
    stop=("<end_of_turn>",), accepts_system=True,
)

PHI3 = Family(
    name="phi3",
    template=(
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
    bos="<s>", eos="<|endoftext|>", add_bos=False,
    specials=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), stop=("<|end|>",), accepts_system=True,
)

ZEPHYR = Family(
    name="zephyr",
    template=(
        "{% for message in messages %}\n"
        "{% if message['role'] == 'user' %}\n"
        "{{ '<|user|>\\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'system' %}\n"
        "{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'assistant' %}\n"
        "{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
        "{% endif %}\n"
        "{% if loop.last and add_generation_prompt %}\n"
        "{{ '<|assistant|>' }}\n"
        "{% endif %}\n"
        "{% endfor %}"
    ),
    bos="<s>", eos="</s>", add_bos=True, specials=(), stop=("</s>",), accepts_system=True,
)

ALPACA = Family(
    name="alpaca",
    template=(
        "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
        "{% set loop_messages = messages[1:] %}"
        "{% else %}{% set system_message = 'Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.' %}{% set loop_messages = messages %}"
        "{% endif %}{{ bos_token + system_message + '\\n\\n' }}"
        "{% for message in loop_messages %}"
        "{% if message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% else %}{{ raise_exception('Only a leading system message is supported') }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    bos="<s>", eos="</s>", add_bos=True, specials=(), stop=("</s>",), accepts_system=True,
)

FAMILIES = (CHATML, LLAMA3, MISTRAL, GEMMA, PHI3, ZEPHYR, ALPACA)



@pytest.fixture(scope="session")
def go_render(tmp_path_factory: pytest.TempPathFactory) -> GoRender:
    """render(template, [messages, …], system="") -> [{"output": …, "error": …}, …] through Go's text/template.

    Each messages list is a chat request; system is the Modelfile SYSTEM (see gotemplate/main.go).
    """
    go = shutil.which("go")
    if go is None:
        pytest.fail("Go is needed to check the Ollama templates: install golang-go (.ci/run does)")
    work = tmp_path_factory.mktemp("gotemplate")
    binary = work / "gotemplate"
    env = {**os.environ, "GOCACHE": str(work / "cache"), "GOFLAGS": "-mod=mod", "GOPROXY": "off",
           "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"}
    subprocess.run([go, "build", "-o", str(binary), "."], cwd=GO_PROGRAM, env=env, check=True,
                   capture_output=True, timeout=300)

    def render(template: str, conversations: Sequence[Sequence[dict[str, str]]], system: str = "") -> list[dict]:
        request = {"template": template,
                   "cases": [{"system": system, "messages": list(messages)} for messages in conversations]}
        done = subprocess.run([str(binary)], input=json.dumps(request), capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    return render


@pytest.fixture(params=FAMILIES, ids=lambda f: f.name)
def family(request: pytest.FixtureRequest) -> Family:
    """Each known chat family in turn."""
    return request.param


@pytest.fixture(scope="session")
def families() -> dict[str, Family]:
    """The known chat families by name."""
    return {f.name: f for f in FAMILIES}


@pytest.fixture(scope="session")
def smollm2_chat_info(smollm2_gguf: Path):
    """The chat facts of the real SmolLM2 GGUF (reading it takes seconds: once per session)."""
    from forge.modelfiles import read_gguf_chat_info

    return read_gguf_chat_info(smollm2_gguf)
