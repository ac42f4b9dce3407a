"""Tiny random models of every supported architecture, and the checks that compare them with llama.cpp."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
SMALL_VOCAB = 4096  # SmolLM2's tokenizer cut to its first 4096 tokens: fast to convert, load and compare
PADDED_VOCAB = SMALL_VOCAB + 64  # config vocab larger than the tokenizer: the GGUF token list is padded

TINY_BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    vocab_size=PADDED_VOCAB,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    # Weights large enough that attention and MLP, not the embedding, decide the logits: a wrong Q/K
    # permutation or rope then shows up as a KL far above 1e-3, while f16 rounding stays far below it.
    initializer_range=0.12,
)
GEMMA3_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0},
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
}
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)
PHI3_LONGROPE = dict(
    rope_type="longrope",
    rope_theta=10000.0,
    long_factor=[1.0 + i for i in range(8)],
    short_factor=[1.0 + 0.1 * i for i in range(8)],
)

# name -> (config class, model class, config overrides). Sliding windows (16) are shorter than the sample.
TINY_CASES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False, head_dim=32)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16)),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=16,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=10.0,
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=16,
            final_logit_softcapping=10.0,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters=GEMMA3_ROPE,
        ),
    ),
    "phi": ("Phi3Config", "Phi3ForCausalLM", dict(tie_word_embeddings=False, sliding_window=None)),
    "phi-longrope": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(
            tie_word_embeddings=False,
            sliding_window=None,
            max_position_embeddings=4096,
            original_max_position_embeddings=1024,
            rope_parameters=PHI3_LONGROPE,
        ),
    ),
}

# A chat with multilingual text, code and special tokens: ~270 tokens, so one top-1 flip is 0.4%.
CHAT = [
    {"role": "system", "content": "You are a terse assistant. Réponds en français si on te parle français."},
    {
        "role": "user",
        "content": "Écris une fonction Python qui calcule le carré: def f(x): return x**2 # 3.14 — "
        "日本語も少し書いてください。",
    },
    {
        "role": "assistant",
        "content": "Voilà:\n```python\ndef square(x: float) -> float:\n    return x * x\n```\n"
        "日本語: 二乗を計算します。",
    },
    {
        "role": "user",
        "content": "Now in Rust, with a test. Also: Привет, как дела? 123 + 456 = 579; naïve café, emoji 🚀✅.",
    },
    {
        "role": "assistant",
        "content": "fn square(x: f64) -> f64 { x * x }\n#[test]\nfn it_works() { "
        "assert_eq!(square(3.0), 9.0); }\nВсё хорошо, спасибо!",
    },
]


def write_small_tokenizer(source_dir: Path, out: Path, size: int = SMALL_VOCAB) -> Path:
    """SmolLM2's byte-level BPE tokenizer restricted to its first `size` tokens and the merges among them.

    BPE merges only ever produce later tokens from earlier ones, so the cut is itself a valid tokenizer with
    the same pre-tokenizer, byte alphabet, special tokens and chat template.
    """
    spec = json.loads((source_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec["model"]
    model["vocab"] = {t: i for t, i in model["vocab"].items() if i < size}
    model["merges"] = [m for m in model["merges"] if "".join(m) in model["vocab"]]
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["id"] < size]
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    for name in TOKENIZER_FILES[1:]:
        shutil.copyfile(source_dir / name, out / name)
    return out


def build_tiny_model(
    case: str, out: Path, tokenizer_dir: Path | None, *, wide: bool = False, dtype: torch.dtype = torch.float16
) -> Path:
    """Save a random-init model of `case` in `dtype` with the tokenizer of `tokenizer_dir` (None: no tokenizer).

    `wide` makes the rows 256 long, so that llama.cpp's k-quants apply instead of their fallbacks.
    """
    config_name, model_name, overrides = TINY_CASES[case]
    dims = dict(hidden_size=256, intermediate_size=512, head_dim=64) if wide else {}
    config = getattr(transformers, config_name)(**{**TINY_BASE, **overrides, **dims})
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config)
    gemma = "gemma" in case
    with torch.no_grad():
        # Gemma scales embeddings by sqrt(hidden) and stores norms as w - 1: keep both in a sane range.
        embed_std = 0.2 if gemma else 0.4
        model.get_input_embeddings().weight.normal_(0, embed_std)
        if not config.tie_word_embeddings:
            model.get_output_embeddings().weight.normal_(0, embed_std)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0 if gemma else 1.0, 0.1)  # non-trivial norms catch a missing Gemma +1
            elif name.endswith("bias"):
                p.normal_(0, 0.5)  # HF initializes biases to zero, which would hide a dropped bias
    model.to(dtype).save_pretrained(out)
    _copy_tokenizer(tokenizer_dir, out)
    return out


def build_tiny_gemma3_multimodal(out: Path, tokenizer_dir: Path | None, dtype: torch.dtype = torch.float16) -> Path:
    """A Gemma 3 image-text checkpoint (Gemma3ForConditionalGeneration): the converter takes its text tower."""
    _, _, overrides = TINY_CASES["gemma3"]
    # real Gemma 3 sets no final soft-cap, and transformers' image-text class ignores one (its text class not)
    text = {**TINY_BASE, **overrides, "final_logit_softcapping": None}
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=SMALL_VOCAB + 10,
        boi_token_index=SMALL_VOCAB + 11,
        eoi_token_index=SMALL_VOCAB + 12,
    )
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 0.2)
        for name, p in model.named_parameters():
            if "norm" in name and "vision" not in name:
                p.normal_(0.0, 0.1)
    model.to(dtype).save_pretrained(out)
    _copy_tokenizer(tokenizer_dir, out)
    return out


def _copy_tokenizer(tokenizer_dir: Path | None, out: Path) -> None:
    for f in tokenizer_dir.iterdir() if tokenizer_dir else ():
        shutil.copyfile(f, out / f.name)


def chat_token_ids(hf_dir: Path) -> list[int]:
    """The sample chat rendered by the folder's chat template and tokenized by HF."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def hf_logits(hf_dir: Path, ids: list[int]) -> np.ndarray:
    """Logits of the HF model in float32 for one sequence."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def llama_cpp_logits(gguf_path: Path, ids: list[int]) -> np.ndarray:
    """Logits of every position from llama.cpp (llama-cpp-python, logits_all=True)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf_path), logits_all=True, n_ctx=1024, n_threads=2, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def agreement(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement and mean KL(reference || candidate) over positions."""
    p, q = _log_softmax(reference.astype(np.float64)), _log_softmax(candidate.astype(np.float64))
    kl = (np.exp(p) * (p - q)).sum(-1)
    return float((reference.argmax(-1) == candidate.argmax(-1)).mean()), float(kl.mean())


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def read_back(gguf_path: Path) -> tuple[dict[str, object], dict[str, tuple[tuple[int, ...], str]]]:
    """A GGUF file's keys (name -> value) and tensors (name -> (shape in HF order, GGML type)), via gguf."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: (tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name) for t in reader.tensors}
    return fields, tensors
