"""Turning examples into padded batches, and choosing which examples go together.

Labels are IGNORE_INDEX exactly where the attention mask is 0 (padding) or
the token is not supervised; they are never derived from the token's value,
so EOS, which doubles as the pad token for GPT-2, is still trained.

    >>> ex = Examples.from_lists([[5, 6, 50256], [7, 50256]])
    >>> b = collate(ex, [0, 1], pad_id=50256)
    >>> b["input_ids"].tolist(), b["attention_mask"].tolist(), b["labels"].tolist()
    ([[5, 6, 50256], [7, 50256, 50256]], [[1, 1, 1], [1, 1, 0]], [[5, 6, 50256], [7, 50256, -100]])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sftune.data import Examples

IGNORE_INDEX = -100  # label value cross-entropy skips


def collate(examples: Examples, indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad the chosen examples to the longest one. Returns int64 (B, T) tensors
    `input_ids`, `attention_mask` and `labels`."""
    lengths = [int(examples.offsets[i + 1] - examples.offsets[i]) for i in indices]
    width = max(lengths)
    input_ids = np.full((len(indices), width), pad_id, dtype=np.int64)
    labels = np.full((len(indices), width), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((len(indices), width), dtype=np.int64)
    for row, (i, n) in enumerate(zip(indices, lengths)):
        ids, supervised = examples.example(i)
        input_ids[row, :n] = ids
        attention_mask[row, :n] = 1
        labels[row, :n] = np.where(supervised, ids, IGNORE_INDEX)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "labels": torch.from_numpy(labels),
    }


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[np.ndarray]:
    """Index batches for one epoch: a permutation seeded by (seed, epoch), cut into
    `batch_size` rows; the last batch keeps the remainder (ceil(n / batch_size) batches,
    as the seed's DataLoader). Deterministic, so a run can be resumed mid-epoch.

    >>> [b.tolist() for b in epoch_batches(5, 2, seed=0, epoch=0, shuffle=False)]
    [[0, 1], [2, 3], [4]]
    """
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def length_sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Batches of similar length (longest first): for evaluation, where order does not matter."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padding_efficiency(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    """Real tokens / padded tokens computed, over the given batches (1.0 = no padding)."""
    lengths = np.asarray(lengths)
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return real / padded if padded else 1.0


def steps_per_epoch(n_examples: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch; a last, shorter group of micro-batches is still a step."""
    micro_batches = -(-n_examples // batch_size)
    return -(-micro_batches // grad_accum)
