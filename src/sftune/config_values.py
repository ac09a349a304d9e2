"""A config key's value read and checked: coerced to the key's type (flags give text, YAML its own types), the
`datasets` entries and `model_config_overrides` parsed, and the ranges checked across keys, each problem naming
the key and its fix. `config.resolve_config` collects them all and raises once.

    >>> coerce("lr", "5e-5"), coerce("warmup_ratio", "null")
    (5e-05, None)
"""

from __future__ import annotations

import difflib
import math
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from sftune.config import COMPILE_MODES, MIXTURE_KEYS, VAL_KEYS, SFTConfig, profile_range, template_on_the_hub
from sftune.errors import SftuneError

_HINTS = typing.get_type_hints(SFTConfig)


def field_type(name: str) -> tuple[Any, bool]:
    """(base type, optional) of a config field: `int | None` -> (int, True); `int | Literal["auto"]` -> (int,
    False), its words read by `words`."""
    hint = _HINTS[name]
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        base = [a for a in args if a is not type(None) and typing.get_origin(a) is not Literal]
        return base[0], type(None) in args
    return hint, False


def words(name: str) -> tuple[str, ...]:
    """The words a number field also takes: `int | Literal["auto"]` -> ("auto",)."""
    return tuple(w for a in typing.get_args(_HINTS[name]) if typing.get_origin(a) is Literal
                 for w in typing.get_args(a))


def or_words(name: str) -> str:
    """" or 'auto'" for a field that also takes the word auto (`words`), else ""."""
    return "".join(f" or {w!r}" for w in words(name))


def describe_type(name: str) -> str:
    base, optional = field_type(name)
    if typing.get_origin(base) is Literal:
        text = " | ".join(repr(c) for c in typing.get_args(base))
    elif name in ("datasets", "val_datasets"):
        text = "list of datasets or mappings"
    elif typing.get_origin(base) is list:
        text = "list of strings"
    elif name == "model_config_overrides":
        text = "mapping (KEY=VALUE,...)"
    elif typing.get_origin(base) is dict:
        text = "mapping (PART=COLUMN,...)"
    else:
        text = base.__name__
    return text + or_words(name) + (" or null" if optional else "")


_REPR = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 80, 80


def short(value: Any) -> str:
    """A value as an error message may show it: bounded, however large or deeply nested (a YAML alias bomb
    expands to billions of items when formatted in full)."""
    return _REPR.repr(value)


def _scalar(text: str) -> Any:
    """A flag's value as YAML reads it, and 1e-5 as a number (YAML 1.1 reads it as text)."""
    value = yaml.safe_load(text) if text else ""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_overrides(value: Any) -> dict[str, Any]:
    """`"attn_pdrop=0,use_cache=false"` (or a YAML mapping) -> {"attn_pdrop": 0, "use_cache": False}: each value
    read as YAML, and only plain values (a number, true/false, null, text).

    >>> parse_overrides("attn_pdrop=0, resid_pdrop=0.05")
    {'attn_pdrop': 0, 'resid_pdrop': 0.05}
    """
    if not value:
        return {}
    if isinstance(value, str):
        pairs = [pair.partition("=") for pair in value.split(",") if pair.strip()]
        if bad := [k for k, eq, _ in pairs if not eq or not k.strip()]:
            raise ValueError(f"must be KEY=VALUE pairs separated by commas, e.g. attn_pdrop=0, got {short(bad[0])}")
        value = {k.strip(): _scalar(v.strip()) for k, _, v in pairs}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"must be a mapping of config key to value, e.g. attn_pdrop=0, got {short(value)}")
    for key, v in value.items():
        if v is not None and not isinstance(v, (bool, int, float, str)):
            raise ValueError(f"{key}: must be a number, true/false, null or text, got {short(v)}")
    return dict(value)


