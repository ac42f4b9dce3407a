"""A Llama-style SentencePiece tokenizer gets SentencePiece's spaces; every other tokenizer is left as it is.

The end-to-end check (transformers == llama.cpp == SentencePiece on special tokens and leading spaces) is
tests/converters/test_tokenizer.py::test_sentencepiece_llama_style_round_trips.
"""

import json
import shutil

import pytest
import sentencepiece
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from forge.models.sentencepiece_spaces import use_sentencepiece_spaces

WORDS = "the quick brown fox jumps over the lazy dog while numpy imports self value class hello world 123 456"
TEMPLATE = "{% for m in messages %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]{% endfor %}"
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm")
    (root / "corpus.txt").write_text("\n".join(WORDS[i:] + " " + WORDS[:i] for i in range(0, 80, 3)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(root / "m"), vocab_size=320, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
    )  # fmt: skip
    return root / "m.model"


def _spm_folder(spm_model, out, tokenizer_class):
    """A tokenizer folder as transformers saves it (tokenizer.json, tokenizer_config.json)."""
    source = out.parent / f"{out.name}-source"
    source.mkdir()
    shutil.copyfile(spm_model, source / "tokenizer.model")
    settings = {"tokenizer_class": tokenizer_class, "legacy": False, "chat_template": TEMPLATE, **SPECIALS}
    (source / "tokenizer_config.json").write_text(json.dumps(settings))
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def test_llama_style_tokenizer_gets_sentencepiece_spaces(spm_model, tmp_path):
    folder = _spm_folder(spm_model, tmp_path / "llama", "LlamaTokenizer")
    before = AutoTokenizer.from_pretrained(folder)
    assert use_sentencepiece_spaces(folder)
    after = AutoTokenizer.from_pretrained(folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    assert settings["tokenizer_class"] == "PreTrainedTokenizerFast" and "legacy" not in settings
    spec = json.loads((folder / "tokenizer.json").read_text())
    assert [n["type"] for n in spec["normalizer"]["normalizers"]] == ["Prepend", "Replace"]
    assert spec["pre_tokenizer"] is None
    # special tokens, BOS insertion, chat template and decoding are what they were
    assert (after.bos_token_id, after.eos_token_id, after.unk_token_id) == (1, 2, 0)
    assert after("the fox")["input_ids"] == before("the fox")["input_ids"]
    assert after.decode(after("the fox")["input_ids"], skip_special_tokens=True) == "the fox"
    assert after.chat_template == TEMPLATE
    # the space now follows SentencePiece: after a special token and before a leading space too
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    assert after("</s>the", add_special_tokens=False)["input_ids"] == [2, *sp.encode("the")]
    assert after(" fox", add_special_tokens=False)["input_ids"] == sp.encode(" fox")
    assert before(" fox", add_special_tokens=False)["input_ids"] != sp.encode(" fox")
    assert not use_sentencepiece_spaces(folder)  # already done: nothing to change


def test_gemma_style_and_byte_level_tokenizers_are_left_alone(spm_model, tmp_path):
    gemma = _spm_folder(spm_model, tmp_path / "gemma", "GemmaTokenizer")
    byte_level = Tokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.train_from_iterator([WORDS], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    PreTrainedTokenizerFast(tokenizer_object=byte_level, eos_token="<|endoftext|>").save_pretrained(tmp_path / "bpe")
    for folder in (gemma, tmp_path / "bpe"):
        files = {p.name: p.read_bytes() for p in folder.iterdir()}
        assert not use_sentencepiece_spaces(folder)
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
