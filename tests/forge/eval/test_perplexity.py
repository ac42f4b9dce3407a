"""Perplexity of real SmolLM2 GGUFs through llama.cpp vs the HF model through PyTorch, KL and top-1."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from forge.config import EvalConfig
from forge.data.shards import Example, build_split, load_split
from forge.eval import EvalError, EvalReport, GgufFile, evaluate
from forge.eval.perplexity import gguf_perplexity
from forge.eval.tokens import select_examples


def test_every_perplexity_is_finite_and_scored_on_the_same_tokens(smollm2_report: EvalReport) -> None:
    counts = {g.perplexity.scored_tokens for g in smollm2_report.ggufs}
    counts |= {smollm2_report.finetuned.scored_tokens, smollm2_report.base.scored_tokens}
    assert counts == {smollm2_report.eval_set["scored_tokens"]}
    assert smollm2_report.eval_set["tokens"] <= 320
    assert all(
        math.isfinite(g.perplexity.perplexity) and g.perplexity.perplexity > 1 for g in smollm2_report.ggufs
    )


def test_the_f16_gguf_scores_like_the_hf_model(smollm2_report: EvalReport) -> None:
    f16 = smollm2_report.gguf("f16").perplexity.perplexity
    assert f16 / smollm2_report.finetuned.perplexity - 1 == pytest.approx(0, abs=0.005)


def test_quants_are_ordered_sensibly(smollm2_report: EvalReport) -> None:
    f16, q8, q4 = (smollm2_report.gguf(n).perplexity for n in ("f16", "q8_0", "q4_k_m"))
    # q8_0 passes the default gate (no more than 1% above f16) and stays near f16 either way: on these 156 scored
    # tokens it came out 1.3% *below* f16 with an AVX2 build of llama.cpp (KL 0.005), within 1% with others
    assert -0.03 < q8.perplexity / f16.perplexity - 1 < 0.01
    assert f16.perplexity < q4.perplexity < 1.10 * f16.perplexity
    assert q8.perplexity < q4.perplexity
    assert 0 < q8.kl < q4.kl < 0.5
    assert q8.top1 > q4.top1 > 0.8
    assert f16.kl is None and f16.top1 is None  # the reference is not compared with itself


def test_the_fine_tune_beats_an_untrained_base(smollm2_report: EvalReport) -> None:
    # an untrained model is about uniform over the 49152-token vocabulary: loss near ln(49152) = 10.8
    assert smollm2_report.base.mean_nll == pytest.approx(math.log(49152), abs=0.5)
    assert smollm2_report.finetuned.mean_nll < 2.5


def test_a_reference_compared_with_itself_has_zero_kl(
    smollm2_ggufs: dict[str, Path], heldout: Path, tmp_path: Path
):
    evalset = select_examples(load_split(heldout / "eval.safetensors"), max_tokens=48)
    ref = tmp_path / "ref.npy"
    first = gguf_perplexity(smollm2_ggufs["q8_0"], evalset, record=ref)
    again = gguf_perplexity(smollm2_ggufs["q8_0"], evalset, against=ref)
    assert np.load(ref).shape == (evalset.num_scored, 49152)
    assert again.perplexity == pytest.approx(first.perplexity, rel=1e-6)
    assert again.kl == pytest.approx(0, abs=1e-6) and again.top1 == 1.0


def test_a_reference_of_another_shape_is_refused(
    smollm2_ggufs: dict[str, Path], heldout: Path, tmp_path: Path
):
    evalset = select_examples(load_split(heldout / "eval.safetensors"), max_tokens=48)
    np.save(tmp_path / "other.npy", np.zeros((evalset.num_scored, 32000), dtype=np.float32))
    with pytest.raises(EvalError, match="vocabulary"):
        gguf_perplexity(smollm2_ggufs["q8_0"], evalset, against=tmp_path / "other.npy")


def test_a_split_with_nothing_to_score_is_a_clear_error(
    smollm2_ggufs: dict[str, Path], tmp_path: Path
) -> None:
    unlabelled = build_split([[Example([1, 2, 3], [-100, -100, -100])]])
    with pytest.raises(EvalError, match="no labelled tokens"):
        evaluate(GgufFile("f16", smollm2_ggufs["f16"]), [], unlabelled, [], EvalConfig(), tmp_path)


def test_a_missing_gguf_is_named(tmp_path: Path, heldout: Path) -> None:
    evalset = select_examples(load_split(heldout / "eval.safetensors"), max_tokens=48)
    with pytest.raises(EvalError, match="model-q8_0.gguf: GGUF file not found"):
        gguf_perplexity(tmp_path / "model-q8_0.gguf", evalset)


def test_a_file_llama_cpp_cannot_load_is_named(tmp_path: Path, heldout: Path) -> None:
    evalset = select_examples(load_split(heldout / "eval.safetensors"), max_tokens=48)
    (tmp_path / "model-q8_0.gguf").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(EvalError, match="model-q8_0.gguf: llama.cpp cannot load it"):
        gguf_perplexity(tmp_path / "model-q8_0.gguf", evalset)
