"""What each `sftune` command does, once `cli.py` has parsed its command line.

    sftune train | data | eval | tokenize | generate | export | push | report

Each command resolves its config first (`config_from_args`: a mistake is said before the heavy imports), then
imports what it needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from sftune.config import FIELDS, read_yaml, resolve_config, run_config
from sftune.console import is_main, log
from sftune.errors import SftuneError


def config_from_args(args: argparse.Namespace, base: dict | None = None):
    """YAML file (if any; else `base`) under flags, validated once."""
    file_values = read_yaml(args.config) if args.config else dict(base or {})
    flags = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    # a list flag given one empty string (or `[]`, as YAML writes it) is the empty list: a flag needs a value
    flags = {name: [] if value in ([""], ["[]"]) else value for name, value in flags.items()}
    source = f"config ({args.config} + flags)" if args.config else "flags"
    cfg = resolve_config(file_values, flags, source=source, training=args.command == "train")
    if args.config:
        check_relative_paths(cfg, Path(args.config), set(file_values) - set(flags))
    quiet_libraries()  # the heavy imports come after the config is known to be valid: its errors are instant
    return cfg


PATH_KEYS = ("model", "tokenizer", "dataset", "val_dataset", "chat_template", "datasets", "val_datasets")


def check_relative_paths(cfg, config: Path, from_file: set[str]) -> None:
    """A relative path in a config file is read from the current directory, as a flag's is. When one is not there
    but is beside the config file (or in the directory above it: a project's root, for `configs/x.yaml`), the run
    was started from elsewhere: said at once, before anything loads, rather than "path not found" later."""
    here = Path.cwd()
    for key in (k for k in PATH_KEYS if k in from_file):
        value = getattr(cfg, key)
        for path in [e["dataset"] for e in value] if isinstance(value, list) else [value]:
            if not path or Path(path).is_absolute() or Path(path).expanduser().exists() or ":" in path.split("/")[0]:
                continue
            for root in (config.resolve().parent, config.resolve().parent.parent):
                if (root / path).exists():
                    raise SftuneError(
                        f"config {config}: {key} {path!r} is not in the current directory ({here}) but is in "
                        f"{root}: relative paths are read from the directory sftune runs in; run it from {root}, "
                        f"or write the path absolute")


def quiet_libraries() -> None:
    """Keep library chatter (and non-TTY progress bars) out of our output. `datasets` reads its settings from the
    environment when first imported, which a run whose data come from sftune's cache never does (0.6 s saved)."""
    from sftune.console import quiet_tokenizers

    quiet_tokenizers()
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:  # (imported already: by a program that calls sftune)
        datasets = sys.modules["datasets"]
        datasets.logging.set_verbosity_error()
        if not sys.stderr.isatty():
            datasets.disable_progress_bars()
    import transformers
    from huggingface_hub.utils import logging as hub_logging

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars
    hub_logging.set_verbosity_error()  # ("Repo card metadata block was not found", for a local dataset's README)
    for name in ("torch._dynamo.variables.ctx_manager", "torch._dynamo.variables.torch"):
        # torch.compile around DDP, on every rank: "Profiler record function <class ...> will be ignored" (DDP's
        # forward names itself for the profiler; --profile-steps profiles compiled steps all the same)
        logging.getLogger(name).addFilter(lambda record: "will be ignored" not in str(record.msg))


def cmd_train(args) -> None:
    cfg = config_from_args(args)  # first: a config mistake is reported before the heavy imports
    from sftune.config import dump_yaml
    from sftune.train import train

    if args.verbose and is_main():  # (under torchrun, rank 0 alone)
        print("resolved config:\n" + "\n".join("  " + line for line in dump_yaml(cfg).splitlines()), file=sys.stderr)
    elif is_main():
        print(summarize_config(cfg), file=sys.stderr)
    if getattr(args, "group_by_length", False) and cfg.packing and is_main():  # (the flag itself: it is the default)
        print("warning: --group-by-length does nothing with --packing: packed rows are filled best-fit by length "
              "already, and the rows are shuffled", file=sys.stderr)
    if cfg.push_to_hub:  # (every rank: a refusal is the same everywhere, before the ranks meet)
        from sftune.hub import check_push

        check_push(cfg.push_to_hub)
    result = train(cfg)
    if not is_main():
        return
    first, last = result.first_val_loss, result.last_val_loss
    print(f"\ndone: {result.steps:,} steps, {result.tokens:,} tokens in {result.seconds:.1f}s with evaluations and "
          f"samples ({result.tokens / max(result.seconds, 1e-9):,.0f} tok/s; the step lines give training's own pace)")
    print(f"val loss {first:.4f} -> {last:.4f} ({'fell' if last < first else 'did not fall'}); "
          f"val ppl {result.evals[0]['val_ppl']:,.2f} -> {result.evals[-1]['val_ppl']:,.2f}")
    if cfg.push_to_hub:
        from sftune.hub import push_run

        print(f"pushed to {push_run(result.output_dir, cfg.push_to_hub, cfg.hub_private)}")
    if cfg.lora_r:
        print(f"adapter saved to {result.output_dir} (peft: AutoPeftModelForCausalLM.from_pretrained("
              f"'{result.output_dir}'); sftune eval/generate --model {result.output_dir})")
        if cfg.merge:
            print(f"merged model saved to {result.output_dir / 'merged'} (AutoModelForCausalLM.from_pretrained)")
    else:
        print(f"model saved to {result.output_dir} (AutoModelForCausalLM.from_pretrained('{result.output_dir}'))")
    for prompt, text in result.samples.items():
        print(f"sample: {prompt!r} -> {text!r}")


def summarize_config(cfg) -> str:
    """The run in a few lines; values that differ from the defaults are what the user chose."""
    from sftune.config import SFTConfig

    defaults = SFTConfig()
    changed = [k for k in FIELDS if getattr(cfg, k) != getattr(defaults, k)
               and k not in ("model", "dataset", "datasets", "sample_prompts")]
    lines = [f"config: model {cfg.model} | data {cfg.data_name} | {cfg.epochs if cfg.max_steps is None else cfg.max_steps}"
             f" {'epoch(s)' if cfg.max_steps is None else 'steps'} | batch {cfg.batch_size} x {cfg.grad_accum} "
             f"| lr {cfg.lr:g} {cfg.lr_schedule} | precision {cfg.precision} | seed {cfg.seed}"]
    if changed:
        lines.append("  set: " + ", ".join(f"{k}={getattr(cfg, k)}" for k in changed))
    lines.append("  (every key: --verbose, and <output_dir>/config.yaml)")
    return "\n".join(lines)


def cmd_data(args) -> None:
    cfg = config_from_args(args)  # first: a config mistake is reported before the heavy imports
    from sftune.build import build_data, build_tokenizer
    from sftune.steps import epoch_plan, plan_steps
    from sftune.modeling import load_model_config, override_config
    from sftune.report import data_report, format_data_report

    tokenizer = build_tokenizer(cfg)
    if cfg.tokenizer and not model_named(args):  # the data alone: no model to read (the context: the tokenizer's)
        model_config = None
        log(f"data: --tokenizer {cfg.tokenizer} and no --model: no model is read (--model checks the lengths "
            f"against its context)")
    else:  # (the model's context as training sees it: with model_config_overrides)
        model_config = override_config(load_model_config(cfg.model, cfg.trust_remote_code), cfg.model_config_overrides)
    data, max_length = build_data(cfg, tokenizer, model_config)
    ranks = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun: the steps as its ranks would train them
    if args.nproc_per_node is not None:  # ... or as `sftune train --nproc-per-node N` will
        from sftune.launch import processes

        ranks = processes(args.nproc_per_node)
    if cfg.streaming:  # report on the validation split and the stream's first chunk
        from sftune.batching import chunk_rows_for

        data = data.first_chunk_data(chunk_rows_for(cfg.batch_size * ranks, cfg.grad_accum))
        log(f"data: streaming: 'train' below is the stream's first chunk ({data.stats['train'].rows:,} rows)")
        steps = plan_steps(data.train.lengths, cfg, max_length, 0, ranks)  # (as training plans a chunk)
    else:
        steps = epoch_plan(data, cfg, max_length, 0, ranks)  # the first epoch, as training plans it
    report = data_report(data, cfg.data_name, max_length, cfg.batch_size, cfg.grad_accum,
                         cfg.eval_batch_size or cfg.batch_size, steps, cfg.batch_tokens, cfg.group_by_length,
                         cfg.packing, show=args.show, streaming=cfg.streaming, ranks=ranks)
    print(json.dumps(report, indent=2) if args.json else format_data_report(report, tokenizer, color=sys.stdout.isatty()))


def model_named(args) -> bool:
    """Whether the user named a model, by flag or in the config file (else `model` is its default, gpt2)."""
    return getattr(args, "model", None) is not None or bool(args.config and "model" in read_yaml(args.config))


def evaluated_split(args) -> str | None:
    """The split `sftune eval` was asked for on its command line: --val-split, or --split (eval trains nothing, so the
    split it reads is the one it evaluates); both flags are taken out of `args`. None: the config's validation (the
    dataset's own split, or the rows a training run held out)."""
    named = {flag: args.__dict__.pop(key) for key, flag in (("split", "--split"), ("val_split", "--val-split"))
             if key in args.__dict__}
    if len(named) == 2:
        raise SftuneError(f"sftune eval evaluates one split: --split {named['--split']} and --val-split "
                          f"{named['--val-split']} both name one; give --val-split alone")
    if named and (getattr(args, "datasets", None) or getattr(args, "val_dataset", None)):
        raise SftuneError(f"{next(iter(named))} with --datasets or --val-dataset: name the split to evaluate as "
                          f"val_split of each dataset (or --val-split with --val-dataset), in a config file")
    return next(iter(named.values()), None)


# What `sftune eval --model RUN_DIR` takes from the run's config.yaml when no data is named: the data, and how its
# validation rows were chosen and batched, so that it evaluates what the run evaluated.
RUN_DATA_KEYS = ("dataset", "datasets", "dataset_config", "split", "format", "columns", "text_column",
                 "train_on_prompt", "train_on_all_turns", "val_split", "val_dataset", "val_datasets", "val_fraction",
                 "min_tokens", "max_length", "overlong", "truncation_side", "streaming", "stream_val_rows", "seed",
                 "eval_batch_size", "cache_dir")
DATA_FLAGS = ("dataset", "datasets", "val_dataset", "val_datasets")


def run_data(args) -> dict:
    """`sftune eval --model RUN_DIR` without --config or a dataset: the data keys of the run's own config.yaml (the
    data it trained and evaluated on), said in the log; {} for any other model."""
    if args.config or any(getattr(args, k, None) for k in DATA_FLAGS) or not getattr(args, "model", None):
        return {}
    if (values := run_config(args.model)) is None:
        return {}
    data = {k: values[k] for k in RUN_DATA_KEYS if k in values}
    if data.get("eval_batch_size") is None and values.get("batch_size"):  # (the run's validation batches: of
        data["eval_batch_size"] = values["batch_size"]  # batch_size rows, the rounding of its evaluations)
    name = " + ".join(e["dataset"] if isinstance(e, dict) else str(e) for e in data.get("datasets") or []) \
        or data.get("dataset")
    log(f"eval: the data {args.model} trained on, from its config.yaml: {name} (--dataset to evaluate other data)")
    return data


def cmd_eval(args) -> None:
    split = evaluated_split(args)
    cfg = config_from_args(args, run_data(args))  # first: a config mistake is said before the heavy imports
    if split is not None:
        cfg = dataclasses.replace(cfg, val_split=split)
    from sftune.build import build_data, build_tokenizer
    from sftune.dist import init_dist
    from sftune.evaluate import evaluate
    from sftune.modeling import load_model, load_model_config, override_config
    from sftune.vocab import fit_embeddings
    from sftune.runtime import keep_freed_memory, resolve_precision

    dist = init_dist(cfg.device, cfg.dist_timeout)
    precision = resolve_precision(trained_precision(cfg), dist.device)
    keep_freed_memory(dist.device)
    tokenizer = build_tokenizer(cfg)
    init = cfg.init
    if init == "random" and has_weights(cfg.model):  # a training config's `init: random` with a trained --model
        init = "pretrained"
        log(f"eval: {cfg.model} holds trained weights: evaluating them (init: random is how training starts)")
    # the data before the model (a mistake in it is said before minutes of loading a large model): that split alone
    # when one is named (the training split is not read), as streaming reads only the validation split
    model_config = override_config(load_model_config(cfg.model, cfg.trust_remote_code, base=args.base),
                                   cfg.model_config_overrides)
    data, _ = build_data(cfg, tokenizer, model_config, dist, validation_only=split is not None)
    model = load_model(cfg.model, init, cfg.trust_remote_code, cfg.seed, base=args.base,
                       overrides=cfg.model_config_overrides, merged=False)  # (an adapter: as trained)
    fit_embeddings(model, len(tokenizer))  # (--add-tokens on a model that lacks them: their rows as training starts)
    if notice := keep_matrices_for_evaluation(model, precision):
        log(notice)
    model.to(dist.device)
    groups = getattr(data, "validation_groups", [])  # a mixture's datasets: each one's loss too
    batch_size = cfg.eval_batch_size or cfg.batch_size
    try:
        result = evaluate(model, data.validation, batch_size, tokenizer.pad_token_id, dist.device, precision, dist,
                          groups=groups)
    except RuntimeError as e:
        from sftune.runtime import out_of_memory

        if (what := out_of_memory(e)) is None:
            raise
        raise SftuneError(f"out of memory evaluating batches of up to {batch_size} rows ({what}); lower "
                          f"--eval-batch-size (or --max-length)") from None
    if not dist.is_main:  # under torchrun every rank evaluated its share; rank 0 reports the sum over sum
        return
    report = {"model": cfg.model, "dataset": cfg.data_name, "split": cfg.val_split or "validation", "val_loss": result.loss,
              "val_ppl": result.perplexity, "val_token_accuracy": result.accuracy, "examples": result.examples,
              "target_tokens": result.targets, "precision": precision}
    if groups:
        report["val_loss_by_dataset"] = result.group_losses
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{cfg.model} on {cfg.data_name} ({report['split']}, {result.examples:,} examples, {result.targets:,} target "
              f"tokens): "
              f"val_loss {result.loss:.4f}, perplexity {result.perplexity:,.2f}, token accuracy {result.accuracy:.3f} "
              f"({precision})")
        for name, loss in report.get("val_loss_by_dataset", {}).items():
            print(f"  {name}: val_loss {loss:.4f}")


def keep_matrices_for_evaluation(model, precision: str) -> str | None:
    """In bf16 or fp16, the weights only matrix products read kept in that dtype before the model goes to the
    device: half their memory, the same loss (autocast would cast each where it is read, rounding alike; `casts.
    keep_frozen_matrices_in`). Not with DoRA, whose weight norms read the base's weights. What to log, or None."""
    from sftune.casts import keep_frozen_matrices_in, memory_text
    from sftune.runtime import DTYPES

    if precision not in ("bf16", "fp16") or any("lora_magnitude_vector" in n for n, _ in model.named_parameters()):
        return None
    model.requires_grad_(False)  # (nothing is trained: every weight is frozen)
    saved = keep_frozen_matrices_in(model, DTYPES[precision])
    return f"eval: the matrices kept in {precision}, {memory_text(saved)} less memory (the same numbers)" \
        if saved else None


def has_weights(model: str) -> bool:
    """A local model directory with weights: a Hugging Face model or an adapter (safetensors or .bin files), or an
    FSDP checkpoint."""
    from sftune.shards import is_sharded

    path = Path(model).expanduser()
    return path.is_dir() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin")) or is_sharded(path))


def trained_precision(cfg) -> str:
    """`precision`, or when it is left at auto for an sftune run's directory, the precision it trained in."""
    saved = Path(cfg.model).expanduser() / "config.yaml"
    if cfg.precision != "auto" or not saved.is_file():
        return cfg.precision
    import yaml

    try:
        precision = (yaml.safe_load(saved.read_text()) or {}).get("precision", "auto")
    except (OSError, yaml.YAMLError):
        return cfg.precision
    if precision in ("fp32", "bf16", "fp16"):
        log(f"precision: {precision}, as the run trained (--precision to change)")
        return precision
    return cfg.precision


def cmd_tokenize(args) -> None:
    quiet_libraries()
    from sftune.modeling import load_tokenizer

    texts = [utf8(t, "TEXT") for t in args.texts]
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise SftuneError(f"{path} is a directory; give --file a text file" if path.is_dir() else
                              f"file not found: {path} (--file)")
        try:
            texts += path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise SftuneError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                              f"re-encode it as UTF-8 (--file)") from None
    if not texts:
        raise SftuneError("nothing to tokenize: give one or more TEXT arguments or --file FILE")
    name = args.tokenizer or args.model
    tokenizer = load_tokenizer(name, args.trust_remote_code, flag="--tokenizer" if args.tokenizer else "--model")
    rows = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        rows.append({"text": text, "input_ids": ids, "tokens": tokenizer.convert_ids_to_tokens(ids),
                     "decoded": tokenizer.decode(ids)})
    if args.json:
        print(json.dumps(rows if len(rows) > 1 else rows[0], ensure_ascii=False))
        return
    for row in rows:
        print(f"text:    {row['text']!r}\nids:     {row['input_ids']}\ntokens:  {len(row['input_ids'])}")
        for i, t in zip(row["input_ids"], row["tokens"]):
            print(f"  {i:>7}  {t!r}")
        same = "round trip exact" if row["decoded"] == row["text"] else "round trip differs"
        print(f"decoded: {row['decoded']!r} ({same})\n")


