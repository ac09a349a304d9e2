"""The examples store: a split's tokenized examples, flat in numpy arrays, and what happened to its rows.

Owns `Examples` (example i is `input_ids[offsets[i]:offsets[i+1]]`, with a `supervised`
mask), its save/load format (three .npy files, memory-mapped on load), the counts of
training targets, and `SplitStats`. Imports nothing else from sftune.

    >>> ex = Examples.from_lists([[5, 6, 7], [8, 9]], [[False, True, True], [True, True]])
    >>> (len(ex), ex.lengths.tolist(), count_targets(ex))
    (2, [3, 2], 3)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DROP_REASONS = ("empty", "too_short", "overlong", "no_targets")


@dataclass
class Examples:
    """Tokenized examples of one split, flat: example i is `input_ids[offsets[i]:offsets[i+1]]`."""

    input_ids: np.ndarray  # (total_tokens,) int32
    supervised: np.ndarray  # (total_tokens,) bool: True where the token is a training target
    offsets: np.ndarray  # (n + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[lo:hi], self.supervised[lo:hi]

    @classmethod
    def from_lists(cls, ids: list[list[int]], supervised: list[list[bool]] | None = None) -> "Examples":
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(x) for x in ids])
        flat = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(offsets[-1]))
        if supervised is None:
            mask = np.ones(len(flat), dtype=bool)
        else:
            mask = np.fromiter((m for x in supervised for m in x), dtype=bool, count=int(offsets[-1]))
        return cls(flat, mask, offsets)

    def save(self, prefix: Path) -> None:
        np.save(f"{prefix}.input_ids.npy", self.input_ids)
        np.save(f"{prefix}.supervised.npy", self.supervised)
        np.save(f"{prefix}.offsets.npy", self.offsets)

    @classmethod
    def load(cls, prefix: Path) -> "Examples":
        return cls(*(np.load(f"{prefix}.{k}.npy", mmap_mode="r") for k in ("input_ids", "supervised", "offsets")))


def concat_examples(parts: list[Examples]) -> Examples:
    """The examples of `parts`, one after the other.

    >>> ex = concat_examples([Examples.from_lists([[1, 2]]), Examples.from_lists([[3], [4, 5]], [[False], [True, False]])])
    >>> (ex.lengths.tolist(), ex.example(2)[0].tolist(), ex.supervised.tolist())
    ([2, 1, 2], [4, 5], [True, True, False, True, False])
    """
    starts = np.cumsum([0] + [len(p.input_ids) for p in parts[:-1]])
    offsets = np.concatenate([[0]] + [p.offsets[1:] + start for p, start in zip(parts, starts)]).astype(np.int64)
    return Examples(np.concatenate([p.input_ids for p in parts]).astype(np.int32, copy=False),
                    np.concatenate([p.supervised for p in parts]).astype(bool, copy=False), offsets)


def weighted_count(size: int, weight: float) -> int:
    """Examples an epoch takes of a dataset of `size` examples at `weight` (rounded half up)."""
    return int(np.floor(weight * size + 0.5))


def weighted_selection(sizes: list[int], weights: list[float], seed: int, epoch: int) -> np.ndarray:
    """The examples one epoch trains on, of datasets laid end to end (`sizes`), each `weight` times its size
    (rounded): whole copies for whole weights; otherwise the epoch takes the next stretch of an endless sequence of
    the dataset's shuffled copies (seeded by seed and copy), so over epochs each example comes as often as any other
    (0.5: half of them in one epoch, the other half in the next).

    >>> weighted_selection([3, 2], [2, 1], seed=0, epoch=0).tolist()
    [0, 1, 2, 0, 1, 2, 3, 4]
    >>> halves = [weighted_selection([4], [0.5], seed=0, epoch=e).tolist() for e in (0, 1)]
    >>> sorted(halves[0] + halves[1]), len(halves[0])
    ([0, 1, 2, 3], 2)
    """
    picked, start = [], 0
    for i, (size, weight) in enumerate(zip(sizes, weights)):
        count = weighted_count(size, weight)
        if count % max(size, 1) == 0:
            picked.append(np.tile(np.arange(start, start + size), count // max(size, 1)))
        else:
            first, last = epoch * count, (epoch + 1) * count  # this epoch's stretch of the endless sequence
            copies = [np.random.default_rng([seed, i, c]).permutation(size) for c in range(first // size,
                                                                                            (last - 1) // size + 1)]
            offset = first - (first // size) * size
            picked.append(start + np.concatenate(copies)[offset:offset + count])
        start += size
    return np.concatenate(picked).astype(np.int64) if picked else np.zeros(0, dtype=np.int64)


def count_targets(examples: Examples) -> int:
    """Tokens the loss is computed on: supervised tokens that have a previous token to predict them from."""
    firsts = examples.supervised[examples.offsets[:-1]].sum() if len(examples) else 0
    return int(examples.supervised.sum() - firsts)


def drop_untrained(examples: Examples) -> tuple[Examples, int]:
    """Remove examples with no training target (no supervised token after the first), so they never
    reach the loss; returns the rest and how many were removed.

    >>> kept, n = drop_untrained(Examples.from_lists([[1, 2], [3, 4]], [[True, True], [True, False]]))
    >>> (len(kept), n, kept.example(0)[0].tolist())
    (1, 1, [1, 2])
    """
    lengths = examples.lengths
    starts = examples.offsets[:-1]
    # supervised tokens per example, minus the first token's (it is never predicted)
    per_example = np.add.reduceat(examples.supervised.astype(np.int64), starts) if len(examples) else np.zeros(0)
    per_example = per_example - examples.supervised[starts].astype(np.int64)
    has_targets = (per_example > 0) & (lengths > 1)
    if has_targets.all():
        return examples, 0
    keep = np.flatnonzero(has_targets)
    token_mask = np.repeat(has_targets, lengths)
    offsets = np.zeros(len(keep) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths[keep])
    return Examples(np.ascontiguousarray(examples.input_ids[token_mask]),
                    np.ascontiguousarray(examples.supervised[token_mask]), offsets), int(len(examples) - len(keep))


@dataclass
class SplitStats:
    """What happened to one split's rows."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    turns_cut: int = 0  # chat examples cut after their last whole turn that fits (--overlong truncate)
    dropped: dict[str, int] = field(default_factory=lambda: {r: 0 for r in DROP_REASONS})
    tokens: int = 0  # tokens of kept examples, EOS included
    supervised_tokens: int = 0  # training targets: supervised tokens after the first of each example
    untrained_tokens: int = 0  # tokens of kept examples the loss never sees (prompts, headers, BOS)
    boundary_merges: int = 0  # examples whose parts tokenize differently when joined (see tokenize_split)
    length: dict[str, float] = field(default_factory=dict)  # mean, p50, p90, p95, p99, max of kept examples


def sum_stats(parts: list[SplitStats], lengths: np.ndarray) -> SplitStats:
    """One split's statistics over several datasets: counts added, lengths summarised over all kept `lengths`."""
    total = SplitStats(dropped={r: sum(p.dropped.get(r, 0) for p in parts) for r in DROP_REASONS},
                       length=length_summary(lengths))
    for name in ("rows", "kept", "truncated", "turns_cut", "tokens", "supervised_tokens", "untrained_tokens",
                 "boundary_merges"):
        setattr(total, name, sum(getattr(p, name) for p in parts))
    return total


def length_summary(lengths: np.ndarray) -> dict[str, float]:
    if len(lengths) == 0:
        return {}
    p = np.percentile(lengths, [50, 90, 95, 99])
    return {
        "mean": round(float(lengths.mean()), 2),
        "p50": float(p[0]),
        "p90": float(p[1]),
        "p95": float(p[2]),
        "p99": float(p[3]),
        "max": int(lengths.max()),
    }
