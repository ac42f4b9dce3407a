"""The data stage: the dataset, templated with the base model's tokenizer, to train/eval token shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape

from forge.config import LoadedConfig
from forge.data.build import prepare, summary_line, write_prepared
from forge.data.readers import dataset_files, resolve_dataset
from forge.pipeline import Stage, StageContext, sha256_file


class DataStage(Stage):
    name = "data"
    version = 1
    needs = ("base",)
    config_keys = ("data",)

    def external_inputs(self, loaded: LoadedConfig) -> dict[str, str]:
        """sha256 of every dataset file, keyed by its path inside the dataset (the file name for a file)."""
        source = resolve_dataset(loaded.config.data.path, loaded.root)
        base = source if source.is_dir() else source.parent
        return {f"data/{p.relative_to(base).as_posix()}": sha256_file(p) for p in dataset_files(source)}

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from transformers import AutoTokenizer

        cfg = ctx.config.data
        source = resolve_dataset(cfg.path, ctx.loaded.root)
        tokenizer = AutoTokenizer.from_pretrained(Path(ctx.inputs["base"]) / "model")
        prepared = prepare(source, tokenizer, cfg, lambda line: ctx.log(escape(line)))  # rows are not markup
        write_prepared(prepared, ctx.out, tokenizer)
        stats = prepared.stats
        return {
            "line": summary_line(stats),
            "examples": stats["examples"],
            "train_sequences": stats["train"]["sequences"],
            "eval_sequences": stats["eval"]["sequences"],
            "tokens": stats["tokens"],
            "format": stats["format"],
            "warnings": stats["warnings"],
        }
