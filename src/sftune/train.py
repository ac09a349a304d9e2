"""The training loop, top to bottom in one function.

    sftune train --config configs/quickstart.yaml
    sftune train --model ../shared/models/gpt2 --init random --dataset ../shared/data/sst2 --max-steps 20
    python -c "import sftune; sftune.train(sftune.load_config('configs/quickstart.yaml'))"
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from sftune.checkpoint import (TrainState, check_resume_compatible, find_resume_checkpoint, load_training_state,
                              save_checkpoint)
from sftune.batching import collate, collate_packed, epoch_steps, packed_epoch_steps
from sftune.config import SFTConfig, dump_yaml, to_dict
from sftune.console import MetricsWriter, is_main, log
from sftune.data import EncodeOptions, PreparedData, prepare_data
from sftune.errors import SftuneError, TrainingDiverged
from sftune.evaluate import evaluate
from sftune.generate import complete
from sftune.loss import batch_loss_sum, count_targets, supports_fused_ce
from sftune.modeling import context_length, load_model, load_tokenizer, save_model
from sftune.runtime import autocast, resolve_device, resolve_precision, seed_everything
from sftune.signals import Preempted, stop_on_signals
from sftune.streaming import StreamedData, StreamPosition, chunk_rows_for

SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    tokens: int  # non-pad tokens trained on
    seconds: float
    evals: list[dict] = field(default_factory=list)  # {"step", "val_loss", "val_ppl"} in order
    samples: dict[str, str] = field(default_factory=dict)  # prompt -> completion

    @property
    def first_val_loss(self) -> float:
        return self.evals[0]["val_loss"]

    @property
    def last_val_loss(self) -> float:
        return self.evals[-1]["val_loss"]


def choose_output_dir(requested: str | None, reuse: bool) -> Path:
    """`requested`, or runs/<timestamp>. A non-empty directory is refused unless `reuse`
    (--resume or --overwrite), so no earlier run is overwritten by mistake."""
    out = Path(requested) if requested else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if out.exists() and not out.is_dir():
        raise SftuneError(f"output path {out} is a file, not a directory; choose another --output-dir")
    if out.exists() and any(out.iterdir()) and not reuse:
        raise SftuneError(f"output directory {out} already exists and is not empty; choose another --output-dir, "
                          f"continue it with --resume auto, or pass --overwrite")
    return out


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop metrics lines of steps after `step` (they are redone after a resume), atomically."""
    if not path.is_file() or not is_main():
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


