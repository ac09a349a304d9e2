"""The `sftune` command.

    sftune train --config configs/quickstart.yaml            # the offline main job
    sftune train --config configs/gpt2-sst2.yaml             # the seed's job (needs the Hub)
    sftune data --config configs/gpt2-sst2.yaml --model ../shared/models/gpt2 --dataset ../shared/data/sst2
    sftune tokenize --model ../shared/models/gpt2 "Hello, this is the first step of RLHF training."
    sftune generate --model runs/quickstart --prompt "the film is"
    sftune eval --model runs/quickstart --dataset examples/quickstart --json

Every key of the YAML config is a flag (`batch_size` -> `--batch-size`); flags win over the file.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import difflib
import functools
import json
import logging
import os
import re
import sys
import threading
import typing
from pathlib import Path
from typing import Any, Literal

from sftune import __version__
from sftune.config import FIELDS, read_yaml, resolve_config
from sftune.config_values import describe_type, field_type
from sftune.console import is_main, log
from sftune.errors import SftuneError
from sftune.dist import env_rank
from sftune.signals import Preempted

GROUPS = {"model": "model", "data": "data", "train": "optimisation", "lora": "LoRA (peft)",
          "log": "evaluation, logging, output",
          "ckpt": "checkpoints and resume"}


# --- building the parser from the config --------------------------------------


# The keys `sftune eval` uses: the model, the data pipeline (validation split) and where it runs.
EVAL_KEYS = {
    "model", "tokenizer", "init", "trust_remote_code", "dataset", "dataset_config", "split", "format", "columns",
    "datasets", "text_column", "train_on_prompt", "train_on_all_turns", "chat_template", "val_fraction", "min_tokens",
    "max_length", "overlong", "truncation_side", "streaming", "stream_val_rows", "cache_dir", "seed", "precision",
    "device", "batch_size", "eval_batch_size", "val_split", "val_dataset", "val_datasets", "add_tokens", "pad_token",
}


def add_config_flags(parser: argparse.ArgumentParser, keys: set[str] | None = None) -> None:
    """One flag per SFTConfig field (or per field in `keys`); unset flags stay absent so YAML and
    defaults show through. A YAML file may hold any key: the command uses what it needs."""
    parser.add_argument("--config", metavar="FILE", help="YAML file of config keys (flags override it).")
    groups = {g: parser.add_argument_group(title) for g, title in GROUPS.items()}
    for name, f in FIELDS.items():
        if keys is not None and name not in keys:
            continue
        base, _ = field_type(name)
        flag = "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        help_text = f"{f.metadata['help']} [{describe_type(name)}; default: {_default(f)!r}]"
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is list:
            kwargs["nargs"] = "+"
            kwargs["metavar"] = "TEXT"
            help_text += ' ("" or [] for an empty list)'
        elif typing.get_origin(base) is dict:
            kwargs["metavar"] = "KEY=VALUE,..." if name == "model_config_overrides" else "PART=COLUMN,..."
        elif typing.get_origin(base) is Literal:
            kwargs["metavar"] = "{" + ",".join(typing.get_args(base)) + "}"
        else:
            kwargs["metavar"] = "REPO_ID" if name == "push_to_hub" else name.split("_")[-1].upper()
        groups[f.metadata["group"]].add_argument(flag, help=help_text.replace("%", "%%"), **kwargs)  # (argparse's %)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def config_from_args(args: argparse.Namespace):
    """YAML file (if any) under flags, validated once."""
    file_values = read_yaml(args.config) if args.config else {}
    flags = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    # a list flag given one empty string (or `[]`, as YAML writes it) is the empty list: a flag needs a value
    flags = {name: [] if value in ([""], ["[]"]) else value for name, value in flags.items()}
    source = f"config ({args.config} + flags)" if args.config else "flags"
    cfg = resolve_config(file_values, flags, source=source, training=args.command == "train")
    quiet_libraries()  # the heavy imports come after the config is known to be valid: its errors are instant
    return cfg


BASE_HELP = "LoRA: the base model of an adapter --model (default: the one its adapter_config.json names)"


class Parser(argparse.ArgumentParser):
    """argparse, whose mistakes are one line (its default prints the whole usage, 60 lines for `train`, first)."""

    def error(self, message: str) -> typing.NoReturn:
        hint = f"{self.prog} --help lists the {'commands' if self.prog == 'sftune' else 'options'}"
        if message.endswith("expected at least one argument"):  # a list flag (add_config_flags) given nothing
            message += ' (give "" for an empty list)'
        if match := re.fullmatch(r"argument (--[\w-]+)/--no-[\w-]+: ignored explicit argument (.*)", message):
            message = f"unexpected value {match[2]}: {yes_no_hint(match[1])}"  # --packing=yes
        # under torchrun every rank has the same command line: the node's first rank says it
        self.exit(2, None if os.environ.get("LOCAL_RANK", "0") != "0" else f"{self.prog}: error: {message} ({hint})\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="sftune", description="Supervised fine-tuning of causal language models (the first stage of RLHF).",
        allow_abbrev=False)
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    parser.add_argument("--version", action="version", version=f"sftune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser = functools.partial(sub.add_parser, allow_abbrev=False)  # --max-step is a typo, not --max-steps

    p = sub.add_parser("train", help="fine-tune a model", description="Fine-tune a model and save it.")
    p.add_argument("--verbose", action="store_true", help="print the whole resolved config at the start "
                   "(it is saved as <output_dir>/config.yaml either way)")
    add_config_flags(p)

    p = sub.add_parser("data", help="run the data pipeline and report on it", description=(
        "Load, tokenize and filter the dataset as `train` would, and report per split: rows kept and dropped "
        "by reason, tokens, lengths, optimizer steps per epoch, padding efficiency."))
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--show", type=int, default=0, metavar="N", help=(
        "also show the first N training examples with the trained tokens marked ([[...]], or colour on a terminal); "
        "with --json, their input_ids and labels"))
    add_config_flags(p)

    p = sub.add_parser("eval", help="validation loss and perplexity of a model", description=(
        "Token-weighted validation loss and perplexity of --model on the validation split of --dataset."))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--base", metavar="NAME_OR_PATH", help=BASE_HELP)
    add_config_flags(p, EVAL_KEYS)

    p = sub.add_parser("tokenize", help="show how texts are tokenized", description=(
        "Encode texts and show ids and tokens side by side, and the decoded round trip."))
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to encode")
    p.add_argument("--file", help="encode each line of this file")
    p.add_argument("--model", default="gpt2", help="model (for its tokenizer): Hub id or directory [default: gpt2]")
    p.add_argument("--tokenizer", help="tokenizer Hub id, directory, or 'bundled:gpt2' [default: the model's]")
    p.add_argument("--trust-remote-code", action="store_true", help="allow tokenizer code from the Hub repo")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("generate", help="sample completions from a model", description="Complete a prompt.")
    p.add_argument("--model", required=True, help="model directory (e.g. a run's output) or Hub id")
    p.add_argument("--prompt", action="append", default=[], help="prompt text to continue (repeat for several)")
    p.add_argument("--chat", action="append", default=[], metavar="MESSAGE",
                   help="a user message, rendered with the model's chat template (repeat for several)")
    p.add_argument("--system", help="system message before each --chat message [default: none]")
    p.add_argument("--tools", metavar="FILE", help="JSON file of tool schemas (a list of {type: function, function: "
                   "{name, description, parameters}}) given to the chat template with each --chat message, as a "
                   "tools column is in training [default: none]")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate at most [default: 40]")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 for greedy decoding "
                   "[default: 0.8]")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling: keep the most likely tokens up to "
                   "this probability mass [default: 0.95]")
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt [default: 1]")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling [default: 0]")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run: auto (CUDA when present) [default: auto]")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code from the Hub repo to run [default: off]")
    p.add_argument("--base", metavar="NAME_OR_PATH", help=BASE_HELP)
    p.add_argument("--json", action="store_true", help="print JSON [default: text]")

    p = sub.add_parser("report", help="an HTML report of one or more runs (curves, evals, samples, data, config)",
                       description=("Write one self-contained HTML page for the given run directories: loss curves "
                                    "(per step and per token, train and validation, runs overlaid), learning rate, "
                                    "throughput, evaluations, sample generations, the data summary and the config."))
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output directories of sftune runs")
    p.add_argument("--output", metavar="FILE", help="where to write the page [default: RUN_DIR/report.html for one "
                   "run, report.html here for several]")

    p = sub.add_parser("push", help="upload a finished run to the Hugging Face Hub", description=(
        "Upload a run's model (or LoRA adapter), tokenizer, config.yaml, metrics, report and a model card to a Hub "
        "repo in one commit, creating it (private unless --public) if needed; checkpoints stay local. What "
        "--push-to-hub does at the end of training."))
    p.add_argument("run", metavar="RUN_DIR", help="the output directory of sftune train")
    p.add_argument("repo_id", metavar="REPO_ID", help="name, user/name or org/name")
    p.add_argument("--public", action="store_true", help="create the repo public [default: private]")

    p = sub.add_parser("export", help="merge a LoRA run's adapter into its base, or an FSDP checkpoint's shards: "
                       "a full model", description=(
        "Write one Hugging Face model directory that AutoModelForCausalLM.from_pretrained loads (no peft, no "
        "torch.distributed needed), with the tokenizer: the base model with the adapter of a LoRA run merged into "
        "its weights (same outputs), or the weights of an FSDP checkpoint's shards in one model."))
    p.add_argument("run", metavar="RUN", help="a LoRA run's output directory or one of its checkpoints, or a "
                   "checkpoint written under FSDP (checkpoints/step-N with dcp/)")
    p.add_argument("--merge", "--output-dir", required=True, metavar="OUT", dest="merge",
                   help="directory to write the merged model to (either name)")
    p.add_argument("--base", metavar="NAME_OR_PATH", help=BASE_HELP.replace("--model", "RUN"))
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty OUT")
    p.add_argument("--save-dtype", choices=["auto", "fp32", "bf16", "fp16"],
                   help="the written weights' dtype: auto is the one the base model's config declares (fp32 where it "
                   "declares none) [default: the run's --save-dtype, else auto]")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code from the Hub repo to run [default: off]")
    return parser


# --- commands --------------------------------------------------------------------


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

    tokenizer = build_tokenizer(cfg)  # (the model's context as training sees it: with model_config_overrides)
    model_config = override_config(load_model_config(cfg.model, cfg.trust_remote_code), cfg.model_config_overrides)
    data, max_length = build_data(cfg, tokenizer, model_config)
    ranks = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun: the steps as its ranks would train them
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


def cmd_eval(args) -> None:
    split = evaluated_split(args)
    cfg = config_from_args(args)  # first: a config mistake is reported before the heavy imports
    if split is not None:
        cfg = dataclasses.replace(cfg, val_split=split)
    from sftune.build import build_data, build_tokenizer
    from sftune.dist import init_dist
    from sftune.evaluate import evaluate
    from sftune.modeling import fit_embeddings, load_model, load_model_config, override_config
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
                       overrides=cfg.model_config_overrides).to(dist.device)
    fit_embeddings(model, len(tokenizer))  # (--add-tokens on a model that lacks them: their rows as training starts)
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


def cmd_export(args) -> None:
    quiet_libraries()
    from sftune.shards import is_sharded
    from sftune.lora import adapter_base, is_adapter_dir, load_adapter_model
    from sftune.modeling import load_sharded_checkpoint, load_tokenizer, save_model
    from sftune.outputs import OutputLock, check_output_dir, publish_model, resolve_output_dir

    run = Path(args.run).expanduser()
    adapter = is_adapter_dir(run)  # (a LoRA checkpoint written under FSDP holds its adapter whole: merged as one)
    if not adapter and not is_sharded(run):
        what = "a full model (it is one already: use it as it is)" if (run / "config.json").is_file() else \
            "no LoRA adapter and no FSDP shards" if run.is_dir() else "not a directory"
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
    print(f"merged model written to {out} (AutoModelForCausalLM.from_pretrained('{out}'))")


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


def yes_no_hint(on: str, given: str | None = None) -> str:
    """For a yes/no flag given a value: how it is said instead."""
    return f"{given or on} takes no value ({on} to turn it on, --no-{on[2:]} to turn it off)"


def check_flags(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse; an unknown flag is an error that suggests the closest one (as unknown YAML keys do)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(" " + args.command))
        known = [o for action in sub._actions for o in action.option_strings]
        problems = []
        for flag in [e for e in extra if e.startswith("-")] or extra:
            name = flag.split("=", 1)[0]
            if not name.startswith("-"):  # a stray value, most often after a yes/no option
                at = argv.index(flag) if flag in argv else 0
                before = argv[at - 1] if at else ""
                on = "--" + before[5:] if before.startswith("--no-") else before  # (--no-packing yes)
                yes_no = f"--no-{on[2:]}" in known
                problems.append(f"unexpected value {flag!r}" + (f": {yes_no_hint(on, before)}" if yes_no else ""))
                continue
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            problems.append(f"unknown option {name}" + (f"; did you mean {close[0]}?" if close else ""))
        sub.error("; ".join(problems))  # (`Parser.error` adds where the options are listed)
    return args


ONE_PROCESS = ("data", "generate", "tokenize", "report", "export", "push")  # (train and eval use every rank)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = check_flags(parser, sys.argv[1:] if argv is None else argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.command in ONE_PROCESS and world_size > 1:  # under torchrun: one copy of the work, not one a rank
        if not is_main():
            return 0
        print(f"sftune {args.command}: one process's work: rank 0 does it, the other {world_size - 1} rank(s) exit "
              f"(torchrun spreads sftune train and sftune eval)", file=sys.stderr)
    try:
        COMMANDS[args.command](args)
    except SftuneError as e:
        if args.debug:
            raise
        who = "" if is_main() else f" [rank {env_rank()}]"  # under torchrun: rank 0 speaks, others only add
        distributed = sys.modules.get("torch.distributed")
        if who and e.every_rank:  # raised alike by every rank after they met: rank 0 says it
            return e.exit_code
        if who and os.environ.get("LOCAL_RANK", "0") != "0" and not (distributed and distributed.is_initialized()) \
                and not e.this_rank_only:
            return e.exit_code  # a mistake found before the ranks met: the same on this node's first rank, said there
        print(f"sftune {args.command}{who}: error: {e}", file=sys.stderr)
        return e.exit_code
    except Preempted as e:
        then = "continue with --resume auto" if e.checkpoint else "start again with --resume auto"
        if is_main():  # every rank stopped at the same step: one message
            print(f"sftune {args.command}: {e}; {then} (exit status {e.code})", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"sftune {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug or not collective_failed(e):
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"sftune {args.command} [rank {env_rank()}]: error: a collective operation with the other ranks failed "
              f"({type(e).__name__}: {first}); usually another rank stopped or was killed (its own error, if any, "
              f"is above). What was saved is intact: continue with --resume auto (--debug shows the traceback)",
              file=sys.stderr)
        return 1
    return 0


def entry() -> None:
    """The `sftune` command and `python -m sftune`: `main` with an output that survives its reader
    (`console.keep_writing`), then `quick_exit`."""
    from sftune.console import keep_writing

    keep_writing()
    quick_exit(main())


def quick_exit(code: int) -> typing.NoReturn:
    """Exit with `code`, skipping the interpreter's teardown of every module and object (freeing a model, its
    optimizer state and CUDA's context one by one: 1.1 s after a GPT-2 run on a 2-core CPU, 2.5 s on an H100
    machine; benchmarks/NOTES.md try 71). Nothing is lost by it: what sftune writes is written, synced and closed
    before `main` returns, and the exit's first steps run as at a normal exit: threading's own exit hooks (which
    tell thread pools to stop: inductor compiles in one), every thread that is not a daemon waited for, then the
    atexit handlers (logging, wandb, datasets' temporary files, ...)."""
    shutdown = getattr(threading, "_shutdown", None)  # what the interpreter itself calls first at exit (3.10-3.14)
    if shutdown is not None:
        shutdown()
    else:
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`sftune ... | head`): nothing more can be said there
            pass
    os._exit(code)


def collective_failed(e: Exception) -> bool:
    """Under torchrun: `e` is torch.distributed's error of a collective that could not complete (NCCL raises
    `DistError`s; gloo a RuntimeError from its transport)."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is None or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    return isinstance(e, distributed.DistError) or (isinstance(e, RuntimeError) and "gloo/transport" in str(e))


if __name__ == "__main__":
    sys.exit(main())
