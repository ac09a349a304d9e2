"""The `sftune` command.

    sftune train --config configs/quickstart.yaml            # the offline main job
    sftune train --config configs/gpt2-sst2.yaml             # the seed's job (needs the Hub)
    sftune data --config configs/gpt2-sst2.yaml --model ../shared/models/gpt2 --dataset ../shared/data/sst2
    sftune tokenize --model ../shared/models/gpt2 "Hello, this is the first step of RLHF training."
    sftune generate runs/quickstart --prompt "the film is"
    sftune eval --model runs/quickstart --dataset examples/quickstart --json

Every key of the YAML config is a flag (`batch_size` -> `--batch-size`); flags win over the file.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import difflib
import functools
import os
import re
import sys
import threading
import time
import typing
from typing import Any, Literal

from sftune import __version__
from sftune.config import FIELDS
from sftune.config_values import describe_type, field_type
from sftune.console import is_main
from sftune.errors import SftuneError
from sftune.dist import env_rank
from sftune.commands import COMMANDS
from sftune.signals import Preempted

GROUPS = {"model": "model", "data": "data", "train": "optimisation", "lora": "LoRA (peft)",
          "log": "evaluation, logging, output",
          "ckpt": "checkpoints and resume"}


# --- building the parser from the config --------------------------------------


# The keys `sftune eval` uses: the model, the data pipeline (validation split) and where it runs.
EVAL_KEYS = {
    "model", "tokenizer", "init", "trust_remote_code", "dataset", "dataset_config", "split", "format", "columns",
    "datasets", "text_column", "train_on_prompt", "train_on_all_turns", "chat_template", "val_fraction", "min_tokens",
    "max_length", "overlong", "truncation_side", "streaming", "stream_val_rows", "cache_dir", "data_workers", "seed",
    "precision",
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


BASE_HELP = "LoRA: the base model of an adapter --model (default: the one its adapter_config.json names)"
NPROC_HELP = ("{what} on N processes of this machine, one per GPU (auto: every visible GPU), started as `torchrun "
              "--standalone --nproc-per-node N -m sftune ...` would; several nodes: torchrun [default: one process]")


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
    p.add_argument("--nproc-per-node", metavar="N", help=NPROC_HELP.format(what="train"))
    add_config_flags(p)

    p = sub.add_parser("data", help="run the data pipeline and report on it", description=(
        "Load, tokenize and filter the dataset as `train` would, and report per split: rows kept and dropped "
        "by reason, tokens, lengths, optimizer steps per epoch, padding efficiency."))
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--nproc-per-node", metavar="N", help="plan the steps as sftune train --nproc-per-node N trains "
                   "them: N ranks of batch_size rows (auto: one per visible GPU) [default: one process; under "
                   "torchrun its ranks]")
    p.add_argument("--show", type=int, default=0, metavar="N", help=(
        "also show the first N training examples with the trained tokens marked ([[...]], or colour on a terminal); "
        "with --json, their input_ids and labels"))
    add_config_flags(p)

    p = sub.add_parser("eval", help="validation loss and perplexity of a model", description=(
        "Token-weighted validation loss and perplexity of --model on the validation split of --dataset."))
    p.add_argument("model_path", nargs="?", metavar="MODEL", help="the model (a run's output directory, a model "
                   "directory or Hub id), as --model gives it")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--base", metavar="NAME_OR_PATH", help=BASE_HELP)
    p.add_argument("--nproc-per-node", metavar="N", help=NPROC_HELP.format(what="evaluate"))
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
    p.add_argument("model_path", nargs="?", metavar="MODEL", help="model directory (e.g. a run's output) or Hub id")
    p.add_argument("--model", help="the same as MODEL")
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
                   "declares none); with a full model's RUN, a copy of it in this dtype [default: the run's "
                   "--save-dtype, else auto]")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code from the Hub repo to run [default: off]")
    return parser


def yes_no_hint(on: str, given: str | None = None) -> str:
    """For a yes/no flag given a value: how it is said instead."""
    return f"{given or on} takes no value ({on} to turn it on, --no-{on[2:]} to turn it off)"


def check_flags(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse; an unknown flag is an error that suggests the closest one (as unknown YAML keys do)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = subparser(parser, args.command)
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
    if args.command in ("eval", "generate"):
        model_in_front(args, subparser(parser, args.command))
    return args


def subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    return parser._subparsers._group_actions[0].choices[command]


def model_in_front(args: argparse.Namespace, sub: argparse.ArgumentParser) -> None:
    """`sftune generate RUN_DIR` and `sftune eval RUN_DIR`: the model given in front, as export, report and push
    take their run, or with --model; not two different ones, and generate needs one."""
    front, flag = args.model_path, getattr(args, "model", None)
    if front is not None and flag is not None and front != flag:
        sub.error(f"two models: {front} in front and --model {flag}; give one")
    if front is not None:
        args.model = front
    elif flag is None and args.command == "generate":
        sub.error("which model? give it first (sftune generate runs/quickstart --prompt \"the film is\") or with "
                  "--model")


ONE_PROCESS = ("data", "generate", "tokenize", "report", "export", "push")  # (train and eval use every rank)
LAUNCHED = ("train", "eval")  # (`--nproc-per-node N` starts N ranks of these)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = check_flags(parser, argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.command in ONE_PROCESS and world_size > 1:  # under torchrun: one copy of the work, not one a rank
        if not is_main():
            return 0
        print(f"sftune {args.command}: one process's work: rank 0 does it, the other {world_size - 1} rank(s) exit "
              f"(torchrun spreads sftune train and sftune eval)", file=sys.stderr)
    try:
        if args.command in LAUNCHED and args.nproc_per_node is not None:  # this node's ranks started here (launch.py)
            from sftune.launch import launch, processes, without_flag

            if (n := processes(args.nproc_per_node)) > 1:
                return launch(args.command, without_flag(argv), n)
        COMMANDS[args.command](args)
    except SftuneError as e:
        if args.debug:
            raise
        who = "" if is_main() else f" [rank {env_rank()}]"  # under torchrun: rank 0 speaks, others only add
        distributed = sys.modules.get("torch.distributed")
        if who and e.every_rank:  # raised alike by every rank after they met: rank 0 says it
            return said_by_another_rank(e.exit_code)
        if who and os.environ.get("LOCAL_RANK", "0") != "0" and not (distributed and distributed.is_initialized()) \
                and not e.this_rank_only:  # a mistake found before the ranks met: the same on the node's first rank
            return said_by_another_rank(e.exit_code)
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


QUIET_RANK_WAIT_S = 10.0


def said_by_another_rank(code: int) -> int:
    """`code`, after a wait: this rank's error is said by another one, and torchrun ends every rank as soon as one
    exits with an error, so a quiet rank that exited first could have the speaking one killed before it spoke
    (seen on a loaded 2-core machine: torchrun's failure report and no word from sftune). Waiting, it is ended by
    torchrun once the speaking rank has said it and exited; the wait is bounded for a rank left alone."""
    time.sleep(QUIET_RANK_WAIT_S)
    return code


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