def param_groups(model, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases and norm gains (1-D) are not decayed (as in HF/TRL, nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def tokenizer_for(cfg: SFTConfig):
    """The run's tokenizer: `tokenizer`, else the model's; errors name the flag the user set.
    A `chat_template` file replaces the tokenizer's template (and is saved with the model)."""
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code,
                               flag="--tokenizer" if cfg.tokenizer else "--model")
    if cfg.chat_template:
        path = Path(cfg.chat_template).expanduser()
        try:
            tokenizer.chat_template = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SftuneError(f"cannot read the chat template {path}: {e} (--chat-template)") from None
    return tokenizer


def max_length_for(cfg: SFTConfig, tokenizer, model_config) -> int:
    """`max_length`, defaulting to the model's context (and never beyond it)."""
    context = context_length(model_config, tokenizer)
    max_length = cfg.max_length or context
    if max_length > context:
        raise SftuneError(f"max_length {max_length} exceeds the model's context of {context} tokens; lower --max-length")
    if cfg.max_length is None:
        log(f"max_length: {max_length} (the model's context)")
    return max_length


def encode_options(cfg: SFTConfig, max_length: int) -> EncodeOptions:
    return EncodeOptions(max_length, cfg.min_tokens, cfg.overlong, cfg.truncation_side, cfg.train_on_prompt,
                         cfg.train_on_all_turns)


def prepare_data_for(cfg: SFTConfig, tokenizer, model_config) -> tuple[PreparedData, int]:
    """Run the data pipeline with the config's settings; max_length defaults to the model's context."""
    max_length = max_length_for(cfg, tokenizer, model_config)
    data = prepare_data(cfg.dataset, tokenizer, max_length, cfg.text_column, cfg.min_tokens, cfg.overlong,
                        cfg.val_fraction, cfg.seed, cfg.cache_dir, format=cfg.format, columns=cfg.columns,
                        truncation_side=cfg.truncation_side, train_on_prompt=cfg.train_on_prompt,
                        train_on_all_turns=cfg.train_on_all_turns, dataset_config=cfg.dataset_config, split=cfg.split)
    log(f"data: {len(data.train):,} train / {len(data.validation):,} validation examples, format "
        f"{data.layout.describe()} ({'from cache' if data.from_cache else 'tokenized'} in {data.seconds:.1f}s)")
    return data, max_length


def stream_data_for(cfg: SFTConfig, tokenizer, model_config) -> tuple[StreamedData, int]:
    """The streamed training split and the materialized validation split (--streaming)."""
    max_length = max_length_for(cfg, tokenizer, model_config)
    data = StreamedData(cfg.dataset, tokenizer, encode_options(cfg, max_length), format=cfg.format,
                        columns=cfg.columns, text_column=cfg.text_column, dataset_config=cfg.dataset_config,
                        split=cfg.split, val_rows=cfg.stream_val_rows, seed=cfg.seed)
    log(f"data: streaming {cfg.dataset} ({cfg.split}), {len(data.validation):,} validation examples, format "
        f"{data.layout.describe()}")
    return data, max_length


def plan_steps(lengths, cfg: SFTConfig, max_length: int, key: int) -> list[list]:
    """Optimizer steps over examples of these lengths, each a list of micro-batches (rows of example
    indices): packed, or cut from length-grouped (or shuffled) rows; `key` seeds the order."""
    if cfg.packing:
        return packed_epoch_steps(lengths, max_length, cfg.batch_size, cfg.grad_accum, cfg.seed, key, cfg.batch_tokens)
    return epoch_steps(lengths, cfg.batch_size, cfg.grad_accum, cfg.seed, key, cfg.batch_tokens, cfg.group_by_length)


def check_batch_tokens(cfg: SFTConfig, examples) -> None:
    longest = int(examples.lengths.max()) if len(examples) else 0
    if cfg.batch_tokens is not None and cfg.batch_tokens < longest:
        raise SftuneError(f"batch_tokens {cfg.batch_tokens} is smaller than the longest training example ({longest} tokens); "
                          f"raise --batch-tokens or lower --max-length")


def forward_backward(model, micro_batches: list[dict], device, precision: str, scaler,
                     fused_ce: bool = False) -> tuple[torch.Tensor, int]:
    """Accumulate one optimizer step's gradients; returns (sum of token losses, number of targets).

    The step's loss is sum(token losses) / (targets of ALL its micro-batches): each micro-batch's
    sum is divided by the step total before backward, so the gradients add up to those of the
    step's token mean, however the rows are split into micro-batches.
    """
    step_targets = sum(int(count_targets(b["labels"])) for b in micro_batches)  # host tensors: no sync
    total = torch.zeros((), device=device)
    for batch in micro_batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast(device, precision):
            loss_sum = batch_loss_sum(model, batch, fused_ce)
        scaler.scale(loss_sum / max(step_targets, 1)).backward()
        total += loss_sum.detach()
    return total, step_targets


def train(cfg: SFTConfig) -> TrainResult:
    """Fine-tune `cfg.model` on `cfg.dataset` and write the model, config and metrics to the output dir."""
    # --- setup: resolve what the config leaves open, and say what was inferred ---
    out = choose_output_dir(cfg.output_dir, reuse=bool(cfg.resume) or cfg.overwrite)
    checkpoint = find_resume_checkpoint(out, cfg.resume) if cfg.resume else None
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    log(f"device: {device}, precision: {precision}" + (" (auto)" if cfg.precision == "auto" else ""))
    tokenizer = tokenizer_for(cfg)
    if checkpoint is None:
        model = load_model(cfg.model, cfg.init, cfg.trust_remote_code, cfg.seed)
    else:  # the checkpoint's weights (the config check below makes sure it is the same model)
        model = load_model(str(checkpoint), "pretrained", cfg.trust_remote_code)
    model = model.to(device)
    eval_batch_size = cfg.eval_batch_size or cfg.batch_size
    make_batch = collate_packed if cfg.packing else collate
    if cfg.streaming:  # steps are planned chunk by chunk as the stream is read
        stream, max_length = stream_data_for(cfg, tokenizer, model.config)
        val_set, layout, plan, per_epoch, total_steps = stream.validation, stream.layout, None, None, cfg.max_steps
        chunk_rows = chunk_rows_for(cfg.batch_size, cfg.grad_accum)
    else:
        data, max_length = prepare_data_for(cfg, tokenizer, model.config)
        train_set, val_set, layout, stream = data.train, data.validation, data.layout, None
        if len(train_set) < cfg.batch_size * cfg.grad_accum:
            raise SftuneError(f"the training split has {len(train_set):,} examples after filtering, fewer than one "
                              f"optimizer step of {cfg.batch_size} x {cfg.grad_accum}; lower --batch-size or "
                              f"--grad-accum, or add data")
        check_batch_tokens(cfg, train_set)
        # index arrays only: cheap, and step counts are known up front
        plan = [plan_steps(train_set.lengths, cfg, max_length, e) for e in range(cfg.epochs)]
        per_epoch = len(plan[0])
        all_steps = sum(len(p) for p in plan)  # may vary a little by epoch with packing or a token cap
        total_steps = all_steps if cfg.max_steps is None else min(cfg.max_steps, all_steps)

    def epoch_batches(epoch: int):
        """The epoch's remaining optimizer steps: (micro-batches, stream position after the step)."""
        if stream is None:
            for step_rows in plan[epoch][state.step_in_epoch :]:
                yield [make_batch(train_set, rows, pad_id) for rows in step_rows], None
            return
        position = StreamPosition(**state.stream) if state.stream else StreamPosition()
        for examples, step_rows, after in stream.steps(epoch, position, chunk_rows,
                                                       lambda lengths, key: plan_steps(lengths, cfg, max_length, key)):
            check_batch_tokens(cfg, examples)
            yield [make_batch(examples, rows, pad_id) for rows in step_rows], after
    resolved = replace(cfg, output_dir=str(out), tokenizer=cfg.tokenizer or cfg.model, max_length=max_length,
                       eval_batch_size=eval_batch_size, precision=precision, device=device.type)
    if checkpoint is not None:
        check_resume_compatible(checkpoint, to_dict(resolved), cfg.resume_force)
    out.mkdir(parents=True, exist_ok=True)
    config_yaml = dump_yaml(resolved)
    if is_main():
        (out / "config.yaml").write_text(config_yaml)
    batching = f"{cfg.grad_accum} x {cfg.batch_size} {'packed rows of ' + str(max_length) if cfg.packing else 'rows'}"
    batching += f" of at most {cfg.batch_tokens:,} tokens" if cfg.batch_tokens else ""
    batching += ", grouped by length" if cfg.group_by_length and not cfg.packing else ""
    log(f"training: {total_steps:,} optimizer steps ({f'{per_epoch:,}' if per_epoch else 'streamed'} per epoch) of {batching}, "
        f"lr {cfg.lr:g} ({cfg.lr_schedule}, {cfg.warmup_steps} warm-up), output {out}")

    # fused AdamW: one kernel over all parameters (measured 6x faster than foreach on CPU, benchmarks/NOTES.md)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=device.type in ("cpu", "cuda"))
    scheduler = get_scheduler(SCHEDULES[cfg.lr_schedule], optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # loss scaling only for fp16
    state = TrainState()
    if checkpoint is not None:
        state = load_training_state(checkpoint, optimizer, scheduler, scaler)
        keep_metrics_until(out / "metrics.jsonl", state.step)
        log(f"resumed from {checkpoint}: step {state.step:,}, epoch {state.epoch}, "
            f"{state.step_in_epoch:,} steps into it")
    else:
        if cfg.resume:
            log(f"--resume {cfg.resume}: no checkpoint in {out / 'checkpoints'}, starting fresh")
        keep_metrics_until(out / "metrics.jsonl", -1)  # a fresh start in a reused directory: old lines go
    metrics = MetricsWriter(out / "metrics.jsonl")
    if checkpoint is not None:
        metrics.write({"type": "resume", "step": state.step, "checkpoint": str(checkpoint)})
    pad_id = tokenizer.pad_token_id
    fused_ce = supports_fused_ce(model)  # never build the (B, T, vocab) logits (benchmarks/NOTES.md)
    log(f"loss: {'output projection fused with cross-entropy, ' if fused_ce else ''}token-weighted over each step")
    evals: list[dict] = state.evals

    def run_eval(step: int) -> None:
        result = evaluate(model, val_set, eval_batch_size, pad_id, device, precision, fused_ce)
        record = {"step": step, "val_loss": result.loss, "val_ppl": result.perplexity}
        evals.append(record)
        metrics.write({"type": "eval", **record})
        log(f"eval  step {step:>6,} | val_loss {result.loss:.4f} | val_ppl {result.perplexity:,.2f} "
            f"| {result.targets:,} target tokens")

    def checkpoint_now() -> Path | None:
        state.evals = evals
        state.window = {"loss": window_loss.item(), "steps": window_steps, "targets": window_targets,
                        "tokens": window_tokens}
        state.elapsed_s = time.perf_counter() - start
        path = save_checkpoint(out / "checkpoints", model, tokenizer, optimizer, scheduler, scaler, state,
                               config_yaml, cfg.keep_last)
        log(f"checkpoint: {path}")
        return path

    # --- the loop -------------------------------------------------------------
    model.train()
    if checkpoint is None:
        run_eval(0)
    w = state.window  # a resumed run continues the log window where it stopped
    window_loss = torch.full((), w.get("loss", 0.0), device=device)  # sum of token losses since the last log line
    window_steps, window_targets, window_tokens = w.get("steps", 0), w.get("targets", 0), w.get("tokens", 0)
    window_start = time.perf_counter()
    start = time.perf_counter() - state.elapsed_s
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", disable=None if is_main() else True,
               dynamic_ncols=True)
    bad_in_a_row = 0
    nan_steps = {int(x) for x in os.environ.get("SFTUNE_FAULT_NAN_STEPS", "").split(",") if x.strip()}
    with stop_on_signals() as stop:
        for epoch in range(state.epoch, cfg.epochs):
            for micro_batches, position in epoch_batches(epoch) if state.step < total_steps else []:
                loss_sum, step_targets = forward_backward(model, micro_batches, device, precision, scaler, fused_ce)
                step_tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)  # host tensors: no sync
                if state.step + 1 in nan_steps:  # test hook: SFTUNE_FAULT_NAN_STEPS
                    loss_sum = loss_sum * float("nan")
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
                # note: one host sync per step, to decide whether to apply the update
                finite = bool(torch.isfinite(loss_sum)) and (precision == "fp16" or bool(torch.isfinite(grad_norm)))
                if finite:  # (under fp16 the scaler itself skips steps whose gradients overflowed)
                    scaler.step(optimizer)
                    bad_in_a_row = 0
                else:
                    bad_in_a_row += 1
                    loss_sum = torch.zeros_like(loss_sum)  # keep the logged loss finite: the step taught nothing
                    metrics.write({"type": "skip", "step": state.step + 1, "reason": "non-finite loss or gradient norm"})
                    log(f"step {state.step + 1:,}: non-finite loss or gradient norm, update skipped "
                        f"({bad_in_a_row} in a row, limit --max-bad-steps {cfg.max_bad_steps})")
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                state.step += 1
                state.step_in_epoch += 1
                state.stream = position and asdict(position)
                state.tokens += step_tokens
                state.padded_tokens += sum(b["input_ids"].numel() for b in micro_batches)
                window_loss += loss_sum
                window_steps += 1
                window_targets += step_targets
                window_tokens += step_tokens
                step = state.step
                bar.update(1)

                if step % cfg.log_every == 0 or step == total_steps:
                    now = time.perf_counter()
                    loss = window_loss.item() / max(window_targets, 1)  # note: .item() syncs; once per log step
                    rate = window_tokens / max(now - window_start, 1e-9)
                    lr = scheduler.get_last_lr()[0]
                    epoch_at = round(step / per_epoch, 4) if per_epoch else state.epoch
                    metrics.write({"type": "train", "step": step, "epoch": epoch_at, "loss": loss,
                                   "lr": lr, "tokens": state.tokens, "padded_tokens": state.padded_tokens,
                                   "elapsed_s": round(now - start, 3), "tokens_per_s": rate})
                    log(f"step {step:>6,}/{total_steps:,} | epoch {epoch_at:.2f} | loss {loss:.4f} | lr {lr:.2e} "
                        f"| {rate:,.0f} tok/s | {1000 * (now - window_start) / window_steps:.0f} ms/step")
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
                    window_loss.zero_()
                    window_steps, window_targets, window_tokens, window_start = 0, 0, 0, time.perf_counter()
                if cfg.eval_every and step % cfg.eval_every == 0:
                    run_eval(step)
                if bad_in_a_row > cfg.max_bad_steps:
                    path = checkpoint_now()  # the weights are those of the last good step: bad steps changed nothing
                    raise TrainingDiverged(
                        f"{bad_in_a_row} optimizer steps in a row had a non-finite loss or gradient norm (step {step}); "
                        f"stopped with the last good state saved in {path}. Lower --lr, set --max-grad-norm, use "
                        f"--precision fp32 or bf16, or raise --max-bad-steps; then --resume auto.")
                if stop.signum is not None:
                    raise Preempted(stop.signum, checkpoint_now())
                if cfg.save_every and step % cfg.save_every == 0:
                    checkpoint_now()
                if step >= total_steps:
                    break
            if evals[-1]["step"] != state.step:
                run_eval(state.step)  # end of epoch (or of max_steps)
            # the epoch is complete (a stream stops short of max_steps only at its end): the next starts at its beginning
            if (state.step_in_epoch == len(plan[epoch])) if stream is None else state.step < total_steps:
                state.epoch, state.step_in_epoch, state.stream = epoch + 1, 0, None
                if cfg.save_every:
                    checkpoint_now()
            if state.step >= total_steps:
                break
    if state.step < total_steps:  # only a stream can end first: its length was unknown
        log(f"the stream ended after {cfg.epochs} epoch(s) at step {state.step:,}, before max_steps {total_steps:,}; "
            f"raise --epochs to read it again")
    bar.close()
    seconds = time.perf_counter() - start
    step, tokens = state.step, state.tokens

    # --- outputs ----------------------------------------------------------------
    save_model(model, tokenizer, out)
    metrics.close()
    samples = {}
    for prompt in cfg.sample_prompts:
        samples[prompt] = complete(model, tokenizer, prompt, cfg.sample_max_new_tokens, seed=cfg.seed,
                                   chat=layout.format.startswith("chat"))[0]
    return TrainResult(out, step, tokens, seconds, evals, samples)

