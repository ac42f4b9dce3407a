"""Dataset files to rows: JSONL, JSON, CSV, Parquet, a folder of them, or a dataset built into Forge.

Every row carries where it came from (`file:line`, or `file:row N` for Parquet) so that a problem can be
reported in one line. A row that cannot be read (malformed JSON, not an object, wrong number of CSV
fields) is yielded with its problem instead of a record; the caller decides to stop or to skip it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forge.data.errors import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN = {"builtin:sample": BUILTIN_DIR / "sample.jsonl"}


@dataclass(frozen=True)
class Row:
    """One dataset row: its location, and either the record or why it could not be read."""

    where: str
    record: dict[str, Any] | None
    problem: str | None = None


def resolve_dataset(spec: str, root: Path) -> Path:
    """The file or folder a `data.path` names: a built-in dataset, or a path relative to root."""
    if spec.startswith("builtin:"):
        if spec not in BUILTIN:
            raise DataError(spec, f"unknown built-in dataset (built in: {', '.join(BUILTIN)})")
        return BUILTIN[spec]
    path = Path(spec).expanduser()
    return path if path.is_absolute() else (root / path).resolve()


def dataset_files(path: Path) -> list[Path]:
    """The data files of a dataset: the file itself, or every supported file under a folder, sorted."""
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise DataError(str(path), f"unsupported file type '{path.suffix}' (use {', '.join(SUFFIXES)})")
        return [path]
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataError(str(path), f"no dataset files in this folder ({', '.join(SUFFIXES)})")
        return files
    raise DataError(str(path), "dataset not found")


def read_rows(path: Path) -> Iterator[Row]:
    """The rows of one data file, in order."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(str(path), f"unsupported file type '{path.suffix}' (use {', '.join(SUFFIXES)})")


def _object_row(where: str, value: Any) -> Row:
    if isinstance(value, dict):
        return Row(where, value)
    return Row(where, None, f"expected a JSON object, got {type(value).__name__}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(str(path), f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _read_jsonl(path: Path, text: str | None = None) -> Iterator[Row]:
    lines = (text if text is not None else _read_text(path)).splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Row(where, None, f"malformed JSON ({exc.msg} at column {exc.colno})")
            continue
        yield _object_row(where, value)


def _read_json(path: Path) -> Iterator[Row]:
    """A JSON array of objects, each row located at the line where its element starts; else JSON Lines."""
    text = _read_text(path)
    start = len(text) - len(text.lstrip())
    if not text.startswith("[", start):
        yield from _read_jsonl(path, text)  # many tools write JSON Lines under a .json name
        return
    decoder = json.JSONDecoder()
    pos = start + 1
    expect_value = True
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            raise DataError(f"{path}:{_line_of(text, pos)}", "malformed JSON (the array is not closed)")
        if text[pos] == "]":
            break
        if not expect_value:
            if text[pos] != ",":
                raise DataError(f"{path}:{_line_of(text, pos)}", "malformed JSON (expected ',' or ']')")
            pos += 1
            expect_value = True
            continue
        where = f"{path}:{_line_of(text, pos)}"
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}", f"malformed JSON ({exc.msg} at column {exc.colno})") from None
        expect_value = False
        yield _object_row(where, value)


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _read_csv(path: Path) -> Iterator[Row]:
    """CSV with a header row; each row located at the line where it starts (quoted cells may span lines)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header: list[str] | None = None
        line_before = 0
        try:
            for cells in reader:
                start, line_before = line_before + 1, reader.line_num
                if not cells or not any(c.strip() for c in cells):
                    continue
                if header is None:
                    header = [c.strip() for c in cells]
                    continue
                where = f"{path}:{start}"
                if len(cells) != len(header):
                    yield Row(where, None, f"has {len(cells)} fields, the header has {len(header)}")
                    continue
                yield Row(where, dict(zip(header, cells, strict=True)))
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}", f"malformed CSV ({exc})") from None
        except UnicodeDecodeError as exc:
            raise DataError(str(path), f"not UTF-8 text ({exc.reason})") from None


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(str(path), f"not a readable Parquet file ({exc})") from None
    number = 0
    for batch in table.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            number += 1
            yield Row(f"{path}:row {number}", record)
