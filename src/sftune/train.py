"""The training loop, top to bottom in one function. Everything it loops over is built in `build.py`.

    sftune train --config configs/quickstart.yaml
    sftune train --model ../shared/models/gpt2 --init random --dataset ../shared/data/sst2 --max-steps 20
    python -c "import sftune; sftune.train(sftune.load_config('configs/quickstart.yaml'))"

What the loop calls: `stepping.GuardedStep` (a step's forward and backward, undone when it runs out of memory),
`update.py` (clipping, the non-finite guard), `saves.Saves` (checkpoints, and the guard's verdicts before each),
`evaluate.Evaluations` (evaluations, the best one, early stopping), `progress.py` (the log line).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sftune.batching import pin, prefetch
from sftune.build import Run, build_run
from sftune.casts import MatmulCasts
from sftune.checkpoint import weights_finite
from sftune.config import SFTConfig
from sftune.console import MetricsWriter, log, no_library_bars
from sftune.dist import Dist
from sftune.errors import TrainingDiverged
from sftune.evaluate import Evaluations
from sftune.generate import complete
from sftune.graphs import StepGraphs, shape_key
from sftune.modeling import save_model
from sftune.outputs import publish_model
from sftune.progress import LogWindow, OneOffs, train_line
from sftune.runtime import flops_per_token, keep_freed_memory, peak_flops
from sftune.saves import Saves
from sftune.signals import Preempted, StopFlag, stop_on_signals
from sftune.stepping import GuardedStep, forward_backward  # noqa: F401 (forward_backward: part of this module's API)
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
    optimizer, scheduler, scaler = run.optimizer, run.scheduler, run.scaler
    total_steps, per_epoch = run.steps.total_steps, run.steps.steps_per_epoch
    keep_metrics_until(out / "metrics.jsonl", state.step if run.resumed_from else -1, dist)  # redone steps go
    metrics = open_metrics(run)
    if run.resumed_from is not None:
        metrics.write({"type": "resume", "step": state.step, "checkpoint": str(run.resumed_from)})
    mfu_per_token = mfu_of_a_token(run)  # known GPUs: a real token's model FLOPs over the peak rate, or None
    keep_freed_memory(dist.device)  # a CPU's: each step's big temporaries reuse freed memory, not new pages
    model.train()
    window = LogWindow(state.window, dist, run.loss_model)  # a resumed run continues the window where it stopped
    start = time.perf_counter() - state.elapsed_s
    guard = NonFiniteGuard(optimizer, scaler, run.precision, dist)
    saves = Saves(run, guard, metrics, window, start)
    evals = Evaluations(run, stop, metrics, saves, sample_prompts(run))

    # --- before the first step: the start's evaluation, or one a signal stopped before the checkpoint -----------
    stopped_early = False
    if run.resumed_from is None:
        evals.make(0)
        if dist.any(stop.signum is not None):  # nothing trained yet: nothing to save
            raise Preempted(stop.signum or 15, None)
    elif evals.last_step != state.step and eval_due(cfg, state, total_steps):
        # the checkpoint was written when a signal (or an out of memory) stopped this step's evaluation: made now,
        # before any further step, as the uninterrupted run made it (the best model, early stopping)
        if not evals.make(state.step):
            raise Preempted(stop.signum or 15, run.resumed_from)  # (nothing new to save)
        if evals.patience_spent():
            evals.say_early_stop(state.step)
            stopped_early = True
    graphs = step_graphs(run)  # --compile graphs: each micro-batch's forward and backward, a CUDA graph replay
    guarded = GuardedStep(run, graphs, saves)
    profiler = step_profiler(run)  # --profile-steps A-B
    memory_check = memory_check_wanted(cfg, dist.device)
    started_here, first_step = time.perf_counter(), state.step  # for the ETA: this process's pace (evals included)
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", disable=None if dist.is_main else True,
               dynamic_ncols=True, mininterval=1.0)
    one_offs = OneOffs()  # steps that captured a CUDA graph or compiled a new batch shape (this process)
    shapes_seen: set[tuple] = set()  # graphs and compile: a step with a new batch shape captures or compiles it
    static = run.steps.padding.static  # (graphs, --compile torch or compiled blocks: the shapes that need it)
    nan_steps, inf_grad_steps = ({int(x) for x in os.environ.get(f"SFTUNE_FAULT_{kind}_STEPS", "").split(",")
                                  if x.strip()} for kind in ("NAN", "INF_GRAD"))

    # --- the loop -------------------------------------------------------------
    steps = run.steps.remaining(state) if state.step < total_steps and not stopped_early else iter(())
    if dist.device.type == "cuda":  # the next step's batches are made and pinned while the GPU runs this one
        steps = prefetch(steps, prepare=lambda s: replace(s, micro_batches=[pin(b) for b in s.micro_batches]))
    for step_data in steps:
        if profiler is not None:
            profiler.before(state.step + 1)
        saves.settle()  # the previous step's verdict: read now that this step's batches are ready (no wait by then)
        micro_batches = step_data.micro_batches
        started_step = time.perf_counter()
        loss_sum, step_targets = guarded.forward_backward(micro_batches)  # (out of memory: undone, said, stopped)
        shapes = {shape_key(b, run.loss_model.device_keys) for b in micro_batches} if static else set()
        one_off = None  # (a step with a new shape: its time is mostly capture or compile, not the run's pace)
        if not shapes_seen.issuperset(shapes):
            shapes_seen |= shapes
            one_off = time.perf_counter() - started_step
            one_offs.add(one_off, step_data.tokens, step_data.padded_tokens)
        step_tokens = step_data.tokens  # all ranks' real tokens, counted on the host
        if state.step + 1 in nan_steps:  # test hook: SFTUNE_FAULT_NAN_STEPS
            loss_sum = loss_sum * float("nan")
        if state.step + 1 in inf_grad_steps:  # test hook: SFTUNE_FAULT_INF_GRAD_STEPS (a gradient that overflowed)
            next(p.grad for p in model.parameters() if p.grad is not None).view(-1)[0] = float("inf")
        scaler.unscale_(optimizer)
        grad_norm, divisor = clip_gradients(model, cfg.max_grad_norm, into_update=guard.on_device and not dist.sharded)
        loss_sum = guard.step(loss_sum, grad_norm, state.step + 1, divisor)  # the update, unless non-finite
        if overflow := guard.update_scale():  # (fp16: its scaler skipped an update whose gradients overflowed)
            saves.overflowed(state.step + 1, *overflow)
        # (an adding graph adds into the same gradient tensors each step; an assigning one writes its own)
        optimizer.zero_grad(set_to_none=graphs is None or graphs.assign)
        scheduler.step()
        state.step += 1
        state.step_in_epoch += 1
        state.stream = step_data.stream
        state.tokens += step_tokens
        state.padded_tokens += step_data.padded_tokens
        window.add(loss_sum, step_targets, step_tokens, one_off)
        step = state.step
        bar.update(1)
        if profiler is not None:
            profiler.after(step)

        if step == 1 and cfg.log_every > 1:  # a first sign of life within seconds, even without a terminal
            saves.settle()
            first = dist.all_reduce_sum(loss_sum.clone()).item()
            log(f"step      1/{total_steps:,} | loss {first / max(step_targets, 1):.4f} "
                f"| {time.perf_counter() - started_step:.1f} s for the first step")
        if step % cfg.log_every == 0 or step == total_steps:
            saves.settle()
            figures = window.close(dist)
            epoch_at = round(step / per_epoch, 4) if per_epoch else step_data.epoch
            left = (time.perf_counter() - started_here) / max(step - first_step, 1) * (total_steps - step)
            record = {"type": "train", "step": step, "epoch": epoch_at, "loss": figures["loss"],
                      "token_accuracy": figures["token_accuracy"],
                      **({"router_loss": figures["router_loss"]} if "router_loss" in figures else {}),
                      "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),  # this step's, before clipping
                      "tokens": state.tokens, "padded_tokens": state.padded_tokens,
                      "elapsed_s": round(time.perf_counter() - start, 3), "tokens_per_s": figures["tokens_per_s"],
                      "eta_s": round(left)}
            if static:
                record.update(one_offs.record())
            if dist.device.type == "cuda":
                record["peak_memory_gb"] = torch.cuda.max_memory_allocated(dist.device) / 2**30
            if mfu_per_token is not None:
                record["mfu"] = figures["tokens_per_s"] * mfu_per_token
            metrics.write(record)
            # (a stream's epochs have no known length: which one)
            where = f"epoch {epoch_at:.2f}" if per_epoch else f"epoch {step_data.epoch + 1} (streamed)"
            log(train_line(record, total_steps, where, figures["ms_per_step"]))
            bar.set_postfix(loss=f"{figures['loss']:.3f}", tok_s=f"{figures['tokens_per_s']:,.0f}")
        if cfg.eval_every and step % cfg.eval_every == 0:
            evals.make(step)  # (stopped by a signal: the stop below saves this step, whose resume makes it)
        saved = False
        if step_data.last_in_epoch:  # validate, then the next epoch starts at its beginning
            if evals.last_step != step:
                evals.make(step)
            state.epoch, state.step_in_epoch, state.stream = step_data.epoch + 1, 0, None
            if cfg.save_every:
                saves.checkpoint()
                saved = True
        stopping, due = dist.any_each(stop.signum is not None, saves.safety_due())  # all ranks stop (or save) alike
        if stopping:  # (an epoch's end with --save-every has just saved this step)
            raise Preempted(stop.signum or 15, saves.newest if saved else saves.checkpoint())
        new_best = cfg.save_best and state.best_step == step  # (set by an evaluation of this step)
        if (cfg.save_every and step % cfg.save_every == 0 or new_best) and not saved:
            saves.checkpoint()
        elif due and not saved:
            saves.safety_checkpoint()
        if evals.patience_spent():
            evals.say_early_stop(step)
            stopped_early = True
            break
        if step >= total_steps:
            break
        if memory_check:  # (once this process's first step is logged and saved as asked)
            memory_check = False
            started = time.perf_counter()
            batch, line = guarded.check_memory()  # (out of memory: said, with the state after this step saved)
            if static:
                shapes_seen.add(shape_key(batch, run.loss_model.device_keys))
            window.exclude(time.perf_counter() - started)
            log(line)
    saves.settle()
    if profiler is not None:
        profiler.close(state.step)  # (a run that ended inside the range: what was profiled)
    if hasattr(steps, "close"):
        steps.close()  # (a prefetching thread stops)
    if evals.last_step != state.step and not evals.make(state.step):  # the end of max_steps (or of a stream)
        raise Preempted(stop.signum or 15, saves.checkpoint())  # (a signal stopped it: the resume makes it)
    if state.step < total_steps and not stopped_early:  # only a stream can end first: its length was unknown
        log(f"the stream ran out at step {state.step:,}, before max_steps {total_steps:,}")
    bar.close()
    seconds = time.perf_counter() - start
    samples = write_outputs(run, evals.evals, metrics, saves.newest)  # the model, the report
    return TrainResult(out, state.step, state.tokens, seconds, evals.evals, samples)


# --- what the loop is built with ----------------------------------------------------------------------------


def open_metrics(run: Run) -> MetricsWriter:
    """metrics.jsonl (rank 0), and the tracker `report_to` names; closed at the end, or by `Run.close` after an
    error."""
    cfg, state = run.cfg, run.state
    tracker = None
    if run.dist.is_main and cfg.report_to != "none":
        from sftune.config import to_dict
        from sftune.tracking import Tracker

        tracker = Tracker(cfg.report_to, run.out, state.run_id, to_dict(cfg), state.step if run.resumed_from else -1)
    metrics = MetricsWriter(run.out / "metrics.jsonl" if run.dist.is_main else None, tracker)
    run.closers.append(metrics.close)
    return metrics


def mfu_of_a_token(run: Run) -> float | None:
    """The share of the devices' peak rate one real token a second takes (MFU = tokens/s x this): the model FLOPs
    of a token of the data's mean length over the peak of all ranks' devices; None where the peak is not known
    (CPUs, GPUs outside `runtime`'s table)."""
    peak = peak_flops(run.dist.device, run.precision)
    if not peak:
        return None
    lengths = run.steps.train.lengths if hasattr(run.steps, "train") else run.steps.validation.lengths
    token_flops = flops_per_token(run.loss_model.model, float(lengths.mean()), frozen_base=run.adapter is not None)
    return token_flops / (peak * run.dist.world_size)


def sample_prompts(run: Run) -> list[tuple[str, bool]]:
    """(prompt, already rendered): `sample_prompts`, and for chat data the first validation examples' prompts
    (none at all with `sample_prompts: []`)."""
    cfg = run.cfg
    chat = run.steps.layout.is_chat and cfg.sample_prompts != []
    return [(p, False) for p in cfg.sample_prompts or []] + [(p, True) for p in validation_prompts(run, chat)]


def step_graphs(run: Run) -> StepGraphs | None:
    """--compile graphs: the step's CUDA graphs (bf16: the matrix products' weights cast in one pass, checked at each
    capture; not with compiled blocks, which would compile each shape twice: for fp32 weights, then their bf16
    copies)."""
    if run.compile != "graphs":
        return None
    one_pass = run.precision == "bf16" and not run.cfg.compile_blocks
    casts = MatmulCasts.for_model(run.loss_model, torch.bfloat16) if one_pass else None
    return StepGraphs(run.loss_model, run.dist.device, run.precision, run.cfg.compile == "graphs", casts=casts)


def step_profiler(run: Run):
    """--profile-steps A-B: torch.profiler over those steps, written to `profile/` (an error: dropped)."""
    if not run.cfg.profile_steps:
        return None
    from sftune.config import profile_range
    from sftune.profiling import StepProfiler

    profiler = StepProfiler(profile_range(run.cfg.profile_steps), run.out / "profile", run.dist)
    run.closers.append(profiler.close)
    return profiler


def memory_check_wanted(cfg: SFTConfig, device: torch.device) -> bool:
    """--memory-check: on a GPU by default (`auto`); never for packed or streamed data, whose heaviest
    micro-batch is not known ahead (said when it was asked for)."""
    wanted = cfg.memory_check == "on" or (cfg.memory_check == "auto" and device.type == "cuda")
    if wanted and (cfg.packing or cfg.streaming):
        if cfg.memory_check == "on":
            log("memory check: not made: " + ("packed micro-batches all have one shape (the first step's)"
                                               if cfg.packing else "a stream's longest rows are not known ahead"))
        return False
    return wanted


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
            if dist.sharded or getattr(run.adapter, "sftune_base_cast", None):  # shards, or a base kept in bf16,
                # are not merged in place: the adapter just written, on a CPU copy of the fp32 base from disk
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
                                   chat=run.steps.layout.is_chat, synced=dist.sharded, quiet=True)[0]
    return samples


def eval_due(cfg: SFTConfig, state, total_steps: int) -> bool:
    """Whether the run evaluates after `state.step`: every `eval_every` steps, at an epoch's end (the state has
    moved on to the next epoch's start), and at the last step."""
    step = state.step
    return step > 0 and (bool(cfg.eval_every) and step % cfg.eval_every == 0 or state.step_in_epoch == 0
                         or step >= total_steps)


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
