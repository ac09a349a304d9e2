"""The training loop, top to bottom in one function. Everything it loops over is built in `build.py`.

    sftune train --config configs/quickstart.yaml
    sftune train --model ../shared/models/gpt2 --init random --dataset ../shared/data/sst2 --max-steps 20
    python -c "import sftune; sftune.train(sftune.load_config('configs/quickstart.yaml'))"
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sftune.batching import DEVICE_KEYS, count_targets, pin, prefetch, to_device
from sftune.build import Run, build_run
from sftune.casts import MatmulCasts
from sftune.checkpoint import CheckpointNotWritten, weights_finite
from sftune.config import SFTConfig
from sftune.console import MetricsWriter, log, no_library_bars
from sftune.dist import Dist
from sftune.errors import SftuneError, TrainingDiverged
from sftune.evaluate import evaluate
from sftune.generate import complete
from sftune.graphs import StepGraphs, shape_key
from sftune.modeling import save_model
from sftune.outputs import publish_model
from sftune.runtime import autocast, compile_failure, flops_per_token, keep_freed_memory, out_of_memory, peak_flops
from sftune.signals import Preempted, StopFlag, stop_on_signals
from sftune.update import NonFiniteGuard, clip_gradients


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    tokens: int  # non-pad tokens trained on
    seconds: float
    evals: list[dict] = field(default_factory=list)  # {"step", "val_loss", "val_ppl", "val_token_accuracy"} in order
    samples: dict[str, str] = field(default_factory=dict)  # prompt -> completion

    @property
    def first_val_loss(self) -> float:
        return self.evals[0]["val_loss"]

    @property
    def last_val_loss(self) -> float:
        return self.evals[-1]["val_loss"]


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
            with autocast(dist.device, precision):
                loss_sum = model(batch)
            scaler.scale(loss_sum * scale).backward()
        total += loss_sum.detach()
    return total, step_targets


class LogWindow:
    """What the log line reports: token-weighted loss, token accuracy and throughput since the last log line.
    Time spent evaluating and saving is kept out of the throughput.

    Under torchrun each rank sums its own targets' losses and hits; a checkpoint keeps the sums over all ranks,
    and a resumed run gives them back to rank 0 alone (the all-reduce at the next log line adds the rest)."""

    def __init__(self, saved: dict, dist: Dist, loss_model):
        mine = dist.is_main  # the saved sums are all ranks' together
        self.loss = torch.full((), saved.get("loss", 0.0) if mine else 0.0, device=dist.device)  # on the device
        self.steps, self.targets, self.tokens = saved.get("steps", 0), saved.get("targets", 0), saved.get("tokens", 0)
        self.correct = saved.get("correct", 0) if mine else 0  # argmax hits (the loss module counts them)
        self.router = saved.get("router", 0.0) if mine else 0.0  # load-balancing loss x targets (mixture of experts)
        self.loss_model = loss_model
        self.start = time.perf_counter()

    def add(self, loss_sum: torch.Tensor, targets: int, tokens: int) -> None:
        self.loss += loss_sum
        self.steps, self.targets, self.tokens = self.steps + 1, self.targets + targets, self.tokens + tokens

    def exclude(self, seconds: float) -> None:
        self.start += seconds

    def close(self, dist: Dist) -> dict:
        """The window's figures: token-weighted `loss` over all ranks' targets, `token_accuracy`, `tokens_per_s`,
        `ms_per_step`, and for a mixture of experts `router_loss` (its load-balancing loss, target-weighted, before
        the coefficient); then a new window starts. note: .item() syncs (and the all-reduce under torchrun); once
        per log line."""
        seconds = max(time.perf_counter() - self.start, 1e-9)
        loss_sum, correct, router = self.totals(dist)
        targets = max(self.targets, 1)
        result = {"loss": loss_sum / targets, "token_accuracy": correct / targets, "tokens_per_s": self.tokens / seconds,
                  "ms_per_step": 1000 * seconds / max(self.steps, 1)}
        if self.loss_model.router is not None:
            result["router_loss"] = router / targets
        self.loss.zero_()
        self.steps, self.targets, self.tokens, self.correct, self.router = 0, 0, 0, 0, 0.0
        self.start = time.perf_counter()
        return result

    def totals(self, dist: Dist) -> tuple[float, int, float]:
        """(sum of token losses, argmax hits, load-balancing loss x targets) over all ranks: a collective (targets
        and tokens are global already)."""
        self.correct += self.loss_model.take_correct()
        self.router += self.loss_model.take_router_loss()
        return (dist.all_reduce_sum(self.loss.clone()).item(), dist.all_reduce_sum(self.correct),
                dist.all_reduce_sum(self.router) if self.loss_model.router is not None else 0.0)

    def saved(self, dist: Dist) -> dict:
        """What a checkpoint keeps: the sums over all ranks (a collective)."""
        loss_sum, correct, router = self.totals(dist)
        return {"loss": loss_sum, "steps": self.steps, "targets": self.targets, "tokens": self.tokens,
                "correct": correct, "router": router}


def eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@no_library_bars()
def train(cfg: SFTConfig) -> TrainResult:
    """Fine-tune `cfg.model` on `cfg.dataset` and write the model, config and metrics to the output dir."""
    with stop_on_signals() as stop:  # from the start: while preparing it stops at once, then at the next check
        run = build_run(cfg, stop)
        try:
            return fit(run, stop)
        finally:
            run.close()


def fit(run: Run, stop: StopFlag) -> TrainResult:
    """The loop: optimizer steps from `run.steps`, evals, checkpoints, the final model."""
    cfg, dist, model, state, out = run.cfg, run.dist, run.model, run.state, run.out
    hf_model = run.loss_model.model  # the Hugging Face model inside the wrappers: what is saved and sampled
    optimizer, scheduler, scaler, precision = run.optimizer, run.scheduler, run.scaler, run.precision
    total_steps, per_epoch = run.steps.total_steps, run.steps.steps_per_epoch
    keep_metrics_until(out / "metrics.jsonl", state.step if run.resumed_from else -1, dist)  # redone steps go
    tracker = None
    if dist.is_main and cfg.report_to != "none":
        from sftune.config import to_dict
        from sftune.tracking import Tracker

        tracker = Tracker(cfg.report_to, out, state.run_id, to_dict(cfg), state.step if run.resumed_from else -1)
    metrics = MetricsWriter(out / "metrics.jsonl" if dist.is_main else None, tracker)
    run.closers.append(metrics.close)  # (closed here at the end; by `Run.close` after an error)
    chat = run.steps.layout.is_chat
    peak = peak_flops(dist.device, precision)  # MFU on known GPUs: model FLOPs of the real tokens / the peak rate
    if peak:
        lengths = run.steps.train.lengths if hasattr(run.steps, "train") else run.steps.validation.lengths
        token_flops = flops_per_token(hf_model, float(lengths.mean()), frozen_base=run.adapter is not None)
    prompts = [(p, False) for p in cfg.sample_prompts or []] + [
        (p, True) for p in validation_prompts(run, chat and cfg.sample_prompts != [])]  # ([]: no samples at all)
    if run.resumed_from is not None:
        metrics.write({"type": "resume", "step": state.step, "checkpoint": str(run.resumed_from)})
    evals: list[dict] = state.evals

    fault = os.environ.get("SFTUNE_FAULT_OOM", "").split()  # test hook: "step N" or "eval N" runs out of memory
    # ("... rank R": on rank R alone)
    oom_fault = (fault[0], int(fault[1])) if fault and (len(fault) == 2 or int(fault[3]) == dist.rank) else None

    def within_memory(work, where: tuple[str, int]) -> tuple:
        """(work(), None), or (None, the error's first line) when it runs out of memory; its tensors are freed by
        the time this returns. The test hook raises torch's error after the work (a step's draws and gradients are
        made by then, as a real one can fail)."""
        try:
            result = work()
            if oom_fault == where:
                raise torch.OutOfMemoryError("CUDA out of memory (test hook SFTUNE_FAULT_OOM)")
        except RuntimeError as e:  # (torch.OutOfMemoryError is one)
            if (failed := out_of_memory(e)) is None:
                raise
            return None, failed
        return result, None

    def run_eval(step: int) -> bool:
        """Evaluate after `step` (log, metrics, samples). A signal stops it between batches (an evaluation of a
        large split takes minutes, past a scheduler's grace before SIGKILL): False, nothing recorded; the caller
        stops the run (after step 0: with a checkpoint, whose resume makes this evaluation)."""
        started = time.perf_counter()
        groups = run.steps.validation_groups  # a mixture's datasets: each one's val loss too
        # (under torchrun the ranks agree between batches, so all of them stop at the same one)
        asked = (lambda: dist.any(stop.signum is not None)) if dist.distributed else (lambda: stop.signum is not None)
        result, failed = within_memory(
            lambda: evaluate(run.loss_model, run.steps.validation, cfg.eval_batch_size, run.tokenizer.pad_token_id,
                             dist.device, precision, dist, stop=asked, groups=groups),
            ("eval", step))
        if failed is not None:
            if dist.device.type == "cuda":
                torch.cuda.empty_cache()
            resumed = "" if step == 0 else " (the resume makes this evaluation)"
            raise SftuneError(f"out of memory evaluating at step {step}{on_rank()} (batches of up to "
                              f"{cfg.eval_batch_size} rows: {failed}); {keep_the_steps(alone=True)}{resumed}. "
                              f"Lower --eval-batch-size (it changes no training step), then --resume auto")
        if result is None:  # a signal
            if step == 0:  # nothing trained, nothing to keep
                raise Preempted(stop.signum or 15, None)
            log(f"eval  step {step:>6,} | stopped by {signal.Signals(stop.signum or 15).name} (the resume makes it)")
            return False
        record = {"step": step, "val_loss": result.loss, "val_ppl": result.perplexity,
                  "val_token_accuracy": result.accuracy}
        if groups:
            record["val_loss_by_dataset"] = result.group_losses
        evals.append(record)
        best = "" if step == 0 else track_best(record)
        metrics.write({"type": "eval", **record})
        log(f"eval  step {step:>6,} | val_loss {result.loss:.4f} | val_ppl {result.perplexity:,.2f} "
            f"| acc {result.accuracy:.3f} "
            f"| {result.targets:,} target tokens{best}")
        if groups:
            log("      by dataset: " + " | ".join(f"{name} {loss:.4f}" for name, loss in
                                                  record["val_loss_by_dataset"].items()))
        write_samples(step)
        window.exclude(time.perf_counter() - started)
        return True

    def write_samples(step: int) -> None:
        """Greedy completions of the sample prompts, to see how the model changes (rank 0; under FSDP every rank
        generates in step, the root's weights gathered for it, and rank 0 writes)."""
        if not prompts or not (dist.is_main or dist.sharded):
            return
        if dist.sharded:
            run.loss_model.unshard()
        for i, (prompt, rendered) in enumerate(prompts):
            text = complete(hf_model, run.tokenizer, prompt, cfg.sample_max_new_tokens, temperature=0.0,
                            chat=chat, rendered=rendered, synced=dist.sharded)[0]
            metrics.write({"type": "sample", "step": step, "index": i, "prompt": prompt, "completion": text})
            log(f"sample step {step:,}: {prompt!r} -> {text!r}")
        if dist.sharded:
            run.loss_model.reshard()

    def say_early_stop(step: int) -> None:
        best = best_eval()
        log(f"early stopping at step {step:,}: the val loss has not improved on {best['val_loss']:.4f} (step "
            f"{best['step']:,}) for {cfg.early_stopping_patience} evaluations (--early-stopping-patience)")
        metrics.write({"type": "early_stop", "step": step, "best_step": best["step"]})

    def best_eval() -> dict | None:
        """The evaluation with the lowest val loss after training started (None before the first)."""
        return next((e for e in evals if e["step"] == state.best_step), None)

    def track_best(record: dict) -> str:
        """Note a new best evaluation (after training started); say how it compares."""
        best = best_eval()
        if best is None or record["val_loss"] < best["val_loss"] - cfg.early_stopping_min_delta:
            state.best_step = record["step"]
            return " | best so far"
        return f" | best {best['val_loss']:.4f} at step {best['step']:,}"

    def patience_spent() -> bool:
        """Early stopping: `early_stopping_patience` evaluations since the best without an improvement."""
        if not cfg.early_stopping_patience or state.best_step is None:
            return False
        return sum(e["step"] > state.best_step for e in evals) >= cfg.early_stopping_patience

    def safety_checkpoint() -> None:
        """--save-minutes': a checkpoint for a crash. One that cannot be written (a full disk: a run that asked for
        no checkpoints should not stop for them) is a warning, and the next is tried later (every rank learns it
        from rank 0: `Checkpointer.save` raises on all)."""
        nonlocal last_saved
        try:
            checkpoint_now()
        except CheckpointNotWritten as e:
            if cfg.save_every or cfg.save_best:
                raise
            last_saved = time.perf_counter()
            log(f"warning: no checkpoint for safety at step {state.step} ({e.cause}); training goes on, and the "
                f"next is tried in {cfg.save_minutes:g} minutes (--save-minutes null: none)")

    def keep_the_steps(alone: bool = False) -> str:
        """Before a run stops on an error it can name: the state after its last step saved (unless it is already),
        and where. Under torchrun a rank that failed `alone` (ran out of memory, or its compile failed) cannot save:
        the other ranks wait for it in a collective (a step's gradient all-reduce, FSDP's gathers), so it names the
        newest checkpoint instead."""
        if state.step == 0:
            return "nothing was trained yet, so nothing was saved"
        if saved_at and saved_at[-1].name == f"step-{state.step}":
            return f"the state after step {state.step} is saved in {saved_at[-1]}"
        if not (alone and dist.distributed):
            return f"the state after step {state.step} is saved in {checkpoint_now()}"
        dist.abandon()  # (its collectives cannot complete: the process group is left to the process's exit)
        newest = (f"the newest checkpoint is {saved_at[-1]} (--resume auto trains the "
                  f"{state.step - int(saved_at[-1].name[5:])} step(s) after it again)" if saved_at
                  else "no checkpoint was written yet")
        every = f"--save-minutes {cfg.save_minutes:g}" if cfg.save_minutes is not None else "--save-every N"
        return (f"the other ranks wait for this one in a collective, so this state cannot be saved (torchrun ends "
                f"them): {newest} ({every} saves more often)")

    def on_rank() -> str:
        return f" on rank {dist.rank}" if dist.distributed else ""

    def checkpoint_now() -> Path:
        nonlocal last_saved
        settle()  # (a skipped step is logged before the checkpoint that follows it)
        started = time.perf_counter()
        state.evals, state.window, state.elapsed_s = evals, window.saved(dist), time.perf_counter() - start
        path = run.checkpointer.save(state, run.loss_model, optimizer, scheduler, scaler)
        log(f"checkpoint: {path}")
        saved_at.append(path)
        last_saved = time.perf_counter()
        window.exclude(time.perf_counter() - started)
        return path

    # --- the loop -------------------------------------------------------------
    keep_freed_memory(dist.device)  # a CPU's: each step's big temporaries reuse freed memory, not new pages
    model.train()
    window = LogWindow(state.window, dist, run.loss_model)  # a resumed run continues the window where it stopped
    start = time.perf_counter() - state.elapsed_s
    if run.resumed_from is None:
        run_eval(0)
        if dist.any(stop.signum is not None):  # nothing trained yet: nothing to save
            raise Preempted(stop.signum or 15, None)
    started_here, first_step = time.perf_counter(), state.step  # for the ETA: this process's pace (evals included)
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", disable=None if dist.is_main else True,
               dynamic_ncols=True, mininterval=1.0)
    bad_in_a_row, saved_at, stopped_early = 0, [run.resumed_from] if run.resumed_from else [], False
    last_saved = time.perf_counter()  # --save-minutes counts from this process's start or its last save
    if run.resumed_from is not None and evals[-1]["step"] != state.step and eval_due(cfg, state, total_steps):
        # the checkpoint was written when a signal (or an out of memory) stopped this step's evaluation: made now,
        # before any further step, as the uninterrupted run made it (the best model, early stopping)
        if not run_eval(state.step):
            raise Preempted(stop.signum or 15, run.resumed_from)  # (nothing new to save)
        if patience_spent():
            say_early_stop(state.step)
            stopped_early = True
    compile_s = 0.0  # seconds of steps that captured a CUDA graph or compiled a new batch shape (this process)
    nan_steps = {int(x) for x in os.environ.get("SFTUNE_FAULT_NAN_STEPS", "").split(",") if x.strip()}
    graphs = None
    if run.compile == "graphs":  # (bf16: the matrix products' weights cast in one pass, checked at each capture;
        # not with compiled blocks, which would compile each shape twice: for fp32 weights, then their bf16 copies)
        one_pass = precision == "bf16" and not cfg.compile_blocks
        casts = MatmulCasts.for_model(run.loss_model, torch.bfloat16) if one_pass else None
        graphs = StepGraphs(run.loss_model, dist.device, precision, cfg.compile == "graphs", casts=casts)
    shapes_seen: set[tuple] = set()  # graphs and compile: a step with a new batch shape captures or compiles it
    static = run.steps.padding.static  # (graphs, --compile torch or compiled blocks: the shapes that need it)
    guard = NonFiniteGuard(optimizer, scaler, precision, dist)
    profiler = None  # --profile-steps A-B
    if cfg.profile_steps:
        from sftune.config import profile_range
        from sftune.profiling import StepProfiler

        profiler = StepProfiler(profile_range(cfg.profile_steps), out / "profile", dist)
        run.closers.append(profiler.close)  # (an error: dropped, nothing written)

    def settle() -> None:
        """Act on the last step's verdict: the guard decided on the device whether to apply its update; the host
        learns it here, at the next step or before anything that writes or logs."""
        nonlocal bad_in_a_row
        if (verdict := guard.settle()) is None:
            return
        step, skipped = verdict
        if not skipped:
            bad_in_a_row = 0
            return
        if not weights_finite(run.loss_model, dist):  # (rare: a sync only here) the update before broke them
            raise TrainingDiverged(
                f"the update of step {step - 1} made the weights non-finite (lr {scheduler.get_last_lr()[0]:g}); "
                f"nothing from it was saved. Lower --lr and resume from "
                f"{saved_at[-1] if saved_at else 'the start (no checkpoint was written)'} with --resume auto")
        bad_in_a_row += 1
        metrics.write({"type": "skip", "step": step, "reason": "non-finite loss or gradient norm"})
        log(f"step {step:,}: non-finite loss or gradient norm, update skipped "
            f"({bad_in_a_row} in a row, limit --max-bad-steps {cfg.max_bad_steps})")
        if bad_in_a_row > cfg.max_bad_steps:
            path = checkpoint_now()  # the weights are those of the last good step: bad steps changed nothing
            raise TrainingDiverged(
                f"{bad_in_a_row} optimizer steps in a row had a non-finite loss or gradient norm (step {step}); "
                f"stopped with the last good state saved in {path}. Lower --lr, set --max-grad-norm, use "
                f"--precision fp32 or bf16, or raise --max-bad-steps; then --resume auto.")

    def undo_out_of_memory(micro_batches: list[dict], what: str, rng: tuple | None, where: str = "") -> SftuneError:
        """A step (or `check_memory`'s micro-batch) that ran out of memory is undone (its gradients dropped, its random
        draws given back), the state after the step before is saved (in one process), and what to change is said."""
        optimizer.zero_grad(set_to_none=True)  # (the memory they held, for the save)
        if dist.device.type == "cuda":
            torch.cuda.empty_cache()
        if rng is not None:
            set_step_rng(rng, dist.device)  # the resumed step draws its dropout masks again, as this one did
        saved = keep_the_steps(alone=True)
        rows, width = max((tuple(b["input_ids"].shape) for b in micro_batches), key=lambda s: s[0] * s[1])
        peak = f", {peak_memory(dist.device)}" if dist.device.type == "cuda" else ""
        split = (f"--batch-size {cfg.batch_size // 2} --grad-accum {cfg.grad_accum * 2} (the same rows in each step) "
                 f"or " if cfg.batch_size > 1 and cfg.batch_tokens is None else "")
        return SftuneError(
            f"out of memory {where or f'in step {state.step + 1}'}{on_rank()} (micro-batches of up to {rows} rows x "
            f"{width} tokens{peak}: "
            f"{what}); {saved}. Make the step fit, then --resume auto: {split}--gradient-checkpointing keep the "
            f"steps, so the run continues exactly (a lower --max-length or --batch-tokens makes other steps: a new "
            f"run)")

    def forward_backward_guarded(micro_batches: list[dict], where: tuple[str, int], rng: tuple | None) -> tuple:
        """`within_memory` of the micro-batches' forward and backward; when torch.compile's backend fails on a batch
        shape it meets (a step of a new shape compiles), the step undone as one that ran out of memory is, the steps
        before kept, and the way on said."""
        try:
            return within_memory(lambda: forward_backward(model, micro_batches, dist, precision, scaler, graphs,
                                                          run.loss_model.device_keys), where)
        except RuntimeError as e:
            if (failed := compile_failure(e)) is None or not (run.compile == "torch" or cfg.compile_blocks):
                raise
        optimizer.zero_grad(set_to_none=True)
        if rng is not None:
            set_step_rng(rng, dist.device)
        instead = ("with --compile graphs or off instead of --compile torch" if run.compile == "torch"
                   else "without --compile-blocks")
        raise SftuneError(
            f"torch.compile ({cfg.compile_backend}) failed in step {state.step + 1}{on_rank()}: {failed}; "
            f"{keep_the_steps(alone=True)}. Run again {instead} and --resume auto: the same steps; or make the "
            f"compiler work (inductor needs a C++ compiler on a CPU, Triton on a GPU)") from None

    def check_memory() -> None:
        """--memory-check, after this process's first step (the optimizer's state exists by then): the heaviest
        micro-batch a step of the run can hold, forward and backward once, then undone (its gradients dropped, the
        generators set back, its counts out of the log window), so a run that cannot fit it stops now rather than
        late in an epoch; the log gives the peak memory, the room for a larger --batch-size."""
        started = time.perf_counter()
        batch = run.steps.heaviest()
        rng = step_rng(dist.device)
        _, failed = forward_backward_guarded([batch], ("check", state.step), rng)
        if failed is not None:
            raise undo_out_of_memory([batch], failed, rng, where=f"in the memory check after step {state.step} (the "
                                     f"heaviest micro-batch a step of this run can hold: --memory-check)")
        optimizer.zero_grad(set_to_none=graphs is None or graphs.assign)
        set_step_rng(rng, dist.device)
        run.loss_model.take_correct()  # (its counts are not the run's)
        run.loss_model.take_router_loss()
        if static:
            shapes_seen.add(shape_key(batch, run.loss_model.device_keys))
        window.exclude(time.perf_counter() - started)
        rows, width = batch["input_ids"].shape
        fits = f"fits: {peak_memory(dist.device)}" if dist.device.type == "cuda" else \
            "ran (a CPU's memory is not measured)"
        log(f"memory check: the heaviest micro-batch a step can hold ({rows} rows x {width} tokens"
            f"{' per rank' if dist.distributed else ''}) {fits} (--memory-check)")

    memory_check = cfg.memory_check == "on" or (cfg.memory_check == "auto" and dist.device.type == "cuda")
    if memory_check and (cfg.packing or cfg.streaming):
        if cfg.memory_check == "on":
            log("memory check: not made: " + ("packed micro-batches all have one shape (the first step's)"
                                               if cfg.packing else "a stream's longest rows are not known ahead"))
        memory_check = False
    steps = run.steps.remaining(state) if state.step < total_steps and not stopped_early else iter(())
    if dist.device.type == "cuda":  # the next step's batches are made and pinned while the GPU runs this one
        steps = prefetch(steps, prepare=lambda s: replace(s, micro_batches=[pin(b) for b in s.micro_batches]))
    for step_data in steps:
        if profiler is not None:
            profiler.before(state.step + 1)
        settle()  # the previous step's verdict: read now that this step's batches are ready (no wait by then)
        micro_batches = step_data.micro_batches
        started_step = time.perf_counter()
        rng = step_rng(dist.device) if not dist.distributed else None  # (to undo a step that runs out of memory)
        done, failed = forward_backward_guarded(micro_batches, ("step", state.step + 1), rng)
        if failed is not None:
            raise undo_out_of_memory(micro_batches, failed, rng)
        loss_sum, step_targets = done
        shapes = {shape_key(b, run.loss_model.device_keys) for b in micro_batches} if static else set()
        if not shapes_seen.issuperset(shapes):
            shapes_seen |= shapes  # (this step's time is mostly capture or compile: a one-off, not the run's pace)
            compile_s += time.perf_counter() - started_step
            window.exclude(time.perf_counter() - started_step)
        step_tokens = step_data.tokens  # all ranks' real tokens, counted on the host
        if state.step + 1 in nan_steps:  # test hook: SFTUNE_FAULT_NAN_STEPS
            loss_sum = loss_sum * float("nan")
        scaler.unscale_(optimizer)
        grad_norm, divisor = clip_gradients(model, cfg.max_grad_norm, into_update=guard.on_device and not dist.sharded)
        loss_sum = guard.step(loss_sum, grad_norm, state.step + 1, divisor)  # the update, unless non-finite
        scaler.update()
        # (an adding graph adds into the same gradient tensors each step; an assigning one writes its own)
        optimizer.zero_grad(set_to_none=graphs is None or graphs.assign)
        scheduler.step()
        state.step += 1
        state.step_in_epoch += 1
        state.stream = step_data.stream
        state.tokens += step_tokens
        state.padded_tokens += step_data.padded_tokens
        window.add(loss_sum, step_targets, step_tokens)
        step = state.step
        bar.update(1)
        if profiler is not None:
            profiler.after(step)

        if step == 1 and cfg.log_every > 1:  # a first sign of life within seconds, even without a terminal
            settle()
            first = dist.all_reduce_sum(loss_sum.clone()).item()
            log(f"step      1/{total_steps:,} | loss {first / max(step_targets, 1):.4f} "
                f"| {time.perf_counter() - window.start:.1f} s for the first step")
        if step % cfg.log_every == 0 or step == total_steps:
            settle()
            figures = window.close(dist)
            loss, accuracy, rate = figures["loss"], figures["token_accuracy"], figures["tokens_per_s"]
            lr = scheduler.get_last_lr()[0]
            epoch_at = round(step / per_epoch, 4) if per_epoch else step_data.epoch
            left = (time.perf_counter() - started_here) / max(step - first_step, 1) * (total_steps - step)
            record = {"type": "train", "step": step, "epoch": epoch_at, "loss": loss, "token_accuracy": accuracy,
                      **({"router_loss": figures["router_loss"]} if "router_loss" in figures else {}),
                      "lr": lr, "grad_norm": float(grad_norm),  # this step's, before clipping
                      "tokens": state.tokens, "padded_tokens": state.padded_tokens,
                      "elapsed_s": round(time.perf_counter() - start, 3), "tokens_per_s": rate, "eta_s": round(left)}
            if static:
                record["compile_s"] = round(compile_s, 3)
            if dist.device.type == "cuda":
                record["peak_memory_gb"] = torch.cuda.max_memory_allocated(dist.device) / 2**30
            if peak:
                record["mfu"] = rate * token_flops / (peak * dist.world_size)
            metrics.write(record)
            # (a stream's epochs have no known length: which one)
            where = f"epoch {epoch_at:.2f}" if per_epoch else f"epoch {step_data.epoch + 1} (streamed)"
            log(f"step {step:>6,}/{total_steps:,} | {where} | loss {loss:.4f} | acc {accuracy:.3f} "
                + (f"| router {figures['router_loss']:.4f} " if "router_loss" in figures else "")
                + f"| lr {lr:.2e} | {rate:,.0f} tok/s | {figures['ms_per_step']:.0f} ms/step | {state.tokens:,} tokens "
                f"| eta {eta(left)}" + (f" | {record['peak_memory_gb']:.1f} GiB peak" if "peak_memory_gb" in record
                                        else "") + (f" | MFU {100 * record['mfu']:.1f}%" if "mfu" in record else ""))
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
        if cfg.eval_every and step % cfg.eval_every == 0:
            run_eval(step)
        saved = False
        if step_data.last_in_epoch:  # validate, then the next epoch starts at its beginning
            if evals[-1]["step"] != step:
                run_eval(step)
            state.epoch, state.step_in_epoch, state.stream = step_data.epoch + 1, 0, None
            if cfg.save_every:
                checkpoint_now()
                saved = True
        due = cfg.save_minutes is not None and time.perf_counter() - last_saved >= cfg.save_minutes * 60
        stopping, due = dist.any_each(stop.signum is not None, due)  # all ranks stop (or save) at the same step
        if stopping:  # (an epoch's end with --save-every has just saved this step)
            raise Preempted(stop.signum or 15, saved_at[-1] if saved else checkpoint_now())
        new_best = cfg.save_best and state.best_step == step  # (set by an evaluation of this step)
        if (cfg.save_every and step % cfg.save_every == 0 or new_best) and not saved:
            checkpoint_now()
        elif due and not saved:
            safety_checkpoint()
        if patience_spent():
            say_early_stop(step)
            stopped_early = True
            break
        if step >= total_steps:
            break
        if memory_check:  # (once this process's first step is logged and saved as asked)
            memory_check = False
            check_memory()
    settle()
    if profiler is not None:
        profiler.close(state.step)  # (a run that ended inside the range: what was profiled)
    if hasattr(steps, "close"):
        steps.close()  # (a prefetching thread stops)
    if evals[-1]["step"] != state.step and not run_eval(state.step):  # the end of max_steps (or of a stream)
        raise Preempted(stop.signum or 15, checkpoint_now())  # (a signal stopped it: the resume makes it)
    if state.step < total_steps and not stopped_early:  # only a stream can end first: its length was unknown
        log(f"the stream ran out at step {state.step:,}, before max_steps {total_steps:,}")
    bar.close()
    seconds = time.perf_counter() - start
    samples = write_outputs(run, evals, metrics, saved_at[-1] if saved_at else None)  # the model, the report
    return TrainResult(out, state.step, state.tokens, seconds, evals, samples)


def write_outputs(run: Run, evals: list[dict], metrics: MetricsWriter, last_saved: Path | None) -> dict[str, str]:
    """After the loop: the final model written (the best evaluation's with --final-model best; LoRA: the adapter,
    and with --merge the merged model beside it), the checkpoints kept only for safety removed, the metrics closed,
    the run's report, and the samples of the sample prompts (returned: prompt -> completion)."""
    cfg, dist, state, out = run.cfg, run.dist, run.state, run.out
    hf_model = run.loss_model.model
    if not weights_finite(run.loss_model, dist):
        raise TrainingDiverged(f"the weights after step {state.step} are not finite; the final model was not saved. "
                               f"Lower --lr and resume from {last_saved or 'the start'}")
    best_dir = best_checkpoint(run) if cfg.final_model == "best" and state.best_step not in (None, state.step) \
        else None
    if best_dir is not None:  # into the run's model, on every rank (FSDP: its shards, gathered below)
        run.checkpointer.load_weights(best_dir, run.loss_model)
        best = next(e for e in evals if e["step"] == state.best_step)
        log(f"final model: the best evaluation's, step {best['step']:,} (val loss {best['val_loss']:.4f}), from "
            f"{best_dir} (--final-model best)")
    full = None  # FSDP: the whole model, or a LoRA run's trained tensors, gathered on rank 0 (all ranks call)
    if dist.sharded:
        from sftune.lora import gathered_adapter

        full = gathered_adapter(run.loss_model) if run.adapter is not None else full_state_dict(run.loss_model)
    if dist.is_main and run.adapter is not None:  # LoRA: the adapter, and with --merge a full model beside it
        from sftune.lora import load_adapter_model, merged_model, save_adapter

        publish_model(out, lambda directory: save_adapter(run.adapter, run.tokenizer, directory, run.base, full))
        if cfg.merge:
            if dist.sharded:  # shards are not merged in place: the adapter just written, on a CPU copy of the base
                merged = load_adapter_model(out, run.base, cfg.trust_remote_code)  # (as `sftune export` does)
            else:  # (in place: from here on the model is the merged one, which computes the same)
                hf_model = merged = merged_model(run.adapter)
            publish_model(out / "merged", lambda directory: save_model(merged, run.tokenizer, directory,
                                                                       run_config=out / "config.yaml",
                                                                       dtype=cfg.save_dtype))
            log(f"merged model: {out / 'merged'} (AutoModelForCausalLM.from_pretrained loads it)")
    elif dist.is_main:
        publish_model(out, lambda directory: save_model(hf_model, run.tokenizer, directory, full, dtype=cfg.save_dtype))
    dist.barrier()
    if dist.is_main and not (cfg.save_every or cfg.save_best):  # the checkpoints were --save-minutes' alone: for
        # a crash, which can no longer lose anything (another run's in the same directory stay)
        if gone := run.checkpointer.remove_own(state.run_id):
            log(f"checkpoints: the {gone} kept for safety (--save-minutes) removed, now that the model is saved")
    metrics.close()
    if dist.is_main and cfg.run_report:
        write_run_report(out)
    samples = {}
    if dist.sharded:  # every rank generates in step (the blocks all-gather); the root's weights are gathered first
        run.loss_model.unshard()
    for prompt in (cfg.sample_prompts or []) if dist.is_main or dist.sharded else []:
        samples[prompt] = complete(hf_model, run.tokenizer, prompt, cfg.sample_max_new_tokens, seed=cfg.seed,
                                   chat=run.steps.layout.is_chat, synced=dist.sharded)[0]
    return samples


def eval_due(cfg: SFTConfig, state, total_steps: int) -> bool:
    """Whether the run evaluates after `state.step`: every `eval_every` steps, at an epoch's end (the state has
    moved on to the next epoch's start), and at the last step."""
    step = state.step
    return step > 0 and (bool(cfg.eval_every) and step % cfg.eval_every == 0 or state.step_in_epoch == 0
                         or step >= total_steps)


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


def best_checkpoint(run: Run) -> Path | None:
    """The checkpoint of the best evaluation (`--final-model best`): in the run's directory, where rotation keeps
    it, or in the one the run resumed from (`--resume PATH` into a new directory). Gone: warned, None."""
    name = f"step-{run.state.best_step}"
    for root in (run.out / "checkpoints", run.resumed_from.parent if run.resumed_from else None):
        if root is not None and (root / name).is_dir():
            return root / name
    log(f"warning: the best evaluation's checkpoint ({name}) is gone from {run.out / 'checkpoints'}; the final "
        f"model is the last step's (--final-model best)")
    return None


def write_run_report(out: Path) -> None:
    """`report.html` and `loss.png` (`sftune report` writes them again, or for several runs). A failure here is
    a warning: the model is already saved."""
    from sftune.run_report import write_run_files

    try:
        write_run_files(out)
        log(f"report: {out / 'report.html'} and {out / 'loss.png'}")
    except Exception as e:  # (a broken matplotlib install, a full disk): the run itself succeeded
        log(f"warning: the run report was not written ({type(e).__name__}: {e}); sftune report {out} retries")


def validation_prompts(run: Run, chat: bool, n: int = 2) -> list[str]:
    """Chat data: the rendered prompts of the first `n` validation examples (their tokens before the first trained
    one), completed at each evaluation beside `sample_prompts`."""
    if not chat:
        return []
    prompts = []
    for i in range(min(n, len(run.steps.validation))):
        ids, supervised = run.steps.validation.example(i)
        first = int(supervised.argmax()) if supervised.any() else 0
        if first:
            prompts.append(run.tokenizer.decode(ids[:first].tolist()))
    return prompts


def full_state_dict(loss_model) -> dict:
    """An FSDP-sharded model's whole state dict, on rank 0's CPU (empty elsewhere), under the Hugging Face
    model's own key names. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(loss_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    model = loss_model.model
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    tied = every - {n for n, _ in model.named_parameters()}  # e.g. lm_head.weight, the same tensor as wte
    return {k: v for k, v in ((k.removeprefix("model."), v) for k, v in state.items()) if k not in tied}


def keep_metrics_until(path: Path, step: int, dist: Dist) -> None:
    """Drop metrics lines of steps after `step` (they are redone after a resume; -1: a fresh start in a
    reused directory drops them all), atomically."""
    if not path.is_file() or not dist.is_main:
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:  # a line torn by a kill mid-write
            continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
