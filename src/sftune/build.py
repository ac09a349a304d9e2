"""Building a run from a config: everything the training loop needs, and nothing it decides.

Owns the setup that `train`, `data` and `eval` share: the tokenizer, the model (wrapped
with its loss), the data and its step source (`steps.py`: in memory or streamed), the
optimizer, scheduler and grad scaler, the distributed context, the checkpointer, and where
a resumed run stands. Every command builds what it needs here, the same way; the loop in
`train.py` only loops.

    run = build_run(load_config("configs/quickstart.yaml"))     # what `sftune train` does first
    for step in run.steps.remaining(run.state): ...
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from sftune.attention import check_window
from sftune.packing_check import check_packing
from sftune.blocks import compile_blocks, enable_activation_checkpointing
from sftune.checkpoint import TrainState, complete_checkpoints, find_resume_checkpoint
from sftune.checkpointers import AdapterCheckpointer, Checkpointer, FullCheckpointer, ShardedAdapterCheckpointer, \
    ShardedCheckpointer
from sftune.config import SFTConfig, dump_yaml, template_on_the_hub, to_dict
from sftune.console import log
from sftune.data import DataOptions, prepare_data
from sftune.data.cache import tokenizer_fingerprint
from sftune.dist import Dist, init_dist, restart_warning
from sftune.errors import SftuneError, on_every_rank
from sftune.generate import check_sample_prompts
from sftune.fused_loss import ChunkMath, chunk_rows
from sftune.loss import CausalLMLoss, output_head
from sftune.modeling import check_attention, context_length, declared_dtype, load_model, load_model_config, \
    load_tokenizer, model_skeleton, override_config, router_loss_notice, save_model
from sftune.outputs import OutputLock, check_output_dir, check_shared, clear_previous_run, \
    claim_new_run_dir, finished_without_checkpoints, publish_model, resolve_output_dir
from sftune.resume import check_resume_compatible, check_same_inputs, check_same_steps
from sftune.run_report import DATA_FILE, data_summary
from sftune.runtime import DTYPES, gpu_computes_bf16, resolve_precision, seed_everything, untested_versions, warm_up
from sftune.shards import holds_whole_model
from sftune.signals import Preempted, StopFlag
from sftune.step_mode import compile_step, resolve_attention, resolve_blocks, resolve_compile, say_attention_off_gpu, \
    say_step, step_padding, wants_chunk_math
from sftune.steps import InMemorySteps, StepSource, StreamedSteps
from sftune.update import build_optimizer, build_scheduler, warmup_steps
from sftune.vocab import add_tokens, fit_embeddings, token_ids, train_every_embedding_row


# --- tokenizer and data ------------------------------------------------------------


def build_tokenizer(cfg: SFTConfig):
    """The run's tokenizer: `tokenizer`, else the model's; errors name the flag the user set.
    A `chat_template` file replaces the tokenizer's template (and is saved with the model)."""
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.trust_remote_code,
                               flag="--tokenizer" if cfg.tokenizer else "--model", pad_token=cfg.pad_token)
    if cfg.chat_template:
        tokenizer.chat_template = read_chat_template(cfg.chat_template, cfg.trust_remote_code)
    if cfg.add_tokens:
        added = add_tokens(tokenizer, cfg.add_tokens)
        present = [t for t in cfg.add_tokens if t not in added]
        log(f"tokens: {', '.join(added) or 'none'} added" + (f" ({', '.join(present)} already in the vocabulary)"
                                                             if present else "") + f"; {len(tokenizer):,} in all")
    return tokenizer


def read_chat_template(value: str, trust_remote_code: bool = False) -> str:
    """`--chat-template`: a Jinja file, or the template of another model's tokenizer (a directory or a Hub id: an
    instruct model's template for its base model, whose vocabulary has the same markers)."""
    path = Path(value).expanduser()
    if path.is_dir() or (not path.exists() and template_on_the_hub(value)):
        from sftune.generate import default_template

        template = default_template(load_tokenizer(value, trust_remote_code, flag="--chat-template"))
        if not template:
            raise SftuneError(f"the tokenizer of {value} has no chat template to use (--chat-template)")
        return template
    try:
        template = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SftuneError(f"cannot read the chat template {path}: {e} (--chat-template)") from None
    if not template.strip():
        raise SftuneError(f"the chat template {path} is empty; give a Jinja template (or leave out --chat-template "
                          f"for the tokenizer's own, or sftune's default)")
    return template


