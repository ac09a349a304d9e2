"""Validation loss, token-weighted over the whole split.

val_loss = (sum of token losses over every target of the split) / (number of
targets), never a mean of per-batch means (which over-weights the tokens of
short batches); perplexity = exp(val_loss).

    sftune eval --model runs/quickstart --dataset examples/quickstart
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sftune.batching import collate, length_sorted_batches
from sftune.data import Examples
from sftune.loss import batch_loss_sum, count_targets
from sftune.runtime import autocast


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    targets: int  # tokens the loss averages over
    examples: int


@torch.no_grad()
def evaluate(model, examples: Examples, batch_size: int, pad_id: int, device: torch.device, precision: str,
             fused_ce: bool = False) -> EvalResult:
    """Token-weighted loss of `model` over all `examples` (batched by length: less padding, same result)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_targets = 0
    for indices in length_sorted_batches(examples.lengths, batch_size):
        batch = {k: v.to(device) for k, v in collate(examples, indices, pad_id).items()}
        with autocast(device, precision):
            loss_sum += batch_loss_sum(model, batch, fused_ce).double()
        n_targets += int(count_targets(batch["labels"]))
    model.train(was_training)
    loss = loss_sum.item() / max(n_targets, 1)  # note: .item() syncs once per evaluation, not per batch
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), targets=n_targets, examples=len(examples))