def read_tools(path: str) -> list[dict]:
    """`generate --tools FILE`: the JSON schemas, checked as a row's tools column is."""
    from sftune.data.formats import row_tools

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SftuneError(f"--tools: cannot read {path}: {e}") from None
    tools = row_tools(text, f"--tools {path}")
    if not tools:
        raise SftuneError(f"--tools {path} holds no tool schema; give a JSON list of them")
    for i, tool in enumerate(tools):  # (a function schema, or one wrapped as {type: function, function: ...})
        if not isinstance((tool.get("function") if isinstance(tool.get("function"), dict) else tool).get("name"), str):
            raise SftuneError(f"--tools {path}: tool {i} has no name ({json.dumps(tool)[:80]}); each is a JSON schema "
                              f'like {{"type": "function", "function": {{"name": ..., "description": ..., '
                              f'"parameters": {{...}}}}}}')
    return tools


def cmd_generate(args) -> None:
    quiet_libraries()
    from sftune.generate import check_prompts, check_sampling, complete
    from sftune.modeling import load_model, load_tokenizer, model_dir_advice
    from sftune.runtime import resolve_device

    if not args.prompt and not args.chat:
        raise SftuneError("nothing to complete: give --prompt TEXT or --chat MESSAGE")
    check_sampling(args.temperature, args.top_p, args.max_new_tokens, args.num_samples)
    if not 0 <= args.seed < 2**64:
        raise SftuneError(f"--seed must be from 0 to 2**64 - 1 (torch's seeds are unsigned 64-bit), got {args.seed}")
    args.prompt = [utf8(p, "--prompt") for p in args.prompt]
    args.chat = [utf8(p, "--chat") for p in args.chat]
    args.system = args.system and utf8(args.system, "--system")
    tools = read_tools(args.tools) if args.tools else None
    if tools and not args.chat:
        raise SftuneError("--tools goes with --chat MESSAGE (a plain --prompt has no chat template to show them)")
    if args.system is not None and not args.chat:
        raise SftuneError("--system goes with --chat MESSAGE (a plain --prompt is continued as it is written: put "
                          "the instruction in its text)")
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code, flag="--model", advice=model_dir_advice(args.model))
    check_prompts(tokenizer, args.prompt, args.chat, args.system, tools)  # (before loading the model)
    if args.prompt and trained_on_chat(args.model):
        log(f"generate: {args.model} was trained on chat data; --prompt continues the text as written, --chat MESSAGE "
            f"asks it as a user turn, rendered with its chat template as in training")
    model = load_model(args.model, "pretrained", args.trust_remote_code, base=args.base).to(device)
    results = []
    for prompt, chat in [(p, False) for p in args.prompt] + [(c, True) for c in args.chat]:
        texts = complete(model, tokenizer, prompt, args.max_new_tokens, args.temperature, args.top_p,
                         args.num_samples, args.seed, chat=chat, system=args.system, tools=tools)
        results.append({"prompt" if not chat else "chat": prompt, "completions": texts})
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], ensure_ascii=False))
        return
    for r in results:
        for i, text in enumerate(r["completions"]):
            print(f"[{i}] {r['prompt']}{text}" if "prompt" in r else f"[{i}] user: {r['chat']}\n    assistant: {text}")


