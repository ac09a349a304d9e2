"""Token-weighted causal-LM loss.

The loss of an optimizer step is the sum of the token losses over every
supervised target of the step (all micro-batches, later all ranks) divided by
their count. Averaging per-micro-batch means instead (the 2024
gradient-accumulation bug) weights short sequences more than long ones.
Position t predicts token t+1, so a row of n supervised tokens has n-1 targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sftune.batching import IGNORE_INDEX


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """Number of positions the loss is computed on: labels after the shift that are not ignored."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def sum_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropies over supervised targets.

    logits: (B, T, V) in any dtype (upcast to fp32 for the softmax); labels: (B, T).
    Divide by the step's total `count_targets` to get the step loss.
    """
    # (B, T-1, V): position t scores token t+1
    shifted = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    return F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
