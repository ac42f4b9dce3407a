"""Data order: every sequence once per epoch, reshuffled per epoch, a pure function of (seed, step)."""

from __future__ import annotations

from forge.train.batches import BatchOrder


def test_each_epoch_visits_every_sequence_once_in_a_new_order():
    order = BatchOrder(num_sequences=10, batch_size=3, grad_accum=1, seed=7)
    assert order.micro_batches_per_epoch == 4  # 3 + 3 + 3 + 1
    epochs = [[i for m in range(4 * e, 4 * e + 4) for i in order.micro_batch(m)] for e in range(3)]
    for seen in epochs:
        assert sorted(seen) == list(range(10))
    assert epochs[0] != epochs[1] != epochs[2]


def test_order_depends_only_on_seed_and_step():
    a = BatchOrder(20, batch_size=2, grad_accum=3, seed=1)
    b = BatchOrder(20, batch_size=2, grad_accum=3, seed=1)
    b.step(11)  # touching later steps first changes nothing
    assert [a.step(s) for s in range(8)] == [b.step(s) for s in range(8)]
    assert BatchOrder(20, 2, 3, seed=2).step(0) != a.step(0)


def test_a_step_is_grad_accum_consecutive_micro_batches():
    order = BatchOrder(12, batch_size=2, grad_accum=4, seed=0)
    assert order.step(1) == [order.micro_batch(i) for i in range(4, 8)]
    # the same stream cut differently: batch 8 in one step equals 8 batches of 1
    big = BatchOrder(16, batch_size=8, grad_accum=1, seed=3).step(0)[0]
    small = [m[0] for m in BatchOrder(16, batch_size=1, grad_accum=8, seed=3).step(0)]
    assert big == small


def test_total_steps_from_epochs_or_max_steps():
    order = BatchOrder(10, batch_size=3, grad_accum=2, seed=0)  # 4 micro-batches per epoch
    assert order.total_steps(epochs=1.0, max_steps=None) == 2
    assert order.total_steps(epochs=2.5, max_steps=None) == 5
    assert order.total_steps(epochs=0.01, max_steps=None) == 1
    assert order.total_steps(epochs=3.0, max_steps=7) == 7
    assert order.epoch_at(2) == 1.0