def check_model_fits(cfg: SFTConfig, tokenizer, model_config) -> None:
    """The tokenizer's ids must all be rows of the model's embedding, and the samples must fit the context."""
    vocab = getattr(model_config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:  # rows for --add-tokens and --pad-token are added
        named = {*cfg.add_tokens, *([cfg.pad_token] if cfg.pad_token else [])}
        beyond = sorted((i, t) for t, i in tokenizer.get_vocab().items() if i >= vocab and t not in named)
        if beyond:
            listed = " ".join(repr(t) for _, t in beyond[:8]) + (" ..." if len(beyond) > 8 else "")
            grow = (f", or give them rows (starting untrained, at the mean of the others): --add-tokens {listed}"
                    if len(beyond) <= 16 else "")
            raise SftuneError(f"the tokenizer has {len(tokenizer):,} tokens but the model's vocabulary only "
                              f"{vocab:,}: {len(beyond):,} token{'s' if len(beyond) > 1 else ''} past id {vocab - 1:,} "
                              f"({listed}) {'have' if len(beyond) > 1 else 'has'} no embedding. Use the model's own "
                              f"tokenizer (--tokenizer), or a model whose embeddings were resized for this tokenizer "
                              f"(--model){grow}")
    context = context_length(model_config, tokenizer)
    if cfg.sample_prompts and cfg.sample_max_new_tokens >= context:
        raise SftuneError(f"sample_max_new_tokens {cfg.sample_max_new_tokens} does not fit the model's context of "
                          f"{context} tokens with a prompt; lower --sample-max-new-tokens")


def resolve_max_length(cfg: SFTConfig, tokenizer, model_config) -> int:
    """`max_length`, defaulting to the model's context (and never beyond it)."""
    context = context_length(model_config, tokenizer)
    max_length = cfg.max_length or context
    if max_length > context:
        raise SftuneError(f"max_length {max_length} exceeds the model's context of {context} tokens; lower --max-length")
    if cfg.max_length is None and cfg.packing and cfg.batch_size * context > PACKED_TOKENS_UNASKED:
        raise on_every_rank(SftuneError(  # (under torchrun every rank finds it: rank 0 says it)
            f"--packing fills rows of max_length tokens, and max_length defaults to the model's context, {context:,} "
            f"tokens here: a micro-batch would hold {cfg.batch_size} x {context:,} = {cfg.batch_size * context:,} "
            f"tokens. Set --max-length (2,048 to 8,192 is usual for fine-tuning), or lower --batch-size"))
    if cfg.max_length is None:
        log(f"max_length: {max_length} (the {'model' if model_config is not None else 'tokenizer'}'s context)")
    return max_length


# Packed micro-batches of up to this many tokens are made from the model's whole context without asking: 4 x the
# seed's (32 rows of GPT-2's 1,024), so Llama 2's 4,096 at batch 32; a model of 8k to 128k tokens packs only to a
# length the user gives (TRL packs to 1,024 unless told, Axolotl to 2,048).
PACKED_TOKENS_UNASKED = 131_072


def data_options(cfg: SFTConfig, max_length: int) -> DataOptions:
    return DataOptions(cfg.dataset, max_length, dataset_config=cfg.dataset_config, split=cfg.split,
                       format=cfg.format, columns=cfg.columns, text_column=cfg.text_column, min_tokens=cfg.min_tokens,
                       overlong=cfg.overlong, truncation_side=cfg.truncation_side, train_on_prompt=cfg.train_on_prompt,
                       train_on_all_turns=cfg.train_on_all_turns, val_fraction=cfg.val_fraction,
                       val_split=cfg.val_split, val_dataset=cfg.val_dataset, seed=cfg.seed, cache_dir=cfg.cache_dir,
                       stream_val_rows=cfg.stream_val_rows, workers=cfg.data_workers, mixture=tuple(cfg.datasets),
                       val_datasets=tuple(cfg.val_datasets))  # (entries: dicts, as `datasets`' are)


def build_data(cfg: SFTConfig, tokenizer, model_config, dist: Dist | None = None, validation_only: bool = False):
    """(PreparedData or StreamedData, max_length). Rank 0 prepares first and writes the cache;
    the other ranks then read it. `validation_only` (`sftune eval` of a named split): `val_split` of the
    dataset alone, no training split."""
    dist = dist or Dist()
    max_length = resolve_max_length(cfg, tokenizer, model_config)
    options = data_options(cfg, max_length)
    if validation_only and not cfg.streaming:
        options = replace(options, only="validation")
    with dist.main_first():
        if cfg.streaming:
            from sftune.data.streaming import MixedStreams, StreamedData

            data = MixedStreams(options, tokenizer) if cfg.datasets or cfg.val_datasets else \
                StreamedData(options, tokenizer)
            log(f"data: streaming {cfg.data_name}{'' if cfg.datasets else f' ({cfg.split})'}, "
                f"{len(data.validation):,} validation examples, format {data.layout.describe()}")
        else:
            data = prepare_data(options, tokenizer)
            picked = None if options.only else data.epoch_selection(0, cfg.seed)  # (weighted datasets)
            weighted = "" if picked is None else f" ({len(picked):,} an epoch, as the datasets' weights take them)"
            counts = (f"{len(data.validation):,} examples of {cfg.val_split} to evaluate" if options.only else
                      f"{len(data.train):,} train{weighted} / {len(data.validation):,} validation examples")
            log(f"data: {counts}, format {data.layout.describe()} "
                f"({'from cache' if data.from_cache else 'tokenized'} in {data.seconds:.1f}s)")
    return data, max_length


# --- the run -----------------------------------------------------------------------


@dataclass
class Run:
    """Everything a training run needs, built and resolved."""

    cfg: SFTConfig  # resolved: output_dir, tokenizer, max_length, precision, device ... filled in
    dist: Dist
    out: Path
    precision: str
    tokenizer: object
    model: torch.nn.Module  # what the loop calls: `loss_model`, or the DDP wrapper around it under torchrun
    loss_model: CausalLMLoss  # the causal LM with its loss (`loss_model.model` is the Hugging Face model)
    adapter: object | None  # LoRA: the peft model around `loss_model.model` (whose layers it changed in place)
    base: str  # the model the run started from, as an adapter config names it (absolute for a local directory)
    steps: StepSource
    compile: str  # how the step runs: "graphs", "torch" or "off" (`resolve_compile`)
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    checkpointer: Checkpointer
    state: TrainState
    resumed_from: Path | None
    lock: OutputLock
    closers: list = field(default_factory=list)  # what the loop opened (metrics file, TensorBoard writer)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def close(self) -> None:
        """Close what the loop opened, release the output directory and the process group (also after an error:
        a failed `sftune.train()` leaves no open file or lock behind in the calling process)."""
        for close in self.closers:
            close()
        self.lock.release()
        self.dist.close()


def check_not_an_input(out: Path, cfg: SFTConfig) -> None:
    """The output directory must not be a directory the run reads: with --overwrite the run first removed the files
    it writes (a base model's config.json, model.safetensors, tokenizer), so a run that then failed left neither
    the base nor a fine-tuned model."""
    named = [("--model", cfg.model), ("--tokenizer", cfg.tokenizer), ("--dataset", cfg.dataset),
             ("--val-dataset", cfg.val_dataset), *(("--datasets", e["dataset"]) for e in cfg.datasets),
             *(("--val-datasets", e["dataset"]) for e in cfg.val_datasets)]
    for flag, value in named:
        if value and Path(value).expanduser().is_dir() and Path(value).expanduser().resolve() == out.resolve():
            raise SftuneError(f"--output-dir {out} is the {flag} directory the run reads: it would write over "
                              f"(with --overwrite: first remove) the files there; choose another --output-dir")


def build_run(cfg: SFTConfig, stop: StopFlag | None = None) -> Run:
    """Resolve what the config leaves open (and say what was inferred), load and build everything.

    Nothing is written before every check has passed: the output directory is checked (writable, empty unless
    --resume or --overwrite, not in use by another run) before anything is loaded, and locked before the first
    file is written or removed."""
    dist, lock = None, None
    if cfg.output_dir:
        out = resolve_output_dir(cfg.output_dir)
    else:  # runs/<time>, made and locked at once (under torchrun by rank 0, whose name all ranks take: they reach
        # this seconds apart)
        dist = init_dist(cfg.device, cfg.dist_timeout) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        if dist is None or dist.is_main:
            out, lock = claim_new_run_dir()
        if dist is not None:
            out = Path(dist.from_main(str(out) if dist.is_main else None))
    check_not_an_input(out, cfg)
    check_output_dir(out, resume=bool(cfg.resume), overwrite=cfg.overwrite)
    if cfg.resume == "auto" and not cfg.overwrite and finished_without_checkpoints(out):
        raise SftuneError(f"nothing to resume in {out}: that run finished (its model is saved) and kept no "
                          f"checkpoints. Evaluate or use it as it is, continue training from it with --model {out} "
                          f"and another --output-dir, or pass --overwrite to start over there")
    dist = dist or init_dist(cfg.device, cfg.dist_timeout)
    lock = lock or OutputLock(out)
    if dist.is_main and out.exists() and lock.fd is None:  # refuse a second run before loading anything (else:
        lock.acquire()  # before writing)
    try:
        return _build(cfg, out, dist, lock, stop or StopFlag())  # (a flag no signal sets: `train` passes its own)
    except BaseException:
        lock.release()
        raise


def _build(cfg: SFTConfig, out: Path, dist: Dist, lock: OutputLock, stop: StopFlag) -> Run:
    """`build_run` once the output directory is known: in order, the device and precision; the tokenizer, data and
    steps; how the step runs; the checkpoint to resume; the model; the optimizer; the state to start from."""
    from sftune.tracking import check_report_to

    check_report_to(cfg.report_to)
    seed_everything(cfg.seed)
    precision = resolve_precision(cfg.precision, dist.device)
    say_setup(cfg, dist, precision)
    warming = warm_up(dist.device, precision)  # (a GPU's libraries start while the data is prepared)
    # a signal while one process reads, tokenizes or loads stops it at once (nothing to save, nothing written yet)
    alone = not dist.distributed
    with stop.stops_at_once(alone):
        tokenizer, model_config, steps, data, max_length = prepare_inputs(cfg, dist, precision)
        if warming is not None:
            warming.join()
    if dist.any(stop.signum is not None):  # (under torchrun: the ranks agree, before loading)
        raise Preempted(stop.signum or 15, None)
    check_sample_prompts(cfg.sample_prompts or [], tokenizer, context_length(model_config, tokenizer),
                         cfg.sample_max_new_tokens, steps.layout.is_chat)
    compile_mode, why = resolve_compile(cfg, dist, precision, steps.total_steps)
    blocks_on, blocks_why = resolve_blocks(cfg, compile_mode, model_config, dist.device, steps, max_length)
    cfg = replace(cfg, compile_blocks=blocks_on)  # (from here on a yes or no, in the saved config too)
    padding = steps.padding = step_padding(cfg, compile_mode, max_length)  # (the plan of steps does not depend on it)
    attention, notice = resolve_attention(cfg, model_config, dist, steps.total_steps, max_length, compile_mode)
    if notice:
        log(notice)
    resolved = replace(cfg, output_dir=str(out), tokenizer=cfg.tokenizer or cfg.model, max_length=max_length,
                       attention=attention,
                       eval_batch_size=cfg.eval_batch_size or cfg.batch_size, precision=precision,
                       device=dist.device.type,
                       save_dtype=declared_dtype(model_config) if cfg.save_dtype == "auto" else cfg.save_dtype)
    if resolved.save_dtype != "fp32" and (not cfg.lora_r or cfg.merge):
        log(f"output: the model is saved in {resolved.save_dtype}" + (
            ", the dtype its config declares" if cfg.save_dtype == "auto" else "") + "; training keeps fp32 weights "
            "(and checkpoints hold them), rounded once when saved (--save-dtype fp32 saves them as they are)")
    config_yaml = dump_yaml(resolved)
    fingerprints = {"data": data.fingerprint, "tokenizer": tokenizer_identity(tokenizer)}
    if cfg.lora_r and cfg.init == "pretrained":  # an adapter is resumed on the base it was trained on, or not at all
        from sftune.lora import base_identity

        fingerprints["base"] = base_identity(cfg.model)
    if dist.is_main and lock.fd is None:
        lock.acquire()  # the directory is new: take it before the first write
    check_shared(out, lock, dist)  # under torchrun: every node sees this directory (before any rank reads it)
    checkpoint = find_resume_checkpoint(out, cfg.resume) if cfg.resume else None
    if checkpoint is not None:
        may_differ = check_same_steps(checkpoint, cfg, steps, max_length, dist.world_size)
        check_resume_compatible(checkpoint, to_dict(resolved), cfg.resume_force, may_differ)
        check_same_inputs(checkpoint, fingerprints, cfg.resume_force)
        if cfg.overwrite:
            log(f"warning: --overwrite is not used: --resume {cfg.resume} continues {checkpoint}, so nothing of the "
                f"run in {out} is removed (leave out --resume to start over there)")

    sharded = dist.distributed and cfg.strategy == "fsdp"
    with stop.stops_at_once(alone):
        model = load_run_model(cfg, dist, checkpoint, attention, sharded)
    if grown := fit_embeddings(model, len(tokenizer)):  # --add-tokens, --pad-token
        log(f"embeddings: {grown} row{'s' if grown > 1 else ''} added for the new tokens ({len(tokenizer):,} in "
            f"all), each starting at the mean of the others")
    train_every_embedding_row(model)  # (the pad token of a model sftune saved is often EOS, a real token)
    if cfg.packing and (fallback := check_packing(model, dist, sharded, auto=cfg.attention == "auto")):
        # (before anything is written: a model that would mix packed examples is refused)
        log(f"attention: {fallback} under a mask from the position ids for the packed rows, not {attention}: "
            f"{type(model).__name__}'s layers do not pass the rows' example bounds on to sftune's attention (auto)")
        resolved = replace(resolved, attention=fallback)
        config_yaml = dump_yaml(resolved)
    base = base_name(cfg, out)
    if dist.is_main:  # every check has passed: from here on the directory is this run's
        if checkpoint is None and cfg.overwrite:
            clear_previous_run(out)  # nothing of an older run may mix with this one
        out.mkdir(parents=True, exist_ok=True)
        if checkpoint is None:  # (a resume's, once its checkpoint has loaded: one that fails leaves the run's as it was)
            (out / "config.yaml").write_text(config_yaml)
        (out / DATA_FILE).write_text(json.dumps(data_summary(data, cfg.data_name, max_length), indent=1))
        if cfg.lora_r and cfg.init == "random" and not (Path(base) / "model.safetensors").is_file():
            publish_model(Path(base), lambda directory: save_model(model, tokenizer, directory))
            log(f"LoRA on a randomly initialised base: the base is saved in {base} (the adapter needs it)")
    dist.barrier()  # the other ranks go on once rank 0 has cleared and written
    adapter = None
    if cfg.lora_r:
        from sftune.lora import add_lora

        # LoRA layers go into `model` itself; only they, modules_to_save and the --add-tokens rows train
        adapter = add_lora(model, cfg, token_ids(tokenizer, cfg.add_tokens))
        if notice := keep_base_in_compute_dtype(cfg, adapter, precision, sharded):
            log(notice)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    blocks = compile_blocks(model, cfg.compile_backend, padding.shapes) if cfg.compile_blocks else 0
    loss_model = CausalLMLoss(model if sharded else model.to(dist.device))
    if notice := router_loss_notice(model):
        log(notice)
    if cfg.neftune_alpha:
        loss_model.add_noise(cfg.neftune_alpha)
        log(f"NEFTune: noise on the input embeddings in training, alpha {cfg.neftune_alpha:g} / sqrt(each example's "
            f"length x {model.get_input_embeddings().weight.shape[-1]})")
    if loss_model.fused:
        loss_model.chunk_rows = chunk_rows(dist.device, output_head(model).weight.shape[0])
    if loss_model.fused and wants_chunk_math(cfg, compile_mode, steps, max_length):
        loss_model.chunk_math = ChunkMath()
    say_step(cfg, dist.device, compile_mode, why, padding, loss_model.chunk_math is not None, blocks, blocks_why)
    wrapped = dist.wrap(loss_model, cfg.strategy, precision)  # DDP or FSDP under torchrun; else the module itself
    if compile_mode == "torch":  # (the training step only: evaluation runs `loss_model`, eagerly)
        wrapped = compile_step(wrapped, loss_model, padding, cfg.compile_backend, cfg.compile_mode)
    optimizer = build_optimizer(cfg, loss_model, dist.device)
    warmup = warmup_steps(cfg, steps.total_steps)
    scheduler = build_scheduler(cfg, optimizer, warmup, steps.total_steps)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=precision == "fp16")  # loss scaling only for fp16
    kind = ((ShardedAdapterCheckpointer if sharded else AdapterCheckpointer) if cfg.lora_r else
            ShardedCheckpointer if sharded else FullCheckpointer)
    lora_args = (adapter, base) if adapter is not None else ()  # (the adapter kinds write the adapter and its base)
    # (checkpoints nobody asked for, --save-minutes' alone, are for a crash: the newest one is all that serves)
    keep_last = cfg.keep_last if cfg.save_every or cfg.save_best else 1
    checkpointer: Checkpointer = kind(out / "checkpoints", dist, tokenizer, config_yaml, keep_last,
                                      cfg.checkpoint_hashes, cfg.save_best, *lora_args)
    state = start_state(cfg, out, dist, checkpoint, checkpointer, fingerprints, steps.total_steps,
                        (loss_model, optimizer, scheduler, scaler))
    if checkpoint is not None and dist.is_main:
        (out / "config.yaml").write_text(config_yaml)
    say_plan(cfg, steps, max_length, warmup, out, loss_model, wrapped, dist)
    return Run(resolved, dist, out, precision, tokenizer, wrapped, loss_model, adapter, base, steps, compile_mode,
               optimizer, scheduler, scaler, checkpointer, state, checkpoint, lock)