def parse_mixture(value: Any, allowed: tuple[str, ...] = MIXTURE_KEYS) -> list[dict[str, Any]]:
    """`datasets`: each entry a dataset (text) or a mapping of `dataset` and other MIXTURE_KEYS; a flag's entry
    written as a YAML mapping ("{dataset: b.jsonl, format: chat}") is read as one. Each value checked as the
    top-level key of that name checks it.

    >>> parse_mixture(["a.jsonl", "{dataset: b.jsonl, format: chat}"])
    [{'dataset': 'a.jsonl'}, {'dataset': 'b.jsonl', 'format': 'chat'}]
    """
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"must be a list of datasets or mappings, e.g. [a.jsonl, {{dataset: b.jsonl, format: chat}}], "
                         f"got {short(value)}")
    entries = []
    for i, entry in enumerate(value):
        if isinstance(entry, str) and entry.lstrip().startswith("{"):
            try:
                entry = yaml.safe_load(entry)
            except yaml.YAMLError as e:
                raise ValueError(f"entry {i}: not a YAML mapping ({short(entry)}): {str(e).splitlines()[0]}") from None
        if isinstance(entry, str):
            entry = {"dataset": entry}
        if not isinstance(entry, dict):
            raise ValueError(f"entry {i}: must be a dataset or a mapping with `dataset`, got {short(entry)}")
        unknown = [k for k in entry if k not in allowed]
        if unknown:
            name = short(str(unknown[0]))[1:-1]
            if ":" in name:  # {dataset:b.jsonl}: YAML reads a colon without a space after it as part of a key
                key, _, value = name.partition(":")
                raise ValueError(f"entry {i}: unknown key `{name}`: YAML needs a space after each colon, e.g. "
                                 f"{{{key}: {value}}}")
            close = ["dataset"] if name in ("path", "name") else difflib.get_close_matches(name, allowed, n=1)
            raise ValueError(f"entry {i}: unknown key `{name}`{f' (did you mean `{close[0]}`?)' if close else ''}; "
                             f"an entry may set {', '.join(allowed)}")
        if not isinstance(entry.get("dataset"), str) or not entry["dataset"].strip():
            raise ValueError(f"entry {i}: names no `dataset`, e.g. {{dataset: data/b.jsonl}}, got {short(entry)}")
        checked = {}
        for key, v in entry.items():
            try:
                checked[key] = mixture_weight(v) if key == "weight" else coerce(key, v)
            except ValueError as e:
                raise ValueError(f"entry {i} ({entry['dataset']}): `{key}` {e}") from None
        entries.append(checked)
    return entries


def mixture_weight(value: Any) -> float:
    """A `datasets` entry's `weight`: a positive number (YAML may give it as text).

    >>> mixture_weight("0.5"), mixture_weight(2)
    (0.5, 2.0)
    """
    try:
        weight = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        weight = math.nan
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"must be a positive number (2: its examples twice an epoch, 0.5: half of them), "
                         f"got {short(value)}")
    return weight


def is_number(value: Any) -> bool:
    """A text that reads as a number (a split name that is a fraction by mistake)."""
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def coerce(name: str, value: Any) -> Any:
    """Check (and gently convert) one value for field `name`; raise ValueError with the reason.

    Strings are accepted for numbers because YAML reads `5e-5` as a string and
    CLI flags are strings; "null"/"none" give None for optional fields.
    """
    base, optional = field_type(name)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("null", "none")):
        if optional:
            return None
        raise ValueError(f"must be {describe_type(name)}, got null")
    if value in words(name):
        return value
    if typing.get_origin(base) is Literal:
        if value not in typing.get_args(base):
            raise ValueError(f"must be one of {describe_type(name)}, got {short(value)}")
        return value
    if name in ("datasets", "val_datasets"):
        return parse_mixture(value, MIXTURE_KEYS if name == "datasets" else VAL_KEYS)
    if typing.get_origin(base) is list:
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"must be a list of strings, got {short(value)}")
        return list(value)
    if name == "model_config_overrides":
        return parse_overrides(value)
    if typing.get_origin(base) is dict:
        from sftune.data.formats import parse_columns

        if not isinstance(value, (str, dict)) or (isinstance(value, dict) and not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
            raise ValueError(f"must be a mapping of part to column name, e.g. prompt=instruction, got {short(value)}")
        try:
            return parse_columns(value)
        except SftuneError as e:
            raise ValueError(str(e).removeprefix("columns: ")) from None
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"must be true or false{or_words(name)}, got {short(value)}")
    numbers = {int: ("an integer", (int, str)), float: ("a number", (int, float, str))}
    if base in numbers:
        what, accepted = numbers[base]
        what += or_words(name)
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise ValueError(f"must be {what}, got {short(value)}")
        try:
            return base(value)
        except ValueError:
            raise ValueError(f"must be {what}, got {short(value)}") from None
    if base is str:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {short(value)}")
        return value
    raise AssertionError(f"unhandled config type for {name}: {base}")


