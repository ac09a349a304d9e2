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


GROUP_CHUNK_STEPS = 64  # length grouping sorts chunks of this many optimizer steps' rows


def epoch_steps(
    lengths: np.ndarray,
    batch_size: int,
    grad_accum: int,
    seed: int,
    epoch: int,
    batch_tokens: int | None = None,
    group_by_length: bool = True,
) -> list[list[np.ndarray]]:
    """The optimizer steps of one epoch: each a list of `grad_accum` micro-batches of row indices.

    Rows are shuffled by (seed, epoch). With `group_by_length`, each chunk of
    `batch_size * grad_accum * 64` shuffled rows is sorted by length before it is cut,
    so a micro-batch holds rows of nearly equal length (almost no padding), and the
    steps are then shuffled. A micro-batch holds at most `batch_size` rows and, with
    `batch_tokens`, at most that many tokens padded (rows x longest row). Every row is
    used exactly once; the result is deterministic, so a run can resume mid-epoch, and
    a step holds the same rows for (batch 32, accum 1) and (batch 8, accum 4).

    >>> [[b.tolist() for b in s] for s in epoch_steps(np.array([3, 1, 2]), 2, 1, 0, 0, group_by_length=False)]
    [[[2, 0]], [[1]]]
    """
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if group_by_length:
        chunk = batch_size * grad_accum * GROUP_CHUNK_STEPS
        parts = [order[i : i + chunk] for i in range(0, len(order), chunk)]
        # longest first within each chunk (stable, so ties keep the shuffled order)
        parts = [p[np.argsort(-lengths[p], kind="stable")] for p in parts]
    else:
        parts = [order]
    micro = [b for p in parts for b in _cut(p, lengths, batch_size, batch_tokens)]
    steps = [micro[i : i + grad_accum] for i in range(0, len(micro), grad_accum)]
    if group_by_length:
        steps = [steps[i] for i in rng.permutation(len(steps))]
    return steps


def _cut(rows: np.ndarray, lengths: np.ndarray, batch_size: int, batch_tokens: int | None) -> list[np.ndarray]:
    """Cut `rows` in order into micro-batches of at most batch_size rows and batch_tokens padded tokens."""
    if batch_tokens is None:
        return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    batches, start, width = [], 0, 0
    for i, row in enumerate(rows):
        n = i - start
        new_width = max(width, int(lengths[row]))
        if n and (n >= batch_size or (n + 1) * new_width > batch_tokens):
            batches.append(rows[start:i])
            start, new_width = i, int(lengths[row])
        width = new_width
    if start < len(rows):
        batches.append(rows[start:])
    return batches


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
