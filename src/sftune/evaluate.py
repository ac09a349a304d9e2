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

import numpy as np
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
    group_losses: dict[str, float] | None = None  # (with `groups`) each group's own token-weighted loss, by name


@torch.no_grad()
def evaluate(model, examples: Examples, batch_size: int, pad_id: int, device: torch.device, precision: str,
             dist: Dist | None = None, stop: Callable[[], bool] | None = None,
             groups: list[tuple[str, int]] | None = None) -> EvalResult | None:
    """Token-weighted loss of `model` (a causal LM, or one wrapped in `CausalLMLoss`) over all `examples`,
    batched by length (less padding, same result); each rank evaluates its share of the batches.
    `stop()` is asked between batches: when it says True, the evaluation is abandoned and None returned.
    `groups`: (name, size) of consecutive runs of examples (a mixture's datasets), batched apart, each one's loss
    returned too; the total is still the sum over all targets / their count."""
    dist = dist or Dist(device=device)
    if not isinstance(model, CausalLMLoss):
        model = CausalLMLoss(model)
    was_training = model.training
    model.eval()
    sizes = [size for _, size in groups] if groups else [len(examples)]
    loss_sums = torch.zeros(len(sizes), dtype=torch.float64, device=device)
    model.eval_correct = correct = torch.zeros((), dtype=torch.long, device=device)  # counted by the loss module
    n_targets = [0] * len(sizes)
    every = [(g, [start + i for i in b]) for g, (start, size) in enumerate(zip(np.cumsum([0, *sizes[:-1]]), sizes))
             for b in length_sorted_batches(examples.lengths[start:start + size], batch_size)]
    batches = dist.shard(every)
    if dist.distributed:  # every rank runs as many forwards (FSDP gathers weights in each): idle batches fill up
        batches = batches + [(0, [])] * (-(-len(every) // dist.world_size) - len(batches))
    for group, indices in batches:
        if stop is not None and stop():
            model.train(was_training)
            model.eval_correct = None
            return None
        batch = collate(examples, indices, pad_id)
        n_targets[group] += count_targets(batch)  # host-side count: no sync
        batch = to_device(batch, device)
        with autocast(device, precision):
            loss_sums[group] += model(batch).double()
    model.train(was_training)
    model.eval_correct = None
    loss_sums = dist.all_reduce_sum(loss_sums).tolist()
    n_targets = dist.all_reduce_sum(torch.tensor(n_targets, dtype=torch.int64, device=device)).tolist()
    hits = int(dist.all_reduce_sum(correct))
    total = sum(n_targets)
    loss = sum(loss_sums) / max(total, 1)  # (the host syncs with the device once per evaluation, not per batch)
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), targets=total, examples=len(examples),
                      accuracy=hits / max(total, 1),
                      group_losses={name: s / max(n, 1) for (name, _), s, n in zip(groups, loss_sums, n_targets)}
                      if groups else None)