def keep_base_in_compute_dtype(cfg: SFTConfig, adapter, precision: str, sharded: bool) -> str | None:
    """`lora_base_dtype auto`: the frozen base's matrices kept in the compute precision's dtype (`casts.
    keep_frozen_matrices_in`); what to log, or None where they stay fp32: fp32 runs and DoRA (its weight norms
    read the base's fp32 weights). Under FSDP (`sharded`) the shards are kept in that dtype: each rank's share
    of the base is halved (in bf16 its all-gathers were bf16 already)."""
    if cfg.lora_base_dtype != "auto" or precision not in ("bf16", "fp16") or cfg.lora_use_dora:
        return None
    from sftune.casts import keep_frozen_matrices_in, memory_text

    saved = keep_frozen_matrices_in(adapter, DTYPES[precision])
    amount = memory_text(saved) + " less memory" + (" across the ranks' shards" if sharded else "")
    return (f"LoRA: the frozen base's matrices kept in {precision}, {amount} (the products read them in "
            f"{precision} either way: the same numbers; --lora-base-dtype fp32 keeps them fp32)" if saved else None)


def say_setup(cfg: SFTConfig, dist: Dist, precision: str) -> None:
    """The device and precision, and warnings about the setup: a restarted torchrun, --strategy in one process,
    library versions outside the tested ones."""
    log(f"device: {dist.device}, precision: {precision}" + (" (auto)" if cfg.precision == "auto" else ""))
    if precision == "bf16" and dist.device.type == "cuda" and not gpu_computes_bf16(dist.device):
        name, (major, minor) = torch.cuda.get_device_name(dist.device), torch.cuda.get_device_capability(dist.device)
        log(f"warning: {name} (compute capability {major}.{minor}) has no bf16 tensor cores: its bf16 products are "
            f"emulated, several times slower than fp16; --precision fp16 (or auto) uses them")
    if precision == "fp16" and dist.device.type == "cpu":
        log("note: fp16 on a CPU is loss-scaled as on a GPU, and most CPUs compute it no faster than fp32 (this "
            "project's 2-core Xeon: the same rate); bf16, which --precision auto takes where a CPU has it, is theirs")
    if warning := restart_warning():
        log(warning)
    if cfg.strategy != "auto" and not dist.distributed:
        log(f"warning: --strategy {cfg.strategy} spreads a run over the processes torchrun starts; this is one "
            f"process, which trains the whole model (torchrun --nproc-per-node N -m sftune train ...)")
    for name, version, spec in untested_versions():  # (pip enforces these; a --no-deps or conda install does not)
        log(f"warning: {name} {version} is outside the versions sftune is tested with ({spec}; older ones fail its "
            f"tests: benchmarks/NOTES.md try 32); pip install '{name}{spec}'")


