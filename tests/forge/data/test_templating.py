"""Response-only masking: exactly the assistant contents and their end-of-turn token are trained.

SmolLM2's real ChatML template, plus templates written here in the shape of other families (Llama 3,
Gemma, Mistral, and one that closes turns with nothing) on the same tokenizer with their markers added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from forge.data.encoding import encode
from forge.data.errors import DataError
from forge.data.shards import IGNORE_INDEX
from forge.data.templating import render_chat, render_text

TWO_TURNS = [
    {"role": "system", "content": "You convert units."},
    {"role": "user", "content": "How many meters are in 2 kilometers?"},
    {"role": "assistant", "content": "Answer: 2000 meters\nReason: 1 kilometer = 1000 meters."},
    {"role": "user", "content": "And 3 kilometers?"},
    {"role": "assistant", "content": "Answer: 3000 meters"},
]

LLAMA3 = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA = (
    "<bos>{% if messages[0].role == 'system' %}{% set sys = messages[0].content | trim + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set sys = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
    "{{ (sys if loop.first else '') + m.content | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# Mistral's newer templates put the system prompt into the last user turn only, and have no generation prompt.
MISTRAL = (
    "<s>{% if messages[0].role == 'system' %}{% set sys = messages[0].content %}{% set turns = messages[1:] %}"
    "{% else %}{% set sys = '' %}{% set turns = messages %}{% endif %}{% for m in turns %}"
    "{% if m.role == 'user' %}[INST] {% if loop.last and sys %}{{ sys }}\n\n{% endif %}{{ m.content }}[/INST]"
    "{% else %} {{ m.content }}</s>{% endif %}{% endfor %}"
)
PLAIN = (
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
FAMILIES = {
    "llama3": (
        LLAMA3,
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        ["Answer: 2000 meters\nReason: 1 kilometer = 1000 meters.<|eot_id|>", "Answer: 3000 meters<|eot_id|>"],
    ),
    "gemma": (
        GEMMA,
        ["<bos>", "<start_of_turn>", "<end_of_turn>"],
        ["Answer: 2000 meters\nReason: 1 kilometer = 1000 meters.<end_of_turn>", "Answer: 3000 meters<end_of_turn>"],
    ),
    "mistral": (
        MISTRAL,
        ["<s>", "</s>", "[INST]", "[/INST]"],
        [" Answer: 2000 meters\nReason: 1 kilometer = 1000 meters.</s>", " Answer: 3000 meters</s>"],
    ),
    # No end-of-turn marker: the tokenizer's EOS (<|im_end|> here) is inserted after each answer.
    "plain": (
        PLAIN,
        [],
        [" Answer: 2000 meters\nReason: 1 kilometer = 1000 meters.<|im_end|>", " Answer: 3000 meters<|im_end|>"],
    ),
}


def trained_runs(tokenizer: Any, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded text of each contiguous run of trained tokens."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(token)
        previous = label
    return [tokenizer.decode(run) for run in runs]


def masked(tokenizer: Any, messages: list[dict[str, str]], train_on: str = "responses") -> tuple[list[int], list[int]]:
    example = encode(tokenizer, [render_chat(tokenizer, messages, train_on, "row:1")])[0]
    return example.input_ids, example.labels


def test_two_turn_labels_are_exactly_the_assistant_tokens_and_end_of_turn(smol_tokenizer: Any) -> None:
    ids, labels = masked(smol_tokenizer, TWO_TURNS)
    im_end = smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected = []
    for message in TWO_TURNS:
        if message["role"] == "assistant":
            expected += smol_tokenizer(message["content"], add_special_tokens=False)["input_ids"] + [im_end]
    assert [label for label in labels if label != IGNORE_INDEX] == expected
    # What the model sees is exactly HF's own tokenization of the conversation.
    reference = smol_tokenizer.apply_chat_template(TWO_TURNS, tokenize=False)
    assert ids == smol_tokenizer(reference, add_special_tokens=False)["input_ids"]
    # The newline after each <|im_end|> is seen but not trained.
    newline = smol_tokenizer("\n", add_special_tokens=False)["input_ids"]
    for i, token in enumerate(ids[:-1]):
        if token == im_end:
            assert ids[i + 1 : i + 2] == newline and labels[i + 1] == IGNORE_INDEX


def test_train_on_all_trains_every_token(smol_tokenizer: Any) -> None:
    ids, labels = masked(smol_tokenizer, TWO_TURNS, train_on="all")
    assert labels == ids


@pytest.mark.parametrize("family", list(FAMILIES))
def test_other_families_train_assistant_content_and_their_end_marker(smollm2_hf_dir: Path, family: str) -> None:
    template, markers, expected = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    tokenizer.add_tokens(markers, special_tokens=True)
    tokenizer.chat_template = template
    messages = [dict(m) for m in TWO_TURNS]
    messages[4]["content"] = "  Answer: 3000 meters \n"  # templates that trim must still be located
    if family in ("mistral", "plain"):  # these render content verbatim
        messages[4]["content"] = "Answer: 3000 meters"
    ids, labels = masked(tokenizer, messages)
    assert trained_runs(tokenizer, ids, labels) == expected


def test_gemma_style_template_rejecting_a_conversation_is_a_row_error(smollm2_hf_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    tokenizer.chat_template = GEMMA
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(DataError, match=r"^row:1: the chat template rejected this conversation: .*must alternate"):
        render_chat(tokenizer, two_users, "responses", "row:1")


def test_text_is_fully_trained_and_ends_with_eos(smol_tokenizer: Any) -> None:
    example = encode(smol_tokenizer, [render_text(smol_tokenizer, "Plain words.")])[0]
    assert example.input_ids == smol_tokenizer("Plain words.")["input_ids"] + [smol_tokenizer.eos_token_id]
    assert example.labels == example.input_ids
