"""Packing: group short examples into sequences of at most max_seq_len tokens (best-fit decreasing).

Packed examples never attend to each other: each keeps its own position ids starting at 0, and the
train loop builds a block-causal mask from them (shards.block_causal_mask).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of the examples grouped into bins of total length <= capacity, longest examples first.

    Each example goes into the bin with the least room that still fits it, or a new bin: few bins,
    deterministic, O(n log n) lookups.
    """
    bins: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, bin index), sorted, only bins with room
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        size = lengths[i]
        if size > capacity:
            raise ValueError(f"example {i} has {size} tokens, more than the capacity {capacity}")
        k = bisect_left(rooms, (size, -1))
        if k == len(rooms):
            bins.append([i])
            room, b = capacity - size, len(bins) - 1
        else:
            room, b = rooms.pop(k)
            bins[b].append(i)
            room -= size
        if room > 0:
            insort(rooms, (room, b))
    return bins