def prepare_inputs(cfg: SFTConfig, dist: Dist, precision: str) -> tuple:
    """(tokenizer, model config, step source, prepared data, max_length): everything checked that can be before a
    model is loaded (the model's size against the context, the attention, LoRA's targets)."""
    tokenizer = build_tokenizer(cfg)
    model_config = override_config(load_model_config(cfg.model, cfg.trust_remote_code), cfg.model_config_overrides)
    check_model_fits(cfg, tokenizer, model_config)
    check_attention(model_config, cfg.attention, cfg.trust_remote_code, dist.device, precision, cfg.packing)
    if cfg.attention in ("varlen", "flex"):
        check_window(model_config, cfg.attention, cfg.max_length or context_length(model_config, tokenizer))
    say_attention_off_gpu(cfg, dist.device)
    if cfg.lora_r:
        from sftune.lora import check_lora

        check_lora(cfg, model_config, len(tokenizer), token_ids(tokenizer, cfg.add_tokens),
                   cfg.trust_remote_code)  # a wrong target is reported before anything loads
    data, max_length = build_data(cfg, tokenizer, model_config, dist)
    if getattr(data, "all_held_out", False):
        raise on_every_rank(SftuneError(
            f"streaming {cfg.data_name}: its {len(data.validation):,} rows were all held out for validation "
            f"(--stream-val-rows {cfg.stream_val_rows}: it has no validation split), so nothing is left to train "
            f"on; lower --stream-val-rows, or leave out --streaming (a dataset this small fits in memory)"))
    source_class = StreamedSteps if cfg.streaming else InMemorySteps
    return tokenizer, model_config, source_class(cfg, data, max_length, tokenizer.pad_token_id, dist), data, max_length


