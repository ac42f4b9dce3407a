"""The eval split is seeded, deterministic, about the requested size, and stable under edits elsewhere."""

from __future__ import annotations

from forge.data.split import eval_mask, row_score

ROWS = [{"text": f"row {i}"} for i in range(2000)]


def held(rows: list[dict], fraction: float = 0.1, seed: int = 0) -> list[bool]:
    return eval_mask([row_score(r, seed) for r in rows], fraction)


def test_split_size_is_close_to_the_fraction_and_repeatable() -> None:
    mask = held(ROWS)
    assert 0.08 < sum(mask) / len(ROWS) < 0.12
    assert held(ROWS) == mask


def test_a_row_keeps_its_side_when_other_rows_change() -> None:
    before = dict(zip((r["text"] for r in ROWS), held(ROWS), strict=True))
    edited = ROWS[:500] + [{"text": "brand new"}] + ROWS[700:] + [{"text": "row 1", "extra": 1}]
    after = dict(zip((r["text"] for r in edited[:-1]), held(edited)[:-1], strict=True))
    assert all(after[k] == before[k] for k in after if k in before)


def test_the_seed_changes_the_split_and_key_order_does_not() -> None:
    assert held(ROWS, seed=1) != held(ROWS, seed=0)
    assert row_score({"a": 1, "b": 2}, 0) == row_score({"b": 2, "a": 1}, 0)


def test_tiny_datasets_get_one_row_on_each_side_and_zero_fraction_holds_none() -> None:
    assert sorted(held(ROWS[:2], fraction=0.01)) == [False, True]
    assert sorted(held(ROWS[:3], fraction=0.99)) == [False, True, True]
    assert held(ROWS[:1], fraction=0.99) == [False]
    assert not any(held(ROWS[:50], fraction=0.0))