def trained_on_chat(model: str) -> bool:
    """Whether `model` is an sftune run's directory whose data was chat (its data.json says the format)."""
    try:
        return json.loads((Path(model).expanduser() / "data.json").read_text()).get("format", "").startswith("chat")
    except (OSError, ValueError, AttributeError):
        return False


def cmd_export(args) -> None:
    quiet_libraries()
    from sftune.shards import is_sharded
    from sftune.lora import adapter_base, is_adapter_dir, load_adapter_model
    from sftune.modeling import load_model, load_sharded_checkpoint, load_tokenizer, save_model
    from sftune.outputs import OutputLock, check_output_dir, publish_model, resolve_output_dir

    run = Path(args.run).expanduser()
    adapter = is_adapter_dir(run)  # (a LoRA checkpoint written under FSDP holds its adapter whole: merged as one)
    whole = not adapter and not is_sharded(run) and (run / "config.json").is_file()  # a full model: another dtype
    if not adapter and not is_sharded(run) and not (whole and args.save_dtype):
        what = "a full model (it is one already: use it as it is, or give --save-dtype bf16 for a copy in another " \
               "dtype)" if whole else "no LoRA adapter and no FSDP shards" if run.is_dir() else "not a directory"
        raise SftuneError(f"{run} holds {what}; export --merge takes a LoRA run's output directory (with "
                          f"adapter_config.json) or one of its checkpoints, or a checkpoint written under FSDP")
    out = resolve_output_dir(args.merge)
    if out.absolute() == run.absolute():
        raise SftuneError(f"--merge {out} is the run directory itself; write the merged model elsewhere, e.g. "
                          f"--merge {run / 'merged'}")
    if adapter and Path(base := adapter_base(run, args.base)).is_dir() and Path(base).resolve() == out.resolve():
        raise SftuneError(f"--merge {out} is the adapter's base model directory: the merged model would be written "
                          f"over the base it is made from; write it elsewhere")
    check_output_dir(out, resume=False, overwrite=args.overwrite, flag="--merge")
    tokenizer = load_tokenizer(str(run), args.trust_remote_code, flag="RUN")
    if adapter:
        model = load_adapter_model(run, args.base, args.trust_remote_code)
    elif whole:
        model = load_model(str(run), "pretrained", args.trust_remote_code)
    else:
        model = load_sharded_checkpoint(run, args.trust_remote_code)
    dtype = export_dtype(args.save_dtype, run, args.base, args.trust_remote_code)
    lock = OutputLock(out)
    lock.acquire()
    try:
        publish_model(out, lambda directory: save_model(model, tokenizer, directory, run_config=run / "config.yaml",
                                                        dtype=dtype))
    finally:
        lock.release()
    what = f"the model in {dtype}" if whole else "merged model"
    print(f"{what} written to {out} (AutoModelForCausalLM.from_pretrained('{out}'))")


