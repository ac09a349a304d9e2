"""One optimizer step's forward and backward, and what happens when it cannot run.

`forward_backward` accumulates a step's gradients over its micro-batches (and ranks) so that they equal those of
the step's token mean. `GuardedStep` runs it for the loop: a step that runs out of memory, or whose batch shape
torch.compile fails on, is undone (its gradients dropped, its random draws given back), the state after the step
before is saved, and the error says what to change to go on exactly.

    guarded = GuardedStep(run, graphs, saves)
    loss_sum, step_targets = guarded.forward_backward(micro_batches)   # or SftuneError, the steps before kept
"""

from __future__ import annotations

import os

import torch

from sftune.batching import DEVICE_KEYS, count_targets, to_device
from sftune.dist import Dist
from sftune.errors import SftuneError
from sftune.graphs import StepGraphs
from sftune.runtime import autocast, compile_failure, out_of_memory


def forward_backward(model, micro_batches: list[dict], dist: Dist, precision: str, scaler,
                     graphs: StepGraphs | None = None, keys: tuple[str, ...] = DEVICE_KEYS) -> tuple[torch.Tensor, int]:
    """Accumulate one optimizer step's gradients; returns (sum of this rank's token losses, step targets).

    The step's loss is sum(token losses) / (targets of ALL its micro-batches on ALL ranks): each
    micro-batch's sum is divided by the global step total before backward, so the gradients add up
    to those of the step's token mean however the rows are split into micro-batches and ranks.
    (DDP averages gradients over ranks: the factor world_size undoes that average.)
    With `graphs`, each micro-batch's forward and backward is a CUDA graph replay (`graphs.py`). `keys`: what the
    loss module reads from a batch (its `device_keys`), copied to the device.
    """
    step_targets = dist.all_reduce_sum(sum(count_targets(b) for b in micro_batches))  # host counts: no device sync
    scale = dist.world_size / max(step_targets, 1)
    total = torch.zeros((), device=dist.device)
    for i, batch in enumerate(micro_batches):
        if graphs is not None and (loss_sum := graphs.run(batch, scale, first=i == 0)) is not None:
            total += loss_sum
            continue
        batch = to_device(batch, dist.device, keys)
        with dist.no_sync(model, last_micro_batch=i == len(micro_batches) - 1):  # all-reduce once per step
            # beside CUDA graphs (a shape whose capture failed), autocast as the captures ran it, without its cache
            # (the same casts, made at each use): what torch.compile compiled in a capture's warm-up (the blocks, the
            # loss's softmax) then serves the eager step; dynamo guards on that setting and would compile it again
            with autocast(dist.device, precision, cache=graphs is None):
                loss_sum = model(batch)
            scaler.scale(loss_sum * scale).backward()
        total += loss_sum.detach()
    return total, step_targets


def oom_fault(rank: int) -> tuple[str, int] | None:
    """The test hook SFTUNE_FAULT_OOM: "step N", "eval N" or "check N" runs out of memory ("... rank R": on rank R
    alone)."""
    fault = os.environ.get("SFTUNE_FAULT_OOM", "").split()
    return (fault[0], int(fault[1])) if fault and (len(fault) == 2 or int(fault[3]) == rank) else None


def within_memory(work, where: tuple[str, int], fault: tuple[str, int] | None = None) -> tuple:
    """(work(), None), or (None, the error's first line) when it runs out of memory; its tensors are freed by
    the time this returns. `fault` (the test hook, `oom_fault`): torch's error raised after the work at that
    `where` (a step's draws and gradients are made by then, as a real one can fail)."""
    try:
        result = work()
        if fault == where:
            raise torch.OutOfMemoryError("CUDA out of memory (test hook SFTUNE_FAULT_OOM)")
    except RuntimeError as e:  # (torch.OutOfMemoryError is one)
        if (failed := out_of_memory(e)) is None:
            raise
        return None, failed
    return result, None


def peak_memory(device: torch.device) -> str:
    """A CUDA device's peak allocated memory against its size, for the out-of-memory and memory-check lines."""
    return (f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} of "
            f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB at the peak")