def range_checks(cfg: SFTConfig, training: bool = True) -> list[str]:
    """Range checks across fields; each problem names the key and the fix."""
    problems = []

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            problems.append(f"{key} = {short(getattr(cfg, key))}: {msg} (set `{key}` in YAML or --{key.replace('_', '-')})")

    need(cfg.epochs >= 1, "epochs", "must be at least 1")
    need(0 <= cfg.seed < 2**64, "seed", "must be from 0 to 2**64 - 1 (torch's and numpy's seeds are unsigned 64-bit)")
    need(cfg.max_steps is None or cfg.max_steps >= 1, "max_steps", "must be at least 1, or null for no limit")
    need(cfg.batch_size >= 1, "batch_size", "must be at least 1")
    need(cfg.grad_accum >= 1, "grad_accum", "must be at least 1")
    need(cfg.compile_mode in COMPILE_MODES, "compile_mode",
         f"must be one of {', '.join(m for m in COMPILE_MODES if m)}, or null for torch.compile's default")
    need(not (cfg.compile_blocks is True and cfg.compile == "torch"), "compile_blocks",
         "with --compile torch the whole step is compiled already; use --compile graphs (or off) with "
         "--compile-blocks, or leave --compile-blocks out")
    need(cfg.pad_to_multiple_of is None or cfg.pad_to_multiple_of >= 1, "pad_to_multiple_of",
         "must be at least 1 (1: no rounding), or null for the default")
    need(cfg.batch_tokens is None or cfg.batch_tokens >= 2, "batch_tokens", "must be at least 2, or null for no cap")
    need(math.isfinite(cfg.lr) and cfg.lr > 0, "lr", "must be a positive, finite number, e.g. 5e-5")
    need(math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0, "weight_decay", "must be 0 or more, and finite")
    need(cfg.warmup_steps >= 0, "warmup_steps", "must be 0 or more")
    need(cfg.warmup_ratio is None or 0 <= cfg.warmup_ratio < 1, "warmup_ratio", "must be at least 0 and below 1, "
         "e.g. 0.03, or null")
    need(cfg.warmup_ratio is None or cfg.warmup_steps == 0, "warmup_ratio", "is set with warmup_steps "
         f"{cfg.warmup_steps}: set one of them (warmup_steps 0, --warmup-steps 0, to warm up by the ratio)")
    need(0 <= cfg.min_lr_ratio < 1, "min_lr_ratio", "must be at least 0 and below 1, e.g. 0.1")
    need(cfg.min_lr_ratio == 0 or cfg.lr_schedule != "constant", "min_lr_ratio", f"is {cfg.min_lr_ratio:g}, but "
         "lr_schedule constant does not decay; choose --lr-schedule linear, cosine or wsd, or leave min_lr_ratio 0")
    need(0 < cfg.decay_ratio <= 1, "decay_ratio", "must be above 0 and at most 1, e.g. 0.1 (the last tenth of the run)")
    for key in ("adam_beta1", "adam_beta2"):
        need(0 <= getattr(cfg, key) < 1, key, "must be at least 0 and below 1")
    need(cfg.optimizer != "adafactor" or cfg.strategy != "fsdp", "optimizer", "adafactor does not run on FSDP's "
         "sharded parameters (torch's Adafactor reduces each whole matrix to a row and a column: an in-place "
         "operation on a shard fails); use --strategy ddp, or --optimizer adamw with FSDP")
    for key in ("adam_beta1", "adam_beta2", "adam_epsilon"):
        need(cfg.optimizer == "adamw" or getattr(cfg, key) == getattr(SFTConfig, key), key,
             f"is an AdamW setting, but optimizer is {cfg.optimizer}; leave it out, or use --optimizer adamw")
    need(math.isfinite(cfg.adam_epsilon) and cfg.adam_epsilon > 0, "adam_epsilon", "must be a positive number, e.g. "
         "1e-8")
    need(cfg.max_grad_norm is None or cfg.max_grad_norm >= 0, "max_grad_norm", "must be 0 or more (0/null: no clipping)")
    need(cfg.neftune_alpha is None or (math.isfinite(cfg.neftune_alpha) and cfg.neftune_alpha > 0), "neftune_alpha",
         "must be a positive number (5 is usual), or null for no noise")
    need(0 < cfg.val_fraction < 1, "val_fraction", "must be between 0 and 1, e.g. 0.05")
    need(cfg.val_split is None or (bool(cfg.val_split) and (cfg.val_split != cfg.split or cfg.val_dataset
                                                             or cfg.val_datasets)), "val_split",
         f"must name another split than the training split ({cfg.split!r}), or null for the default")
    need(not is_number(cfg.val_split), "val_split", f"names a split (e.g. test), not a fraction; to hold out "
         f"{cfg.val_split} of the training split, set val_fraction {cfg.val_split} (--val-fraction) instead")
    need(cfg.min_tokens >= 0, "min_tokens", "must be 0 or more")
    need(cfg.max_length is None or cfg.max_length >= 2, "max_length", "must be at least 2 tokens, or null for the model's context")
    need(cfg.eval_every is None or cfg.eval_every >= 1, "eval_every", "must be at least 1, or null")
    need(cfg.eval_batch_size is None or cfg.eval_batch_size >= 1, "eval_batch_size", "must be at least 1, or null")
    need(cfg.log_every >= 1, "log_every", "must be at least 1")
    need(cfg.profile_steps is None or profile_range(cfg.profile_steps) is not None, "profile_steps",
         "must be two step numbers A-B with 1 <= A <= B, e.g. 20-30 (the steps to profile), or null")
    need(cfg.save_every is None or cfg.save_every >= 1, "save_every", "must be at least 1, or null for no checkpoints")
    need(cfg.save_minutes is None or cfg.save_minutes > 0, "save_minutes",
         "must be above 0 (minutes), or null for no checkpoints by time")
    need(cfg.keep_last >= 1, "keep_last", "must be at least 1")
    need(1 <= cfg.dist_timeout <= 10**9, "dist_timeout", "must be from 1 second (1800: 30 minutes) to 10**9 (31 years)")
    need(cfg.max_bad_steps >= 0, "max_bad_steps", "must be 0 or more")
    need(cfg.sample_max_new_tokens >= 1, "sample_max_new_tokens", "must be at least 1")
    need(all(isinstance(p, str) and p.strip() for p in cfg.sample_prompts or []), "sample_prompts",
         "must be non-empty texts; for none, use [] in YAML or --sample-prompts \"\"")
    need(bool(cfg.model), "model", "must name a Hub id or a local directory")
    need(all(isinstance(t, str) and t.strip() == t and t for t in cfg.add_tokens), "add_tokens",
         "must be non-empty tokens without leading or trailing spaces, e.g. <|im_start|> <|im_end|>")
    need(len(set(cfg.add_tokens)) == len(cfg.add_tokens), "add_tokens", "names a token twice; list each once")
    need(cfg.pad_token is None or (cfg.pad_token.strip() == cfg.pad_token and bool(cfg.pad_token)), "pad_token",
         "must be a non-empty token without leading or trailing spaces, e.g. <|pad|>, or null for the default")
    need(bool(cfg.dataset), "dataset", "must name a Hub id, a directory or a file")
    for key in ("split", "val_split"):
        need(not cfg.streaming or "[" not in (getattr(cfg, key) or ""), key, "is a slice, which needs the data in "
             "memory: a stream is read from its start (drop --streaming, or give a whole split)")
    for i, entry in enumerate(cfg.datasets):
        for key in ("split", "val_split"):
            need(not cfg.streaming or "[" not in (entry.get(key) or ""), "datasets", f"entry {i} ({entry['dataset']}) "
                 f"has a slice as its {key}, which needs the data in memory: a stream is read from its start (drop "
                 f"--streaming, or give a whole split)")
        split, val_split = entry.get("split", cfg.split), entry.get("val_split", cfg.val_split)
        need(val_split is None or val_split != split or bool(cfg.val_dataset or cfg.val_datasets), "datasets",
             f"entry {i} ({entry['dataset']}) validates on its training split {split!r}: name another val_split")
    need(cfg.val_dataset is None or bool(cfg.val_dataset.strip()), "val_dataset",
         "must name a Hub id, a directory or a file, or null to validate on a split of dataset")
    need(not training or not cfg.streaming or cfg.max_steps is not None, "max_steps",
         "must be set with streaming: a stream's length is unknown up front, and so is the schedule's end")
    need(cfg.lora_r is None or cfg.lora_r >= 1, "lora_r", "must be at least 1 (8-64 is usual), or null for full "
         "fine-tuning")
    need(cfg.lora_alpha is None or (math.isfinite(cfg.lora_alpha) and cfg.lora_alpha > 0), "lora_alpha",
         "must be a positive number, or null for 2 x lora_r")
    need(0 <= cfg.lora_dropout < 1, "lora_dropout", "must be at least 0 and below 1")
    need(bool(cfg.lora_targets), "lora_targets", "must name at least one module, or all-linear")
    need(cfg.loraplus_lr_ratio is None or (math.isfinite(cfg.loraplus_lr_ratio) and cfg.loraplus_lr_ratio > 0),
         "loraplus_lr_ratio", "must be a positive number (16 is usual), or null")
    need(cfg.loraplus_lr_ratio is None or cfg.lora_r is not None, "loraplus_lr_ratio",
         "is a LoRA option, but LoRA is off (set --lora-r)")
    default = SFTConfig()
    for key in ("lora_alpha", "lora_dropout", "lora_targets", "lora_modules_to_save", "lora_use_dora",
                "lora_use_rslora", "lora_base_dtype"):  # (set without --lora-r, they would leave a full fine-tune running unnoticed)
        need(getattr(cfg, key) == getattr(default, key) or cfg.lora_r is not None, key,
             "is a LoRA option, but LoRA is off (set --lora-r)")
    need(not cfg.merge or cfg.lora_r is not None, "merge", "merges a LoRA adapter into its base, but LoRA is off "
         "(set --lora-r); a full fine-tune's output is already a full model")
    need(cfg.early_stopping_patience is None or cfg.early_stopping_patience >= 1, "early_stopping_patience",
         "must be at least 1 evaluation, or null for no early stopping")
    need(math.isfinite(cfg.early_stopping_min_delta) and cfg.early_stopping_min_delta >= 0,
         "early_stopping_min_delta", "must be 0 or more")
    need(cfg.final_model == "last" or cfg.save_best, "final_model", "best needs the best checkpoint: set --save-best")
    need(cfg.stream_val_rows >= 1, "stream_val_rows", "must be at least 1")
    need(cfg.data_workers == "auto" or cfg.data_workers >= 1, "data_workers",
         "must be at least 1 (1: tokenize in this process), or auto")
    need(cfg.chat_template is None or Path(cfg.chat_template).expanduser().exists()
         or template_on_the_hub(cfg.chat_template),
         "chat_template", "no such file; give a Jinja template file, or a model (directory or Hub id) whose "
         "tokenizer has the template")
    return problems
