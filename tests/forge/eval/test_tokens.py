"""Which tokens every model is scored on: labelled next tokens, whole examples, capped."""

from __future__ import annotations

import numpy as np

from forge.data.shards import Example, build_split
from forge.eval.tokens import select_examples

M = -100


def test_scored_positions_predict_exactly_the_labelled_tokens() -> None:
    ex = Example([5, 6, 7, 8, 9, 10], [M, M, M, 8, 9, 10])  # prompt 5 6 7, response 8 9 10
    evalset = select_examples(build_split([[ex]]), max_tokens=100)
    assert evalset.scored[0].tolist() == [2, 3, 4]  # the logits at 2 predict token 8, ...
    assert evalset.targets(0).tolist() == [8, 9, 10]
    assert (evalset.num_tokens, evalset.num_scored) == (6, 3)


def test_packed_examples_are_scored_separately_and_unlabelled_ones_skipped() -> None:
    a = Example([1, 2, 3], [M, 2, 3])
    b = Example([4, 5], [M, M])  # nothing to score
    c = Example([6, 7, 8], [M, M, 8])
    evalset = select_examples(build_split([[a, b, c]]), max_tokens=100)  # one packed sequence
    assert [s.tolist() for s in evalset.sequences] == [[1, 2, 3], [6, 7, 8]]
    assert [t.tolist() for t in [evalset.targets(0), evalset.targets(1)]] == [[2, 3], [8]]


def test_the_cap_cuts_the_last_example_and_stops() -> None:
    examples = [Example(list(range(10 * i, 10 * i + 10)), list(range(10 * i, 10 * i + 10))) for i in range(5)]
    evalset = select_examples(build_split([[e] for e in examples]), max_tokens=25)
    assert [len(s) for s in evalset.sequences] == [10, 10, 5]
    assert evalset.num_tokens == 25
    assert np.array_equal(evalset.targets(2), np.arange(21, 25))
