"""Validation loss, token-weighted over the whole split.

val_loss = (sum of token losses over every target of the split, all ranks) / (number of
targets), never a mean of per-batch means (which over-weights the tokens of short
batches); perplexity = exp(val_loss); token accuracy = targets the argmax predicts / targets.

    sftune eval --model runs/quickstart --dataset examples/quickstart/data

`Evaluations` is what the training loop makes of them: each recorded, the best tracked, early stopping decided.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from sftune.batching import collate, count_targets, length_sorted_batches, to_device
from sftune.console import MetricsWriter, log
from sftune.data.examples import Examples
from sftune.dist import Dist
from sftune.errors import SftuneError
from sftune.generate import complete_greedily
from sftune.loss import CausalLMLoss
from sftune.runtime import autocast
from sftune.signals import Preempted, StopFlag
from sftune.stepping import on_rank, oom_fault, within_memory


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


class Evaluations:
    """A training run's evaluations (`evals`, in order: {"step", "val_loss", "val_ppl", "val_token_accuracy"}; the
    run's state holds them, so a checkpoint keeps them): each made between steps, recorded in metrics.jsonl and
    the log, followed by samples of the prompts; the best one tracked (`--save-best`, `--final-model best`) and
    early stopping decided. `saves` (`saves.Saves`): what an evaluation that cannot finish says is kept."""

    def __init__(self, run, stop: StopFlag, metrics: MetricsWriter, saves, prompts: list[tuple[str, bool]]):
        self.run, self.stop, self.metrics, self.saves = run, stop, metrics, saves
        self.prompts = prompts  # (prompt, already rendered): completed greedily after each evaluation
        self.evals: list[dict] = run.state.evals
        self.fault = oom_fault(run.dist.rank)  # (the test hook)

    @property
    def last_step(self) -> int:
        return self.evals[-1]["step"]

    def make(self, step: int) -> bool:
        """Evaluate after `step` (log, metrics, samples). A signal stops it between batches (an evaluation of a
        large split takes minutes, past a scheduler's grace before SIGKILL): False, nothing recorded; the caller
        stops the run (after step 0: with a checkpoint, whose resume makes this evaluation)."""
        run, cfg, dist, stop = self.run, self.run.cfg, self.run.dist, self.stop
        started = time.perf_counter()
        groups = run.steps.validation_groups  # a mixture's datasets: each one's val loss too
        # (under torchrun the ranks agree between batches, so all of them stop at the same one)
        asked = (lambda: dist.any(stop.signum is not None)) if dist.distributed else (lambda: stop.signum is not None)
        result, failed = within_memory(
            lambda: evaluate(run.loss_model, run.steps.validation, cfg.eval_batch_size, run.tokenizer.pad_token_id,
                             dist.device, run.precision, dist, stop=asked, groups=groups),
            ("eval", step), self.fault)
        if failed is not None:
            if dist.device.type == "cuda":
                torch.cuda.empty_cache()
            resumed = "" if step == 0 else " (the resume makes this evaluation)"
            raise SftuneError(f"out of memory evaluating at step {step}{on_rank(dist)} (batches of up to "
                              f"{cfg.eval_batch_size} rows: {failed}); {self.saves.keep_the_steps(alone=True)}"
                              f"{resumed}. Lower --eval-batch-size (it changes no training step), then --resume auto")
        if result is None:  # a signal
            if step == 0:  # nothing trained, nothing to keep
                raise Preempted(stop.signum or 15, None)
            log(f"eval  step {step:>6,} | stopped by {signal.Signals(stop.signum or 15).name} (the resume makes it)")
            return False
        record = {"step": step, "val_loss": result.loss, "val_ppl": result.perplexity,
                  "val_token_accuracy": result.accuracy}
        if groups:
            record["val_loss_by_dataset"] = result.group_losses
        self.evals.append(record)
        best = "" if step == 0 else self._track_best(record)
        self.metrics.write({"type": "eval", **record})
        log(f"eval  step {step:>6,} | val_loss {result.loss:.4f} | val_ppl {result.perplexity:,.2f} "
            f"| acc {result.accuracy:.3f} | {result.targets:,} target tokens{best}")
        if groups:
            log("      by dataset: " + " | ".join(f"{name} {loss:.4f}" for name, loss in
                                                  record["val_loss_by_dataset"].items()))
        self.write_samples(step)
        self.saves.window.exclude(time.perf_counter() - started)
        return True

    def write_samples(self, step: int) -> None:
        """Greedy completions of the sample prompts, to see how the model changes (rank 0; under FSDP every rank
        generates in step, the root's weights gathered for it, and rank 0 writes)."""
        run, dist = self.run, self.run.dist
        if not self.prompts or not (dist.is_main or dist.sharded):
            return
        if dist.sharded:
            run.loss_model.unshard()
        texts = complete_greedily(run.loss_model.model, run.tokenizer, self.prompts, run.cfg.sample_max_new_tokens,
                                  chat=run.steps.layout.is_chat, synced=dist.sharded)
        for i, ((prompt, _), text) in enumerate(zip(self.prompts, texts)):
            self.metrics.write({"type": "sample", "step": step, "index": i, "prompt": prompt, "completion": text})
            log(f"sample step {step:,}: {prompt!r} -> {text!r}")
        if dist.sharded:
            run.loss_model.reshard()

    def best(self) -> dict | None:
        """The evaluation with the lowest val loss after training started (None before the first)."""
        return next((e for e in self.evals if e["step"] == self.run.state.best_step), None)

    def _track_best(self, record: dict) -> str:
        """Note a new best evaluation (after training started); say how it compares."""
        best = self.best()
        if best is None or record["val_loss"] < best["val_loss"] - self.run.cfg.early_stopping_min_delta:
            self.run.state.best_step = record["step"]
            return " | best so far"
        return f" | best {best['val_loss']:.4f} at step {best['step']:,}"

    def patience_spent(self) -> bool:
        """Early stopping: `early_stopping_patience` evaluations since the best without an improvement."""
        patience, best_step = self.run.cfg.early_stopping_patience, self.run.state.best_step
        if not patience or best_step is None:
            return False
        return sum(e["step"] > best_step for e in self.evals) >= patience

    def say_early_stop(self, step: int) -> None:
        best = self.best()
        log(f"early stopping at step {step:,}: the val loss has not improved on {best['val_loss']:.4f} (step "
            f"{best['step']:,}) for {self.run.cfg.early_stopping_patience} evaluations (--early-stopping-patience)")
        self.metrics.write({"type": "early_stop", "step": step, "best_step": best["step"]})