def load_run_model(cfg: SFTConfig, dist: Dist, checkpoint: Path | None, attention: str, sharded: bool):
    """The Hugging Face model the run starts from: the checkpoint's weights when resuming a full fine-tune from a
    whole model (the resume checks made sure it is the same model; under FSDP rank 0 reads it); else the base
    (shards or an adapter are loaded into it by `Checkpointer.restore`).

    FSDP: rank 0 loads the model into host memory, and `fully_shard` moves it to the GPU one block at a time,
    sharding as it goes (the whole model never sits on one GPU); the other ranks build it without weights and
    receive their shards from rank 0 (`Dist.wrap`: only rank 0 ever holds the whole model)."""
    from sftune.lora import is_adapter_dir

    if sharded and not dist.is_main and not is_adapter_dir(cfg.model):
        return model_skeleton(cfg.model, cfg.trust_remote_code, cfg.seed, attention, cfg.model_config_overrides)
    from_checkpoint = checkpoint is not None and holds_whole_model(checkpoint)
    return load_model(str(checkpoint) if from_checkpoint else cfg.model,
                      "pretrained" if from_checkpoint else cfg.init, cfg.trust_remote_code, cfg.seed,
                      attention=attention, overrides=cfg.model_config_overrides,
                      device=torch.device("cpu") if sharded else dist.device)