def step_rng(device: torch.device) -> tuple:
    """The generators a step draws from (dropout, NEFTune: torch's, on its device), before the step."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_step_rng(rng: tuple, device: torch.device) -> None:
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state(rng[1], device)


class GuardedStep:
    """`forward_backward` for the loop, undone and said when it runs out of memory or its compile fails.

    `saves` (`saves.Saves`): where the state after the step before goes. `graphs`: the run's CUDA graphs, if any."""

    def __init__(self, run, graphs: StepGraphs | None, saves):
        self.run, self.graphs, self.saves = run, graphs, saves
        self.fault = oom_fault(run.dist.rank)

    def forward_backward(self, micro_batches: list[dict], memory_check: bool = False) -> tuple[torch.Tensor, int]:
        """The next step's (loss sum, targets), its gradients accumulated (`memory_check`: the memory check's
        micro-batch, run after the step before)."""
        run, step = self.run, self.run.state.step
        rng = step_rng(run.dist.device) if not run.dist.distributed else None  # (to undo a step that fails)
        done, failed = self._within_memory(micro_batches, rng, ("check", step) if memory_check else ("step", step + 1))
        if failed is not None:
            where = (f"in the memory check after step {step} (the heaviest micro-batch a step of this run can hold: "
                     f"--memory-check)" if memory_check else "")
            raise self.undo_out_of_memory(micro_batches, failed, rng, where)
        return done

    def _within_memory(self, micro_batches: list[dict], rng: tuple | None, at: tuple[str, int]) -> tuple:
        """`within_memory` of the micro-batches' forward and backward; when torch.compile's backend fails on a batch
        shape it meets (a step of a new shape compiles), the step undone as one that ran out of memory is, the steps
        before kept, and the way on said."""
        run, cfg = self.run, self.run.cfg
        try:
            return within_memory(lambda: forward_backward(run.model, micro_batches, run.dist, run.precision,
                                                          run.scaler, self.graphs, run.loss_model.device_keys), at,
                                 self.fault)
        except RuntimeError as e:
            if (failed := compile_failure(e)) is None or not (run.compile == "torch" or cfg.compile_blocks):
                raise
        run.optimizer.zero_grad(set_to_none=True)
        if rng is not None:
            set_step_rng(rng, run.dist.device)
        instead = ("with --compile graphs or off instead of --compile torch" if run.compile == "torch"
                   else "with --no-compile-blocks")
        raise SftuneError(
            f"torch.compile ({cfg.compile_backend}) failed in step {run.state.step + 1}{on_rank(run.dist)}: "
            f"{failed}; {self.saves.keep_the_steps(alone=True)}. Run again {instead} and --resume auto: the same "
            f"steps; or make the compiler work (inductor needs a C++ compiler on a CPU, Triton on a GPU)") from None

    def undo_out_of_memory(self, micro_batches: list[dict], what: str, rng: tuple | None,
                           where: str = "") -> SftuneError:
        """A step (or the memory check's micro-batch) that ran out of memory is undone (its gradients dropped, its
        random draws given back), the state after the step before is saved (in one process), and what to change
        is said."""
        run, cfg, device = self.run, self.run.cfg, self.run.dist.device
        run.optimizer.zero_grad(set_to_none=True)  # (the memory they held, for the save)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if rng is not None:
            set_step_rng(rng, device)  # the resumed step draws its dropout masks again, as this one did
        saved = self.saves.keep_the_steps(alone=True)
        rows, width = max((tuple(b["input_ids"].shape) for b in micro_batches), key=lambda s: s[0] * s[1])
        peak = f", {peak_memory(device)}" if device.type == "cuda" else ""
        split = (f"--batch-size {cfg.batch_size // 2} --grad-accum {cfg.grad_accum * 2} (the same rows in each step) "
                 f"or " if cfg.batch_size > 1 and cfg.batch_tokens is None else "")
        return SftuneError(
            f"out of memory {where or f'in step {run.state.step + 1}'}{on_rank(run.dist)} (micro-batches of up to "
            f"{rows} rows x {width} tokens{peak}: "
            f"{what}); {saved}. Make the step fit, then --resume auto: {split}--gradient-checkpointing keep the "
            f"steps, so the run continues exactly (a lower --max-length or --batch-tokens makes other steps: a new "
            f"run)")

    def check_memory(self) -> tuple[dict, str]:
        """--memory-check, after this process's first step (the optimizer's state exists by then): the heaviest
        micro-batch a step of the run can hold, forward and backward once, then undone (its gradients dropped, the
        generators set back, its counts not the run's), so a run that cannot fit it stops now rather than late in
        an epoch. Returns the batch and the log line, which gives the peak memory: the room for a larger
        --batch-size."""
        run, device = self.run, self.run.dist.device
        batch = run.steps.heaviest()
        rng = step_rng(device)
        self.forward_backward([batch], memory_check=True)
        run.optimizer.zero_grad(set_to_none=self.graphs is None or self.graphs.assign)
        set_step_rng(rng, device)
        run.loss_model.take_correct()  # (its counts are not the run's)
        run.loss_model.take_router_loss()
        rows, width = batch["input_ids"].shape
        fits = f"fits: {peak_memory(device)}" if device.type == "cuda" else "ran (a CPU's memory is not measured)"
        return batch, (f"memory check: the heaviest micro-batch a step can hold ({rows} rows x {width} tokens"
                       f"{' per rank' if run.dist.distributed else ''}) {fits} (--memory-check)")


def on_rank(dist: Dist) -> str:
    return f" on rank {dist.rank}" if dist.distributed else ""
