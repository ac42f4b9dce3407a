"""The GGUF tokenizer tokenizes like HF's, token for token, in llama.cpp: BPE and SentencePiece."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import llama_cpp
import pytest
import sentencepiece
from forge.converters import ConversionError, convert_hf_to_gguf
from forge.converters import pretokenizers as pre
from transformers import AutoTokenizer

from forge.models.normalize import normalize_base
from forge.models.resolve import resolve_base

from .tiny_models import PADDED_VOCAB, SMALL_VOCAB, build_tiny_model, read_back

MULTILINGUAL = "Hello world! Écris: naïve café, über, Привет мир, 日本語のテキスト, 中文测试, مرحبا, Ελλάδα, 🚀✅🦙."
CODE = 'def square(x: float) -> float:\n    return x ** 2  # 3.14159\n\n\tif (a<=b && c!=d) { printf("%d\\n", 12345); }'
ENGLISH = "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it... 3 33 333 3333 ------=======  end"
WHITESPACE = "   leading spaces, trailing   \n\n\nnewlines and\ttabs  "
SAMPLES = [MULTILINGUAL, CODE, ENGLISH, WHITESPACE]
CHATML = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nDéjà vu? 日本<|im_end|>\n<|im_start|>assistant\n"


def llama_cpp_vocab(gguf_path: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)


def assert_same_tokens(hf_dir: Path, gguf_path: Path, texts: list[str]) -> None:
    """HF and llama.cpp produce the same ids, plain and with the special tokens each adds by itself (llama.cpp
    adds BOS/EOS as the GGUF's add_bos_token/add_eos_token say)."""
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    llm = llama_cpp_vocab(gguf_path)
    for text in texts:
        assert (
            llm.tokenize(text.encode(), add_bos=False, special=True)
            == tokenizer(text, add_special_tokens=False)["input_ids"]
        ), text
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text)["input_ids"], text


@pytest.mark.slow
def test_smollm2_tokenizer_round_trips(smollm2_hf_dir: Path, smollm2_f16) -> None:
    assert_same_tokens(smollm2_hf_dir, smollm2_f16.path, SAMPLES + [CHATML, "<|endoftext|><|im_end|>x"])


def test_smollm2_tokenizer_metadata(smollm2_hf_dir: Path, smollm2_f16_read_back) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    fields, _ = smollm2_f16_read_back
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    ids = {k: fields[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "padding", "unknown", "eot")}
    assert ids == {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "padding": tokenizer.pad_token_id,
        "unknown": tokenizer.unk_token_id,
        "eot": tokenizer.convert_tokens_to_ids("<|im_end|>"),
    }
    assert fields["tokenizer.ggml.add_bos_token"] is False and fields["tokenizer.ggml.add_eos_token"] is False
    spec = json.loads((smollm2_hf_dir / "tokenizer.json").read_text())
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) for m in spec["model"]["merges"]]
    assert fields["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert fields["tokenizer.ggml.token_type"][:3] == [3, 3, 3]  # special tokens are control tokens


def test_token_list_is_padded_to_the_embedding(tiny_model, tmp_path: Path) -> None:
    result = convert_hf_to_gguf(tiny_model("llama"), tmp_path / "m.gguf")
    fields, _ = read_back(result.path)
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == PADDED_VOCAB
    assert tokens[SMALL_VOCAB:] == [f"[PAD{i}]" for i in range(SMALL_VOCAB, PADDED_VOCAB)]
    assert set(types[SMALL_VOCAB:]) == {5} and 5 not in types[:SMALL_VOCAB]  # 5: unused


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}


def split_then_bytes(regex: str) -> dict:
    return {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            BYTE_LEVEL,
        ],
    }


PRE_TOKENIZERS = {
    "gpt-2": {**BYTE_LEVEL, "use_regex": True},
    "smollm": {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, {**BYTE_LEVEL, "use_regex": True}],
    },
    "llama-bpe": split_then_bytes(pre.LLAMA3_REGEX),
    "qwen2": split_then_bytes(pre.QWEN2_REGEX),
    "tekken": split_then_bytes(pre.TEKKEN_REGEX),
    "gpt-4o": split_then_bytes(pre.GPT4O_REGEX),
}


def with_pre_tokenizer(model_dir: Path, out: Path, pre_tokenizer: dict) -> Path:
    shutil.copytree(model_dir, out)
    spec = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = pre_tokenizer
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return out


@pytest.mark.parametrize("name", list(PRE_TOKENIZERS))
def test_each_known_pre_tokenizer_is_named_and_matches_llama_cpp(name: str, tiny_model, tmp_path: Path) -> None:
    hf_dir = with_pre_tokenizer(tiny_model("llama"), tmp_path / "model", PRE_TOKENIZERS[name])
    result = convert_hf_to_gguf(hf_dir, tmp_path / "m.gguf")
    assert result.tokenizer_pre == name
    assert_same_tokens(hf_dir, result.path, SAMPLES + [CHATML])


def test_unknown_pre_tokenizer_is_refused_with_the_known_names(tiny_model, tmp_path: Path) -> None:
    hf_dir = with_pre_tokenizer(tiny_model("llama"), tmp_path / "model", split_then_bytes(r"\w+|\s+"))
    with pytest.raises(ConversionError, match=r"tokenizer.json: pre_tokenizer .* known: .*llama-bpe.*qwen2"):
        convert_hf_to_gguf(hf_dir, tmp_path / "m.gguf")