def start_state(cfg: SFTConfig, out: Path, dist: Dist, checkpoint: Path | None, checkpointer: Checkpointer,
                fingerprints: dict, total_steps: int, trained: tuple) -> TrainState:
    """Where the run starts: a new state, or the checkpoint's restored into `trained` (loss model, optimizer,
    scheduler, scaler); what `--resume` found is said."""
    run_id = dist.gather(uuid.uuid4().hex)[0]  # rank 0's, on every rank
    if checkpoint is None:
        if cfg.resume:
            skipped = complete_checkpoints(out / "checkpoints")  # (each warned about as it was passed over)
            log(f"--resume {cfg.resume}: " + (f"none of the {len(skipped)} checkpoint(s) in {out / 'checkpoints'} "
                                              f"is whole (above), starting fresh" if skipped else
                                              f"no checkpoint in {out / 'checkpoints'}, starting fresh"))
        return TrainState(run_id=run_id, fingerprints=fingerprints, world_size=dist.world_size)
    state = checkpointer.restore(checkpoint, *trained)
    state.fingerprints, state.world_size = fingerprints, dist.world_size
    log(f"resumed from {checkpoint}: step {state.step:,}, epoch {state.epoch}, {state.step_in_epoch:,} steps into it")
    if state.step >= total_steps:
        log(f"resume: that checkpoint is at the run's last step ({total_steps:,}): the training had finished; "
            f"nothing is trained again, the final model is written again")
    return state


