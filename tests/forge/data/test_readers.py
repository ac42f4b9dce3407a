"""Every file type parses, rows carry file:line, unreadable rows carry their reason."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forge.data.errors import DataError
from forge.data.readers import BUILTIN, dataset_files, read_rows, resolve_dataset

ROWS = [{"text": "first"}, {"text": "second"}, {"text": "third"}]


def records(path: Path) -> list[tuple[str, dict | None, str | None]]:
    return [(r.where, r.record, r.problem) for r in read_rows(path)]


def test_jsonl_rows_are_numbered_by_line_and_blank_lines_skipped(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "first"}\n\n{"text": "second"}\n{"text": "third"}\n')
    assert records(path) == [
        (f"{path}:1", ROWS[0], None),
        (f"{path}:3", ROWS[1], None),
        (f"{path}:4", ROWS[2], None),
    ]


def test_jsonl_malformed_line_and_non_object_are_row_problems(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "broken"\n[1, 2]\n')
    rows = list(read_rows(path))
    assert rows[0].record == {"text": "ok"}
    assert rows[1].where == f"{path}:2" and rows[1].record is None and "malformed JSON" in rows[1].problem
    assert rows[2].where == f"{path}:3" and "expected a JSON object, got list" in rows[2].problem


def test_json_array_rows_are_located_at_the_line_their_element_starts(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS, indent=2))  # each element spans 3 lines, from line 2
    assert records(path) == [(f"{path}:2", ROWS[0], None), (f"{path}:5", ROWS[1], None), (f"{path}:8", ROWS[2], None)]


def test_json_file_holding_json_lines_is_read_as_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    assert [r.record for r in read_rows(path)] == ROWS


def test_json_array_broken_inside_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": }\n]\n')
    with pytest.raises(DataError, match=rf"^{path}:3: malformed JSON"):
        list(read_rows(path))


def test_csv_rows_keep_the_line_they_start_on_across_quoted_newlines(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('instruction,input,output\n"Say hi",,"Hi\nthere"\n\nAdd 1 and 2,,3\nonly,two\n')
    rows = records(path)
    assert rows[0] == (f"{path}:2", {"instruction": "Say hi", "input": "", "output": "Hi\nthere"}, None)
    assert rows[1] == (f"{path}:5", {"instruction": "Add 1 and 2", "input": "", "output": "3"}, None)
    assert rows[2][0] == f"{path}:6" and rows[2][2] == "has 2 fields, the header has 3"


def test_parquet_rows_are_numbered(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert records(path) == [(f"{path}:row {i + 1}", r, None) for i, r in enumerate(ROWS)]


def test_a_folder_yields_its_supported_files_sorted_and_skips_hidden_ones(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / ".cache").mkdir()
    for name in ("b/2.jsonl", "a.csv", "c.parquet", "notes.txt", ".cache/x.jsonl"):
        (tmp_path / name).write_text("")
    assert dataset_files(tmp_path) == [tmp_path / "a.csv", tmp_path / "b/2.jsonl", tmp_path / "c.parquet"]


@pytest.mark.parametrize(
    ("name", "message"),
    [("missing.jsonl", "dataset not found"), ("notes.txt", "unsupported file type '.txt'")],
)
def test_bad_dataset_paths_are_one_line_errors(tmp_path: Path, name: str, message: str) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=f"^{tmp_path / name}: {message}"):
        dataset_files(tmp_path / name)


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no dataset files"):
        dataset_files(tmp_path)


def test_builtin_sample_resolves_to_the_packaged_file_and_relative_paths_to_the_root(tmp_path: Path) -> None:
    assert resolve_dataset("builtin:sample", tmp_path) == BUILTIN["builtin:sample"]
    assert BUILTIN["builtin:sample"].is_file()
    assert resolve_dataset("data/x.jsonl", tmp_path) == tmp_path / "data" / "x.jsonl"
    with pytest.raises(DataError, match="unknown built-in dataset"):
        resolve_dataset("builtin:nope", tmp_path)