def export_dtype(asked: str | None, run: Path, base: str | None, trust_remote_code: bool) -> str:
    """What `sftune export` writes the weights in: --save-dtype, else the run's own (its config.yaml, resolved when
    it trained), else the dtype the base model's config declares."""
    from sftune.modeling import declared_dtype, load_model_config

    if asked is None and (run / "config.yaml").is_file():
        asked = read_yaml(run / "config.yaml").get("save_dtype")
    if asked in (None, "auto"):
        return declared_dtype(load_model_config(str(run), trust_remote_code, base=base))
    return asked


def cmd_push(args) -> None:
    from sftune.hub import check_push, push_run

    run = Path(args.run).expanduser()
    if not (run / "metrics.jsonl").is_file() or not any((run / f).is_file() for f in ("config.json",
                                                                                     "adapter_config.json")):
        raise SftuneError(f"{run} is not the output directory of a finished sftune run (it needs metrics.jsonl and a "
                          f"model or adapter); give the --output-dir of sftune train")
    check_push(args.repo_id, flag="sftune push")
    print(f"pushed {run} to {push_run(run, args.repo_id, not args.public, flag='sftune push')}")


def cmd_report(args) -> None:
    from sftune.run_report import write_report

    runs = [Path(r).expanduser() for r in args.runs]
    for run in runs:
        if not (run / "metrics.jsonl").is_file():
            raise SftuneError(f"{run} is not an sftune run directory (no metrics.jsonl); give output directories of "
                              f"sftune train")
    output = Path(args.output) if args.output else (runs[0] / "report.html" if len(runs) == 1 else Path("report.html"))
    if output.is_dir():
        raise SftuneError(f"--output {output} is a directory; give a file name such as {output / 'report.html'}")
    try:
        write_report(runs, output)
    except OSError as e:
        raise SftuneError(f"could not write the report to {output}: {e.strerror or e}; give --output a file in a "
                          f"directory you can write") from None
    print(f"report written to {output}")


def utf8(text: str, flag: str) -> str:
    """A command-line text that is valid Unicode (bytes that are not UTF-8 arrive as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SftuneError(f"{flag} {text!r} is not UTF-8 text (position {e.start}); pass UTF-8 text") from None
    return text


COMMANDS = {"train": cmd_train, "data": cmd_data, "eval": cmd_eval, "tokenize": cmd_tokenize, "generate": cmd_generate,
            "export": cmd_export, "report": cmd_report, "push": cmd_push}