def say_plan(cfg: SFTConfig, steps: StepSource, max_length: int, warmup: int, out: Path, loss_model: CausalLMLoss,
             wrapped: torch.nn.Module, dist: Dist) -> None:
    """The run's plan (steps, batches, learning rate and its schedule, the output directory) and its loss."""
    if warmup > steps.total_steps:
        log(f"warning: warmup_steps {warmup} is longer than the run ({steps.total_steps:,} steps): the "
            f"learning rate never reaches --lr {cfg.lr:g}; lower --warmup-steps")
    decays = (f" to {cfg.min_lr_ratio:g} x lr" if cfg.min_lr_ratio else "") + \
        (f" over the last {math.ceil(cfg.decay_ratio * steps.total_steps):,} steps" if cfg.lr_schedule == "wsd" else "")
    log(f"training: {describe_plan(cfg, steps, max_length)}, lr {cfg.lr:g} ({cfg.lr_schedule}{decays}, "
        f"{warmup} warm-up{f' = ceil({cfg.warmup_ratio:g} x {steps.total_steps:,})' if cfg.warmup_ratio else ''}), "
        f"output {out}")
    log(f"loss: {'output projection fused with cross-entropy, ' if loss_model.fused else ''}token-weighted over "
        f"each step" + (f"; {dist.world_size} ranks ({type(wrapped).__name__}"
                        f"{': ' + dist.mixed_precision if dist.mixed_precision else ''})" if dist.distributed else ""))


