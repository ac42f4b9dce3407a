"""Fixtures of the eval tests: SmolLM2's held-out split, its f16/q8_0/q4_k_m GGUFs, one shared evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest

from forge.config import EvalConfig
from forge.data.shards import load_split
from forge.eval import EvalReport, GgufFile, evaluate
from forge.eval.prompts import heldout_conversations

from .eval_inputs import make_ggufs, write_heldout

# Small enough for 2 CPU cores: every model scores the same 320 held-out tokens, two prompts each.
SMALL = {"max_eval_tokens": 320, "num_prompts": 2, "max_tokens": 64}


@pytest.fixture(scope="session")
def heldout(smollm2_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_heldout(smollm2_hf_dir, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def smollm2_ggufs(smollm2_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_ggufs(smollm2_hf_dir, tmp_path_factory.mktemp("ggufs"), ("q8_0", "q4_k_m"))


@pytest.fixture(scope="session")
def random_base(smollm2_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained one-layer model with SmolLM2's vocabulary: the 'base' a fine-tune must beat."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(smollm2_hf_dir)
    config.update(
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
        }
    )
    out = tmp_path_factory.mktemp("random_base")
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_report(
    smollm2_ggufs: dict[str, Path],
    smollm2_hf_dir: Path,
    random_base: Path,
    heldout: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> EvalReport:
    """One evaluation of SmolLM2's f16, q8_0 and q4_k_m GGUFs, the HF model, and the random base."""
    cfg = EvalConfig(**SMALL)
    return evaluate(
        GgufFile("f16", smollm2_ggufs["f16"]),
        [GgufFile(q, smollm2_ggufs[q]) for q in ("q8_0", "q4_k_m")],
        load_split(heldout / "eval.safetensors"),
        heldout_conversations(heldout / "eval.jsonl", cfg.num_prompts),
        cfg,
        tmp_path_factory.mktemp("eval_work"),
        finetuned_hf=smollm2_hf_dir,
        base_hf=random_base,
        log=lambda _: None,
    )
