"""The generation smoke test on real GGUFs: proper stops, never-stops, broken EOS, degenerate output."""

from __future__ import annotations

from pathlib import Path

from forge.config import EvalConfig
from forge.data.shards import load_split
from forge.eval import EvalReport, GgufFile, evaluate, failure_table
from forge.eval.generation import smoke_test
from forge.eval.prompts import conversations_from_prompts, heldout_conversations

from .eval_inputs import with_add_bos, with_eos


def test_every_smollm2_gguf_stops_at_the_end_of_its_turn(smollm2_report: EvalReport) -> None:
    for g in smollm2_report.ggufs:
        assert g.smoke.problems == []
        assert len(g.smoke.generations) == 2
        for gen in g.smoke.generations:
            assert gen.stopped_by == "<|im_end|>" and gen.problems == [], (g.name, gen)
            assert 0 < gen.tokens < 64 and gen.text.strip()
        assert g.smoke.prompt_tokens_per_s > 0 and g.smoke.gen_tokens_per_s > 0
    assert smollm2_report.gate.passed, failure_table(smollm2_report.gate)


def test_a_generation_cut_by_max_tokens_did_not_stop(smollm2_gguf: Path, heldout: Path) -> None:
    result = smoke_test(smollm2_gguf, heldout_conversations(heldout / "eval.jsonl", 1), max_tokens=3)
    [gen] = result.generations
    assert gen.stopped_by is None and gen.tokens == 3
    assert gen.problems == ["did not stop within 3 tokens"]


def test_a_looping_generation_is_degenerate(smollm2_gguf: Path) -> None:
    # Greedy without a repeat penalty, this 4-bit 135M model answers with ", la Femme" over and over.
    prompts = conversations_from_prompts(["What is the capital of France?"])
    [gen] = smoke_test(smollm2_gguf, prompts, max_tokens=96, repeat_penalty=1.0).generations
    assert gen.stopped_by is None
    assert any(p.startswith("degenerate: ") and "repeated" in p for p in gen.problems), gen.problems


def test_an_eos_pointing_to_a_normal_token_fails_the_gate(
    smollm2_gguf: Path, heldout: Path, tmp_path: Path
) -> None:
    broken = with_eos(smollm2_gguf, tmp_path / "model-q4_1.gguf", ".")
    cfg = EvalConfig(max_eval_tokens=64, num_prompts=2, max_tokens=48)
    report = evaluate(
        GgufFile("q4_1", broken),
        [],
        load_split(heldout / "eval.safetensors"),
        heldout_conversations(heldout / "eval.jsonl", cfg.num_prompts),
        cfg,
        tmp_path / "work",
        log=lambda _: None,
    )
    assert not report.gate.passed
    checks = {(f.model, f.check) for f in report.gate.failures}
    assert ("model-q4_1.gguf", "vocabulary") in checks and ("model-q4_1.gguf", "generation") in checks
    table = failure_table(report.gate)
    assert "EOS token id 30 ('.') is a normal text token, not a control token" in table
    assert "stopped on '.' (id 30), a normal text token marked end-of-generation" in table


def test_a_template_that_writes_bos_gives_one_bos_when_the_vocabulary_adds_one(smollm2_gguf: Path, tmp_path: Path):
    # SmolLM2's template starts with <|im_start|>, its BOS; with add_bos_token on, llama.cpp prepends another.
    from llama_cpp import Llama

    from forge.eval.generation import prompt_tokens, render_prompt

    messages = [{"role": "user", "content": "Convert 2 km to meters."}]
    for path, adds in ((smollm2_gguf, False), (with_add_bos(smollm2_gguf, tmp_path / "bos.gguf"), True)):
        llm = Llama(str(path), n_ctx=256, verbose=False)
        bos = llm.token_bos()
        raw = llm.tokenize(render_prompt(llm, messages).encode(), add_bos=True, special=True)
        assert (raw[:2] == [bos, bos]) == adds, path.name
        tokens = prompt_tokens(llm, messages)
        assert tokens[0] == bos and tokens[1] != bos and tokens == raw[1 if adds else 0 :], path.name
