"""The stop list holds exactly the tokens of the GGUF's vocabulary that end an assistant turn."""

from __future__ import annotations

import pytest
from forge.modelfiles import StopTokenError, read_gguf_chat_info, stop_tokens


def stops_of(info) -> list[str]:
    return stop_tokens(info.chat_template, info.special_tokens, bos_token=info.bos_token, eos_token=info.eos_token,
                       variables=info.template_variables)


def test_stop_list_is_the_end_of_turn_token_of_each_family(family, tmp_path) -> None:
    info = read_gguf_chat_info(family.write_gguf(tmp_path / "model.gguf"))
    assert info.chat_template == family.template
    assert stops_of(info) == list(family.stop)


def test_stop_list_of_the_real_smollm2_gguf(smollm2_chat_info) -> None:
    info = smollm2_chat_info
    assert info.add_bos_token is False
    assert (info.bos_token, info.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= info.special_tokens
    assert stops_of(info) == ["<|im_end|>"]


def test_the_first_token_after_the_reply_ends_it_even_when_the_end_marker_is_plain_text(families, tmp_path) -> None:
    # without <|im_end|> in the vocabulary the reply runs on until the next turn's <|im_start|>
    info = read_gguf_chat_info(families["chatml"].write_gguf(tmp_path / "model.gguf", drop=("<|im_end|>",)))
    assert stops_of(info) == ["<|im_start|>"]


def test_no_end_of_turn_token_in_the_vocabulary_is_an_error(families, tmp_path) -> None:
    path = families["chatml"].write_gguf(tmp_path / "model.gguf", drop=("<|im_end|>", "<|im_start|>"))
    with pytest.raises(StopTokenError, match=r"no token of the vocabulary ends an assistant turn.*<\|im_end\|>"):
        stops_of(read_gguf_chat_info(path))
