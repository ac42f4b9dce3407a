"""The whole data preparation on real files with the real SmolLM2 tokenizer: formats, file types,
bad input, skipping, truncation, dropping, packing, stats and the files the stage writes."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forge.config import DataConfig
from forge.data.build import prepare, summary_line, write_prepared
from forge.data.errors import DataError
from forge.data.readers import BUILTIN
from forge.data.shards import IGNORE_INDEX, TokenSplit, load_split

QA = [
    ("Convert 2 meters to centimeters.", "Answer: 200 centimeters"),
    ("How many grams are in 3 kilograms?", "Answer: 3000 grams"),
    ("What is 2 hours in minutes?", "Answer: 120 minutes"),
    ("Convert 4 weeks to days.", "Answer: 28 days"),
]


def rows_in(fmt: str) -> list[dict[str, Any]]:
    if fmt == "messages":
        return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    if fmt == "sharegpt":
        return [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in QA]
    if fmt == "alpaca":
        return [{"instruction": q, "input": "", "output": a} for q, a in QA]
    return [{"text": f"{q} {a}"} for q, a in QA]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            for r in rows:
                writer.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()})
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def all_ids(split: TokenSplit) -> list[list[int]]:
    return [split.sequence(i)["input_ids"].tolist() for i in range(len(split))]


def run(path: Path, tokenizer: Any, **cfg: Any) -> tuple[Any, list[str]]:
    logs: list[str] = []
    config = DataConfig(path=str(path), eval_fraction=cfg.pop("eval_fraction", 0.0), **cfg)
    return prepare(path, tokenizer, config, logs.append), logs


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca", "text"])
def test_every_format_in_every_file_type_is_detected_and_tokenized(
    tmp_path: Path, smol_tokenizer: Any, fmt: str, suffix: str
) -> None:
    path = write_rows(tmp_path / f"d{suffix}", rows_in(fmt))
    prepared, logs = run(path, smol_tokenizer)
    assert prepared.stats["format"] == fmt
    assert prepared.stats["examples"] == 4 and prepared.stats["skipped"] == 0
    assert any(f"format auto -> {fmt}" in line for line in logs)
    reference, _ = run(write_rows(tmp_path / "ref.jsonl", rows_in(fmt)), smol_tokenizer, format=fmt)
    assert all_ids(prepared.train) == all_ids(reference.train)


def test_conversation_formats_give_identical_tokens(tmp_path: Path, smol_tokenizer: Any) -> None:
    results = [
        run(write_rows(tmp_path / f"{f}.jsonl", rows_in(f)), smol_tokenizer)[0]
        for f in ("messages", "sharegpt", "alpaca")
    ]
    first = results[0].train
    for other in results[1:]:
        assert all_ids(other.train) == all_ids(first)
        assert other.train.labels.tolist() == first.labels.tolist()


def test_a_folder_of_mixed_files_reports_each_format(tmp_path: Path, smol_tokenizer: Any) -> None:
    write_rows(tmp_path / "a.csv", rows_in("alpaca"))
    write_rows(tmp_path / "b.parquet", rows_in("messages"))
    write_rows(tmp_path / "c.jsonl", rows_in("text"))
    prepared, _ = run(tmp_path, smol_tokenizer)
    assert prepared.stats["format"] == "mixed"
    assert prepared.stats["formats"] == {
        str(tmp_path / "a.csv"): "alpaca",
        str(tmp_path / "b.parquet"): "messages",
        str(tmp_path / "c.jsonl"): "text",
    }
    assert prepared.stats["examples"] == 12 and prepared.stats["files"] == 3


GOOD = json.dumps(rows_in("messages")[0])
BAD_LINES = [
    ('{"messages": [{"role": "user", "content": "hi"}', "malformed JSON"),
    (
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}',
        "messages[1]: missing field 'content'",
    ),
    ('{"messages": []}', "empty conversation"),
    (
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}',
        "messages[1]: unknown role 'bot'",
    ),
]


@pytest.mark.parametrize(("line", "reason"), BAD_LINES)
def test_each_bad_row_stops_with_file_line_and_reason(
    write_jsonl: Callable[..., Path], smol_tokenizer: Any, line: str, reason: str
) -> None:
    path = write_jsonl([GOOD, GOOD, line, GOOD])
    with pytest.raises(DataError) as caught:
        run(path, smol_tokenizer)
    assert str(caught.value).startswith(f"{path}:3: {reason}")
    assert "\n" not in str(caught.value)


def test_on_error_skip_counts_and_lists_the_skipped_rows(write_jsonl: Callable[..., Path], smol_tokenizer: Any) -> None:
    path = write_jsonl([GOOD] + [line for line, _ in BAD_LINES] + [GOOD])
    prepared, logs = run(path, smol_tokenizer, on_error="skip")
    stats = prepared.stats
    assert stats["skipped"] == 4 and stats["examples"] == 2 and stats["rows"] == 6
    assert [row.split(": ")[0] for row in stats["skipped_rows"]] == [f"{path}:{n}" for n in (2, 3, 4, 5)]
    assert sum(line.startswith("skipped ") for line in logs) == 4


def test_rows_whose_keys_match_no_format_are_reported(write_jsonl: Callable[..., Path], smol_tokenizer: Any) -> None:
    path = write_jsonl([{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match=rf"^{path}:1: cannot tell the format from the keys \(prompt, completion\)"):
        run(path, smol_tokenizer)


def test_truncation_and_dropping_are_counted(write_jsonl: Callable[..., Path], smol_tokenizer: Any) -> None:
    long_question = "Convert these numbers please. " * 40
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "word " * 200}]},
        {"messages": [{"role": "user", "content": long_question}, {"role": "assistant", "content": "Answer: 1"}]},
        {"messages": [{"role": "user", "content": "Only a question"}]},
        {"messages": [{"role": "user", "content": "Short"}, {"role": "assistant", "content": "Answer: 2"}]},
    ]
    prepared, _ = run(write_jsonl(rows), smol_tokenizer, max_seq_len=96)
    stats = prepared.stats
    assert stats["truncated"] == 2  # the long answer (kept, cut) and the long question (cut, then dropped)
    assert stats["dropped"] == 2  # the long question had no answer left; the lone question never had one
    assert stats["examples"] == 2
    assert stats["longest_example"] > 96
    assert max(len(s) for s in all_ids(prepared.train)) == 96


def test_packing_keeps_every_example_and_fills_sequences(smol_tokenizer: Any) -> None:
    plain, _ = run(BUILTIN["builtin:sample"], smol_tokenizer)
    packed, _ = run(BUILTIN["builtin:sample"], smol_tokenizer, packing=True, max_seq_len=512)
    split = packed.train
    assert len(split) < len(plain.train) / 4
    assert packed.stats["train"]["examples"] == plain.stats["train"]["examples"]
    assert packed.stats["train"]["fill"] > 0.9
    lengths = (split.seq_offsets[1:] - split.seq_offsets[:-1]).tolist()
    assert max(lengths) <= 512
    assert sorted(map(tuple, split_examples(split))) == sorted(map(tuple, split_examples(plain.train)))


def split_examples(split: TokenSplit) -> list[list[int]]:
    offsets = split.example_offsets.tolist()
    return [split.input_ids[a:b].tolist() for a, b in zip(offsets, offsets[1:], strict=False)]


def test_builtin_sample_is_fast_and_trains_the_answer_format(smol_tokenizer: Any) -> None:
    started = time.perf_counter()
    prepared, _ = run(BUILTIN["builtin:sample"], smol_tokenizer, eval_fraction=0.1)
    assert time.perf_counter() - started < 10
    stats = prepared.stats
    assert 300 <= stats["examples"] <= 500 and stats["skipped"] == stats["dropped"] == stats["truncated"] == 0
    assert 20 <= stats["eval"]["examples"] <= 60
    assert 0.3 < stats["masked_fraction"] < 0.8
    seq = prepared.train.sequence(0)
    text = smol_tokenizer.decode(seq["input_ids"][seq["labels"] != IGNORE_INDEX].tolist())
    assert text.startswith("Answer:") and "Reason:" in text and text.endswith("<|im_end|>")
    assert "examples" in summary_line(stats) and "0 skipped" in summary_line(stats)


def test_system_prompt_is_added_where_missing(write_jsonl: Callable[..., Path], smol_tokenizer: Any) -> None:
    prepared, _ = run(write_jsonl(rows_in("messages")[:1]), smol_tokenizer, system_prompt="Talk like a pirate.")
    assert "Talk like a pirate." in smol_tokenizer.decode(prepared.train.input_ids.tolist())


def test_a_tokenizer_without_chat_template_cannot_take_conversations(
    write_jsonl: Callable[..., Path], smollm2_hf_dir: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    tokenizer.chat_template = None
    path = write_jsonl(rows_in("messages"))
    with pytest.raises(DataError, match=rf"^{path}:1: the base model's tokenizer has no chat template"):
        run(path, tokenizer)
    assert run(write_jsonl(rows_in("text"), "t.jsonl"), tokenizer)[0].stats["examples"] == 4


def test_written_files_read_back(tmp_path: Path, smol_tokenizer: Any) -> None:
    prepared, _ = run(BUILTIN["builtin:sample"], smol_tokenizer, eval_fraction=0.1)
    write_prepared(prepared, tmp_path, smol_tokenizer)
    train = load_split(tmp_path / "train.safetensors")
    assert train.input_ids.tolist() == prepared.train.input_ids.tolist()
    assert train.labels.tolist() == prepared.train.labels.tolist()
    assert load_split(tmp_path / "eval.safetensors").num_tokens == prepared.eval.num_tokens
    assert json.loads((tmp_path / "stats.json").read_text()) == prepared.stats
    assert json.loads((tmp_path / "meta.json").read_text())["pad_token_id"] == smol_tokenizer.pad_token_id
    eval_rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert len(eval_rows) == prepared.stats["eval"]["examples"]
    assert eval_rows[0]["messages"][-1]["role"] == "assistant"


def test_no_eval_split_writes_an_empty_eval_file(
    tmp_path: Path, write_jsonl: Callable[..., Path], smol_tokenizer: Any
) -> None:
    prepared, _ = run(write_jsonl(rows_in("messages")), smol_tokenizer, eval_fraction=0.0)
    write_prepared(prepared, tmp_path, smol_tokenizer)
    assert len(load_split(tmp_path / "eval.safetensors")) == 0
    assert len(load_split(tmp_path / "train.safetensors")) == 4
