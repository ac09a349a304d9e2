"""Validation loss, token-weighted over the whole split.

val_loss = (sum of token losses over every target of the split, all ranks) / (number of
targets), never a mean of per-batch means (which over-weights the tokens of short
batches); perplexity = exp(val_loss); token accuracy = targets the argmax predicts / targets.

    sftune eval --model runs/quickstart --dataset examples/quickstart/data
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from sftune.batching import collate, count_targets, length_sorted_batches, to_device
from sftune.data.examples import Examples
from sftune.dist import Dist
from sftune.loss import CausalLMLoss
from sftune.runtime import autocast


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    targets: int  # tokens the loss averages over
    examples: int
    accuracy: float = 0.0  # share of the targets that the argmax predicts


@torch.no_grad()
def evaluate(model, examples: Examples, batch_size: int, pad_id: int, device: torch.device, precision: str,
             dist: Dist | None = None, stop: Callable[[], bool] | None = None) -> EvalResult | None:
    """Token-weighted loss of `model` (a causal LM, or one wrapped in `CausalLMLoss`) over all `examples`,
    batched by length (less padding, same result); each rank evaluates its share of the batches.
    `stop()` is asked between batches: when it says True, the evaluation is abandoned and None returned."""
    dist = dist or Dist(device=device)
    if not isinstance(model, CausalLMLoss):
        model = CausalLMLoss(model)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    model.eval_correct = correct = torch.zeros((), dtype=torch.long, device=device)  # counted by the loss module
    n_targets = 0
    every = length_sorted_batches(examples.lengths, batch_size)
    batches = dist.shard(every)
    if dist.distributed:  # every rank runs as many forwards (FSDP gathers weights in each): idle batches fill up
        batches = batches + [[]] * (-(-len(every) // dist.world_size) - len(batches))
    for indices in batches:
        if stop is not None and stop():
            model.train(was_training)
            model.eval_correct = None
            return None
        batch = collate(examples, indices, pad_id)
        n_targets += count_targets(batch)  # host-side count: no sync
        batch = to_device(batch, device)
        with autocast(device, precision):
            loss_sum += model(batch).double()
    model.train(was_training)
    model.eval_correct = None
    loss_sum, n_targets = dist.all_reduce_sum(loss_sum), dist.all_reduce_sum(n_targets)
    hits = int(dist.all_reduce_sum(correct))
    loss = loss_sum.item() / max(n_targets, 1)  # note: .item() syncs once per evaluation, not per batch
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), targets=n_targets, examples=len(examples),
                      accuracy=hits / max(n_targets, 1))
