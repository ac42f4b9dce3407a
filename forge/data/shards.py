"""Token shards: what the data stage writes and the train stage reads (one safetensors file per split).

A split holds flat int arrays over all its tokens:
  input_ids     int32 [T]   token ids
  labels        int32 [T]   the token id where it is trained, -100 where it is masked (not yet shifted)
  position_ids  int32 [T]   restart at 0 at the first token of every example
  seq_offsets   int64 [N+1] where each training sequence starts (one example, or several when packed)
  example_offsets int64 [M+1] where each example starts (attention never crosses these boundaries)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

IGNORE_INDEX = -100


@dataclass
class Example:
    """One tokenized example: ids and labels of equal length (labels -100 where masked)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class TokenSplit:
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    seq_offsets: torch.Tensor
    example_offsets: torch.Tensor

    def __len__(self) -> int:
        return len(self.seq_offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def sequence(self, i: int) -> dict[str, torch.Tensor]:
        """The i-th training sequence as int64 tensors: input_ids, labels, position_ids."""
        a, b = int(self.seq_offsets[i]), int(self.seq_offsets[i + 1])
        return {
            "input_ids": self.input_ids[a:b].long(),
            "labels": self.labels[a:b].long(),
            "position_ids": self.position_ids[a:b].long(),
        }


def build_split(sequences: list[list[Example]]) -> TokenSplit:
    """Flatten training sequences (each a list of examples packed together) into a TokenSplit."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    seq_offsets = [0]
    example_offsets = [0]
    for seq in sequences:
        for ex in seq:
            if len(ex.input_ids) != len(ex.labels):
                raise ValueError("an example's input_ids and labels differ in length")
            ids += ex.input_ids
            labels += ex.labels
            positions += range(len(ex.input_ids))
            example_offsets.append(len(ids))
        seq_offsets.append(len(ids))
    return TokenSplit(
        input_ids=torch.tensor(ids, dtype=torch.int32),
        labels=torch.tensor(labels, dtype=torch.int32),
        position_ids=torch.tensor(positions, dtype=torch.int32),
        seq_offsets=torch.tensor(seq_offsets, dtype=torch.int64),
        example_offsets=torch.tensor(example_offsets, dtype=torch.int64),
    )


def save_split(split: TokenSplit, path: Path) -> None:
    save_file(
        {
            "input_ids": split.input_ids,
            "labels": split.labels,
            "position_ids": split.position_ids,
            "seq_offsets": split.seq_offsets,
            "example_offsets": split.example_offsets,
        },
        str(path),
    )


def load_split(path: Path) -> TokenSplit:
    t = load_file(str(path))
    return TokenSplit(t["input_ids"], t["labels"], t["position_ids"], t["seq_offsets"], t["example_offsets"])


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, S, S] mask, True where attention is allowed: causal and within one example.

    Examples are delimited by position ids restarting at 0; padding (position id -1) attends nowhere
    but to itself, so no row is empty.
    """
    starts = (position_ids == 0).long()
    doc = torch.cumsum(starts, dim=-1)  # example index of every token
    doc = torch.where(position_ids < 0, -1 - torch.arange(position_ids.shape[-1]), doc)
    same = doc.unsqueeze(-1) == doc.unsqueeze(-2)
    seq = position_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    return (same & causal).unsqueeze(1)


def collate(sequences: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad sequences into a batch: input_ids, labels (-100 on padding), position_ids, attention_mask.

    attention_mask is the [B, 1, S, S] block-causal boolean mask, so packed examples never see each other.
    """
    longest = max(len(s["input_ids"]) for s in sequences)
    batch = len(sequences)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.full((batch, longest), -1, dtype=torch.long)
    for row, s in enumerate(sequences):
        n = len(s["input_ids"])
        input_ids[row, :n] = s["input_ids"]
        labels[row, :n] = s["labels"]
        position_ids[row, :n] = s["position_ids"]
    mask = block_causal_mask(position_ids)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids.clamp(min=0),
        "attention_mask": mask,
    }


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The boolean block-causal mask as an additive float mask: 0 where allowed, dtype's minimum elsewhere.

    transformers passes a 4-D mask to the attention function as is. SDPA accepts the boolean mask, but
    eager attention adds the mask to the scores, so a boolean mask there is silently wrong; this float
    form is right for both (use it unless the attention implementation is known to take booleans).
    """
    return torch.full(mask.shape, torch.finfo(dtype).min, dtype=dtype, device=mask.device).masked_fill_(mask, 0.0)