def base_name(cfg: SFTConfig, out: Path) -> str:
    """What an adapter config names as its base: a local directory as an absolute path (so the adapter loads from
    any working directory), a Hub id as it is, a randomly initialised base as the copy saved in the run."""
    if cfg.init == "random":
        from sftune.lora import BASE_DIR

        return str((out / BASE_DIR).resolve())
    path = Path(cfg.model).expanduser()
    return str(path.resolve()) if path.is_dir() else cfg.model


def tokenizer_identity(tokenizer) -> str:
    """What decides the ids and the chat rendering: the vocabulary and rules, and the chat template."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    return hashlib.sha256((tokenizer_fingerprint(tokenizer) + "|" + template).encode()).hexdigest()


def describe_plan(cfg: SFTConfig, steps: StepSource, max_length: int) -> str:
    batching = f"{cfg.grad_accum} x {cfg.batch_size} {'packed rows of ' + str(max_length) if cfg.packing else 'rows'}"
    if steps.world_size > 1:
        batching += f" per rank x {steps.world_size} ranks"
    batching += f" of at most {cfg.batch_tokens:,} tokens" if cfg.batch_tokens else ""
    batching += ", grouped by length" if cfg.group_by_length and not cfg.packing else ""
    per_epoch = f"{steps.steps_per_epoch:,} per epoch" if steps.steps_per_epoch else "streamed"
    epochs = ""
    if steps.steps_per_epoch and cfg.max_steps is not None:
        epochs = f", {steps.total_steps / steps.steps_per_epoch:.2f} epochs"
    return f"{steps.total_steps:,} optimizer steps ({per_epoch}{epochs}) of {batching}"
