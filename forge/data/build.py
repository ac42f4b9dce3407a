"""The data stage's work, top to bottom: dataset files and a tokenizer to train/eval token splits + stats.

read rows -> normalize (format) -> render with the chat template -> tokenize and label -> truncate,
drop examples with nothing to train -> hashed train/eval split -> optional packing -> shards.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forge.config import DataConfig
from forge.data.encoding import encode, trained_count, truncate
from forge.data.errors import DataError
from forge.data.formats import Sample, describe_formats, detect_format, to_sample
from forge.data.labels import Drops, count_labels, never_stops_warning, stop_token_ids
from forge.data.packing import pack
from forge.data.readers import dataset_files, read_rows
from forge.data.shards import IGNORE_INDEX, Example, TokenSplit, build_split, save_split
from forge.data.split import eval_mask, row_score
from forge.data.templating import Rendered, render_chat, render_text

REPORTED_PROBLEMS = 20  # skipped rows listed by name in stats.json (all are counted)


@dataclass
class Item:
    """A readable row: where it is, its raw record (hashed for the split) and its normalized sample."""

    where: str
    record: dict[str, Any]
    sample: Sample


@dataclass
class Prepared:
    train: TokenSplit
    eval: TokenSplit
    eval_samples: list[Sample]
    stats: dict[str, Any]


class Problems:
    """Bad rows: the first one stops the run (on_error=fail), or each is counted and skipped (skip)."""

    def __init__(self, on_error: str, log: Callable[[str], None]) -> None:
        self.skip = on_error == "skip"
        self.log = log
        self.count = 0
        self.listed: list[str] = []

    def report(self, error: DataError) -> None:
        if not self.skip:
            raise error
        self.count += 1
        if len(self.listed) < REPORTED_PROBLEMS:
            self.listed.append(str(error))
            self.log(f"skipped {error}")


def read_samples(
    files: list[Path], cfg: DataConfig, problems: Problems, log: Callable[[str], None], limit: int | None = None
) -> tuple[list[Item], dict[str, str]]:
    """Every readable row of every file (the first `limit` when set), normalized; the format used for each file."""
    items: list[Item] = []
    formats: dict[str, str] = {}
    for path in files:
        if limit is not None and len(items) >= limit:
            break
        fmt = None if cfg.format == "auto" else cfg.format
        for row in read_rows(path):
            if limit is not None and len(items) >= limit:
                break
            if row.record is None:
                problems.report(DataError(row.where, row.problem or "unreadable row"))
                continue
            if fmt is None:
                fmt = detect_format(row.record)
                if fmt is None:
                    keys = ", ".join(map(str, row.record)) or "none"
                    problems.report(
                        DataError(
                            row.where, f"cannot tell the format from the keys ({keys}); expected {describe_formats()}"
                        )
                    )
                    continue
                log(f"{path}: format auto -> {fmt} (from the keys of its first row)")
            try:
                items.append(Item(row.where, row.record, to_sample(row.record, fmt, row.where, cfg.system_prompt)))
            except DataError as error:
                problems.report(error)
        if fmt is not None:
            formats[str(path)] = fmt
    return items, formats


def render_items(tokenizer: Any, items: list[Item], train_on: str, problems: Problems) -> list[tuple[Item, Rendered]]:
    """Each item as text plus trained spans; a conversation the template rejects is a bad row."""
    rendered = []
    for item in items:
        if item.sample.messages is None:
            rendered.append((item, render_text(tokenizer, item.sample.text or "")))
            continue
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                item.where,
                "the base model's tokenizer has no chat template, which conversations need (use format: text)",
            )
        try:
            rendered.append((item, render_chat(tokenizer, item.sample.messages, train_on, item.where)))
        except DataError as error:
            problems.report(error)
    return rendered


def sequences(examples: list[Example], max_seq_len: int, packing: bool) -> list[list[Example]]:
    """Training sequences: one example each, or examples packed up to max_seq_len tokens."""
    if not packing:
        return [[e] for e in examples]
    return [[examples[i] for i in group] for group in pack([len(e.input_ids) for e in examples], max_seq_len)]


def prepare(source: Path, tokenizer: Any, cfg: DataConfig, log: Callable[[str], None] = print) -> Prepared:
    """Read, template, tokenize, mask, split and pack the dataset at source."""
    files = dataset_files(source)
    problems = Problems(cfg.on_error, log)
    items, formats = read_samples(files, cfg, problems, log)
    rows = len(items) + problems.count
    rendered = render_items(tokenizer, items, cfg.train_on, problems)
    encoded = encode(tokenizer, [r for _, r in rendered])

    kept: list[tuple[Item, Example]] = []
    drops = Drops()
    truncated = longest = 0
    for (item, _), example in zip(rendered, encoded, strict=True):
        longest = max(longest, len(example.input_ids))
        masked = trained_count(example) == 0
        example, cut = truncate(example, cfg.max_seq_len)
        truncated += cut
        if masked or trained_count(example) == 0:  # nothing to learn from
            drops.add(item.where, "masked" if masked else "cut")
            continue
        kept.append((item, example))
    if drops.total:
        log(drops.line(len(rendered), cfg))
    if not kept:
        raise DataError(str(source), drops.nothing_left(len(rendered), problems.count, cfg))
    dropped = drops.total
    stops = stop_token_ids(tokenizer)
    stop_labels = sum(count_labels(ex, stops) for _, ex in kept)
    warnings = [] if stop_labels else [never_stops_warning(stops)]
    for warning in warnings:
        log(f"warning: {warning}")

    held = eval_mask([row_score(item.record, cfg.seed) for item, _ in kept], cfg.eval_fraction)
    train = [ex for (_, ex), h in zip(kept, held, strict=True) if not h]
    held_out = [ex for (_, ex), h in zip(kept, held, strict=True) if h]
    train_split = build_split(sequences(train, cfg.max_seq_len, cfg.packing))
    eval_split = build_split(sequences(held_out, cfg.max_seq_len, cfg.packing))

    chosen = sorted(set(formats.values()))
    stats = {
        "format": chosen[0] if len(chosen) == 1 else "mixed",
        "format_from": cfg.format,
        "formats": formats,
        "files": len(files),
        "rows": rows,
        "skipped": problems.count,
        "skipped_rows": problems.listed,
        "dropped": dropped,
        "dropped_masked": drops.masked,
        "dropped_cut": drops.cut,
        "dropped_rows": drops.listed,
        "truncated": truncated,
        "longest_example": longest,
        "examples": len(kept),
        "train": split_stats(train_split, cfg.max_seq_len),
        "eval": split_stats(eval_split, cfg.max_seq_len),
        "train_on": cfg.train_on,
        "max_seq_len": cfg.max_seq_len,
        "packing": cfg.packing,
        "stop_token_labels": stop_labels,
        "warnings": warnings,
    }
    tokens = stats["train"]["tokens"] + stats["eval"]["tokens"]
    trained = stats["train"]["trained_tokens"] + stats["eval"]["trained_tokens"]
    stats["tokens"] = tokens
    stats["masked_fraction"] = round(1 - trained / tokens, 4)
    eval_samples = [item.sample for (item, _), h in zip(kept, held, strict=True) if h]
    return Prepared(train_split, eval_split, eval_samples, stats)


def split_stats(split: TokenSplit, max_seq_len: int) -> dict[str, Any]:
    """Examples, sequences, tokens, trained tokens and how full the sequences are."""
    sequences_count = len(split)
    return {
        "examples": len(split.example_offsets) - 1,
        "sequences": sequences_count,
        "tokens": split.num_tokens,
        "trained_tokens": int((split.labels != IGNORE_INDEX).sum()),
        "fill": round(split.num_tokens / (sequences_count * max_seq_len), 4) if sequences_count else 0.0,
    }


def summary_line(stats: dict[str, Any]) -> str:
    """One line for the console: examples, split, tokens, format and what was cut or left out."""
    return (
        f"{stats['examples']} example{'' if stats['examples'] == 1 else 's'} "
        f"({stats['train']['examples']} train / {stats['eval']['examples']} eval), "
        f"{stats['tokens']:,} tokens, {1 - stats['masked_fraction']:.0%} trained, format {stats['format']}; "
        f"{stats['truncated']} truncated, {stats['dropped']} dropped, {stats['skipped']} skipped"
        + (f"; warning: {'; '.join(stats['warnings'])}" if stats.get("warnings") else "")
    )


def write_prepared(prepared: Prepared, out: Path, tokenizer: Any) -> None:
    """train/eval shards, stats.json, meta.json (what the train stage needs) and eval.jsonl (held-out rows)."""
    save_split(prepared.train, out / "train.safetensors")
    save_split(prepared.eval, out / "eval.safetensors")
    (out / "stats.json").write_text(json.dumps(prepared.stats, indent=2, ensure_ascii=False))
    eos = tokenizer.eos_token_id
    pad = next((i for i in (tokenizer.pad_token_id, eos) if i is not None), 0)  # padding is never attended
    meta = {
        "pad_token_id": pad,
        "eos_token_id": eos,
        "max_seq_len": prepared.stats["max_seq_len"],
        "packing": prepared.stats["packing"],
        "train_on": prepared.stats["train_on"],
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    with open(out / "eval.jsonl", "w", encoding="utf-8") as f:
        for sample in prepared.eval_samples:
            f.write(json.dumps(sample.to_json(), ensure_ascii=False) + "\n")