@pytest.fixture(scope="session")
def sentencepiece_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 400-piece SentencePiece BPE model with byte fallback, trained on a small mixed corpus; like Llama 2's and
    Gemma's, it keeps whitespace as written (no NFKC, no merging of repeated spaces)."""
    root = tmp_path_factory.mktemp("spm")
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dog",
        "def",
        "return",
        "print",
        "import",
        "numpy",
        "value",
        "self",
        "class",
        "café",
        "naïve",
        "über",
        "Привет",
        "как",
        "дела",
        "hello",
        "world",
        "123",
        "456",
        "7890",
    ]
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(2000)]
    (root / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"),
        model_prefix=str(root / "tiny"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
    )
    return root / "tiny.model"


# Llama 2's chat layout: BOS, then "[INST]" right after it, the answer, EOS
LLAMA2_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
CHAT = [
    {"role": "user", "content": " the quick fox?"},
    {"role": "assistant", "content": "Привет, как дела"},
    {"role": "user", "content": "import numpy"},
]


def spm_model_dir(kind: str, spm_model: Path, root: Path) -> Path:
    """A tiny model whose tokenizer is the SentencePiece model, as transformers saves it (tokenizer.json)."""
    source = root / "source"
    source.mkdir()
    shutil.copyfile(spm_model, source / "tokenizer.model")
    tokenizer_class = {"llama": "LlamaTokenizer", "gemma": "GemmaTokenizer"}[kind]
    (source / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": tokenizer_class,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<unk>",
                "add_bos_token": True,
                "chat_template": LLAMA2_TEMPLATE,
            }
        )
    )
    tokenizer_dir = root / "tokenizer"
    AutoTokenizer.from_pretrained(source).save_pretrained(tokenizer_dir)
    return build_tiny_model(kind, root / "model", tokenizer_dir)


def test_sentencepiece_gemma_style_round_trips(sentencepiece_model: Path, tmp_path: Path) -> None:
    hf_dir = spm_model_dir("gemma", sentencepiece_model, tmp_path)
    result = convert_hf_to_gguf(hf_dir, tmp_path / "gemma.gguf")
    fields, _ = read_back(result.path)
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("llama", "default")
    assert fields["tokenizer.ggml.add_space_prefix"] is False and fields["tokenizer.ggml.add_bos_token"] is True
    assert_same_tokens(hf_dir, result.path, SAMPLES + ["<s> hello </s> world <unk>", "</s><s>x"])


SPM_SPECIALS = re.compile("(<s>|</s>|<unk>)")
LLAMA_STYLE_SAMPLES = [
    *SAMPLES,
    "<s> hello </s> world <unk>",
    "</s><s>x",
    "<s>[INST] What is 2 + 2? [/INST] 4</s><s>[INST]  twice? [/INST]",
    " hello",
    " ",
    "a<s>b",
]


def sentencepiece_ids(spm_model: Path, text: str) -> list[int]:
    """What SentencePiece itself (the tokenizer Llama 2 / Mistral were trained with) gives: the text between
    special tokens encoded piece by piece, each with SentencePiece's leading space."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    parts = [p for p in SPM_SPECIALS.split(text) if p]
    return [i for p in parts for i in ([sp.piece_to_id(p)] if SPM_SPECIALS.fullmatch(p) else sp.encode(p))]


def test_sentencepiece_llama_style_round_trips(sentencepiece_model: Path, tmp_path: Path) -> None:
    """Llama-style SentencePiece puts a space before every text fragment: at the start, after each special
    token, and before text that already starts with a space. llama.cpp does; transformers 5's LlamaTokenizer
    does not (Metaspace "first"), so the base stage gives the folder SentencePiece's normalizer
    (forge.models.sentencepiece_spaces). Then transformers, llama.cpp and SentencePiece agree token for token."""
    source = spm_model_dir("llama", sentencepiece_model, tmp_path)
    facts = normalize_base(resolve_base(str(source)), tmp_path / "base")
    assert "SentencePiece spaces" in facts["tokenizer"]
    hf_dir = tmp_path / "base"
    result = convert_hf_to_gguf(hf_dir, tmp_path / "llama.gguf")
    fields, _ = read_back(result.path)
    assert fields["tokenizer.ggml.add_space_prefix"] is True
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert types[tokens.index("<unk>")] == 2 and types[tokens.index("<s>")] == 3
    assert {types[i] for i, t in enumerate(tokens) if t.startswith("<0x")} == {6}  # byte-fallback tokens
    assert len(fields["tokenizer.ggml.scores"]) == len(tokens)
    assert_same_tokens(hf_dir, result.path, LLAMA_STYLE_SAMPLES)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    for text in LLAMA_STYLE_SAMPLES:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == sentencepiece_ids(sentencepiece_model, text)
    assert tokenizer.decode(tokenizer(MULTILINGUAL)["input_ids"], skip_special_tokens=True) == MULTILINGUAL
    # the chat as the data stage renders and tokenizes it is what llama.cpp reads
    chat = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert_same_tokens(hf_dir, result.path, [chat])
    assert tokenizer(chat, add_special_tokens=False)["input_ids"] == sentencepiece_ids(sentencepiece_model, chat)
    # the folder as transformers 5 wrote it (LlamaTokenizer, Metaspace "first") is what diverged
    original = AutoTokenizer.from_pretrained(source)
    assert original(chat, add_special_tokens=False)["input_ids"] != sentencepiece_ids(sentencepiece_model, chat)
    # a SentencePiece GGUF as base.model: the folder made from it tokenizes as llama.cpp does with that GGUF
    from_gguf = normalize_base(resolve_base(str(result.path)), tmp_path / "from-gguf")
    assert "SentencePiece spaces" in from_gguf["tokenizer"]
    assert_same_tokens(tmp_path / "from-gguf", result.path, [*LLAMA_STYLE_SAMPLES, chat])
