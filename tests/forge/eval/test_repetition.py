"""The degenerate-output rule: a block repeated back to back at least 4 times over at least 16 tokens."""

from __future__ import annotations

from forge.eval.repetition import Loop, find_loop


def test_a_phrase_looping_at_the_end_is_found() -> None:
    intro = [11, 12, 13, 14, 15, 16, 17, 18]
    phrase = [21, 22, 23, 24]  # ", la Femme" as four tokens
    assert find_loop(intro + phrase * 6) == Loop(start=8, period=4, repeats=6)


def test_a_loop_in_the_middle_is_found_too() -> None:
    tokens = [1, 2, 3] + [7] * 20 + [4, 5, 6]
    assert find_loop(tokens) == Loop(start=3, period=1, repeats=20)


def test_a_few_repeats_or_a_short_run_are_not_degenerate() -> None:
    assert find_loop([21, 22, 23, 24] * 3 + [1, 2, 3]) is None  # three times only
    assert find_loop([9] * 15) is None  # 15 tokens: shorter than 16
    assert find_loop(list(range(200))) is None
    assert find_loop([]) is None


def test_a_numbered_list_is_not_a_loop() -> None:
    # "1. a\n2. b\n3. c\n..." repeats its separators but never a whole block back to back
    tokens = [t for i in range(10) for t in (100 + i, 50, 200 + i, 60)]
    assert find_loop(tokens) is None
