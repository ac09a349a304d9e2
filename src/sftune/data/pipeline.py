"""The in-memory data pipeline: load rows -> detect the format -> tokenize -> filter -> cache.

Owns `DataOptions` (every setting that decides the prepared data, in one object) and
`prepare_data`, which returns a `PreparedData`: per split, every kept example as
`input_ids` plus a `supervised` mask, with the counts of what was kept and dropped and why.
It calls `sources`, `formats`, `tokenize` and `cache`; nothing in the package imports it.

    >>> opts = DataOptions("examples/quickstart/data", max_length=128)
    >>> (opts.encode.max_length, opts.encode.min_tokens)
    (128, 5)
"""

from __future__ import annotations

import time
import hashlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from sftune.data.cache import PIPELINE_VERSION, default_cache_dir, entry_path, read_entry, sources_fingerprint, \
    tokenizer_fingerprint, write_entry
from sftune.console import log
from sftune.data.examples import Examples, SplitStats, concat_examples, sum_stats, weighted_count, \
    weighted_selection
from sftune.data.formats import ROW_COLUMN, Layout, detect_layout, mixture_layout
from sftune.data.sources import load_rows
from sftune.data.tokenize import EncodeOptions, chat_template_for, check_end_of_turn, load_chat_template, \
    tokenize_split, warn_about
from sftune.errors import SftuneError


@dataclass(frozen=True)
class DataOptions:
    """What data to read and how rows become training examples (the data keys of `SFTConfig`)."""

    dataset: str  # Hub id, directory laid out like a Hub repo, or files (one, a comma-separated list, a glob)
    max_length: int  # longest example in tokens, EOS included
    dataset_config: str | None = None
    split: str = "train"
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    text_column: str | None = None
    min_tokens: int = 5
    overlong: str = "drop"
    truncation_side: str = "right"
    train_on_prompt: bool = False
    train_on_all_turns: bool = False
    val_fraction: float = 0.05
    val_split: str | None = None  # the split to validate on (else the dataset's validation split, else a hold-out)
    val_dataset: str | None = None  # a dataset to validate on instead (its val_split, validation split, or all)
    val_datasets: tuple[dict, ...] = ()  # several, each read as val_dataset is, under its entry's keys (its val
    # loss reported apart)
    seed: int = 42
    cache_dir: str | Path | None = None
    stream_val_rows: int = 1000
    workers: int | str = 1  # processes that tokenize a split (not in the cache key: the result is the same)
    mixture: tuple[dict, ...] = ()  # several datasets (`datasets`): each entry's keys replace the ones above
    only: str | None = None  # (a mixture's parts) "train": the training split whole, no validation; "validation":
    # the rows --val-dataset would give, no training split

    @property
    def encode(self) -> EncodeOptions:
        return EncodeOptions(self.max_length, self.min_tokens, self.overlong, self.truncation_side,
                             self.train_on_prompt, self.train_on_all_turns)


@dataclass
class PreparedData:
    train: Examples
    validation: Examples
    stats: dict[str, SplitStats]
    layout: Layout
    cache_path: Path | None
    from_cache: bool
    seconds: float  # wall time of prepare_data
    fingerprint: str | None = None  # the source data's identity (content of local files; the Hub's fingerprint)
    parts: list[tuple[str, PreparedData]] = field(default_factory=list)  # a mixture's datasets, each prepared alone
    weights: list[float] = field(default_factory=list)  # the parts' `weight`s (1: each example once an epoch)
    val_parts: list[tuple[str, PreparedData]] = field(default_factory=list)  # what `validation` is made of, in order

    @property
    def text_column(self) -> str | None:
        return self.layout.columns.get("text")

    def epoch_selection(self, epoch: int, seed: int) -> np.ndarray | None:
        """The training examples (indices, with repeats) the epoch takes when a mixture's datasets are weighted;
        None: each example once."""
        if all(w == 1 for w in self.weights):
            return None
        return weighted_selection([len(p.train) for _, p in self.parts], self.weights, seed, epoch)

    @property
    def validation_groups(self) -> list[tuple[str, int]]:
        return validation_groups(self.val_parts)

    @property
    def held_out(self) -> list[tuple[str, PreparedData]]:
        """The datasets validated on but not trained on (`val_dataset` or `val_datasets` with `datasets`)."""
        return [(name, part) for name, part in self.val_parts if not any(part is p for _, p in self.parts)]


MAX_EPOCH_EXAMPLES = 1 << 30  # (an epoch's plan holds an index for each: 8 GiB of them at this count)


def validation_groups(val_parts: list[tuple[str, object]]) -> list[tuple[str, int]]:
    """The datasets the validation is made of, as (name, validation examples) in its order: a mixture's, or
    `val_datasets`; empty when there is one. A name listed twice is numbered."""
    if len(val_parts) < 2:
        return []
    names = [n for n, _ in val_parts]
    return [(name if names.count(name) == 1 else f"{name} ({i + 1})", len(part.validation))
            for i, (name, part) in enumerate(val_parts)]


def held_out_datasets(options: DataOptions, make: Callable[[DataOptions], object]) -> list[tuple[str, object]]:
    """(name, `make(its options)`) for each dataset to validate on (`val_datasets`, or `val_dataset`): read as a
    dataset of its own, under its entry's keys (the top-level ones by default), for its validation alone."""
    entries = list(options.val_datasets) or ([{"dataset": options.val_dataset}] if options.val_dataset else [])
    held = []
    for i, entry in enumerate(entries):
        try:
            held.append((entry["dataset"], make(replace(options, mixture=(), val_dataset=None, val_datasets=(),
                                                        only="validation", **entry))))
        except SftuneError as e:
            raise SftuneError(f"val_datasets entry {i} ({entry['dataset']}): {e}" if options.val_datasets else
                              str(e)) from None
    return held


def prepare_data(options: DataOptions, tokenizer) -> PreparedData:
    """Load, tokenize and filter `options.dataset`, or read the result from cache.

    The format (text, prompt_completion, chat, chat_prompt_completion) is `options.format`,
    or detected from the columns (renamed by `options.columns`). Chat data is rendered with
    the tokenizer's chat template (sftune's default when it has none). The cache key
    covers the data files (or the Hub dataset's fingerprint), the tokenizer, its chat
    template and every setting that changes the result.
    """
    if options.mixture or options.val_datasets:
        return prepare_mixture(options, tokenizer)
    start = time.perf_counter()
    o = options
    cache_root = Path(o.cache_dir).expanduser() if o.cache_dir else default_cache_dir()
    settings = {
        "version": PIPELINE_VERSION,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, (str, dict)) else None,
        "text_column": o.text_column,
        "format": o.format,
        "columns": o.columns,
        "options": asdict(o.encode),
        "val_fraction": o.val_fraction,
        **({"val_split": o.val_split} if o.val_split else {}),  # (cache keys written before these stay valid)
        **({"val_dataset": o.val_dataset} if o.val_dataset else {}),
        **({"only": o.only} if o.only else {}),
        "seed": o.seed,
        "dataset_config": o.dataset_config,
        "split": o.split,
    }
    source = sources_fingerprint(o.dataset, o.val_dataset)
    rows = None
    if source is None:  # a Hub dataset: its fingerprint is known only once loaded (from the datasets cache)
        rows = load_rows(o.dataset, o.seed, o.val_fraction, o.dataset_config, o.split, o.val_split, o.val_dataset, o.only)
        source = rows["train"]._fingerprint + rows["validation"]._fingerprint
    path = entry_path(cache_root, source, settings)
    cached = read_entry(path, len(tokenizer))
    if cached is not None:
        splits, stats, layout = cached
        if layout.is_chat:
            chat_template_for(tokenizer)
        return PreparedData(splits["train"], splits["validation"], stats, layout, path, True,
                            time.perf_counter() - start, source)
    if rows is None:
        rows = load_rows(o.dataset, o.seed, o.val_fraction, o.dataset_config, o.split, o.val_split, o.val_dataset, o.only)
    layout = detect_layout(rows["validation" if o.only == "validation" else "train"].features, o.format, o.columns,
                           o.text_column)
    missing = [c for c in layout.columns.values() if c not in rows["validation"].features]
    if missing:
        names = [c for c in rows["validation"].column_names if c != ROW_COLUMN]
        raise SftuneError(f"the validation split has no column {missing[0]!r} (columns: {', '.join(names)}); "
                          f"give both splits the same columns ({'--val-dataset' if o.val_dataset else '--dataset'})")
    template = load_chat_template(tokenizer) if layout.is_chat else None
    if template is not None:
        check_end_of_turn(template)
    splits, stats = {}, {}
    for name in ("train", "validation"):
        if o.only not in (None, name):  # (a mixture's part: the split it does not give)
            splits[name], stats[name] = Examples.from_lists([]), SplitStats()
            continue
        splits[name], stats[name] = tokenize_split(rows[name], tokenizer, layout, o.encode, template,
                                                   source=getattr(rows, "sources", {}).get(name, name),
                                                   workers=o.workers)
        if len(splits[name]) == 0:
            s = stats[name]
            fixes = {"overlong": f"raise --max-length ({o.max_length}) or keep them, cut, with --overlong truncate",
                     "too_short": f"lower --min-tokens ({o.min_tokens})"}
            first = [fixes[k] for k, n in sorted(s.dropped.items(), key=lambda kv: -kv[1]) if n and k in fixes]
            raise SftuneError(
                f"no {name} example is left after filtering ({s.rows:,} rows; dropped: {s.dropped}). "
                f"{'; '.join(first).capitalize() + ', or c' if first else 'C'}heck the data's format: "
                f"{layout.describe()} (--format, --columns)."
            )
    warn_about(stats, layout, o.encode)
    write_entry(path, splits, stats, layout)
    return PreparedData(splits["train"], splits["validation"], stats, layout, path, False, time.perf_counter() - start,
                        source)


def mixture_entries(options: DataOptions, make: Callable[[DataOptions], object]) -> Iterator[tuple]:
    """(index, dataset, weight, `make(its options)`) for each of a mixture's datasets (or the one `dataset`), made as
    if alone (with datasets to validate on: its training split whole); an error in one names it."""
    only = "train" if options.val_dataset or options.val_datasets else None
    for i, entry in enumerate(options.mixture or ({"dataset": options.dataset},)):
        keys = {k: v for k, v in entry.items() if k != "weight"}
        try:
            part = make(replace(options, mixture=(), val_dataset=None, val_datasets=(), only=only, **keys))
        except SftuneError as e:
            raise SftuneError(f"datasets entry {i} ({entry['dataset']}): {e}") from None
        yield i, entry["dataset"], entry.get("weight", 1.0), part


def prepare_mixture(options: DataOptions, tokenizer) -> PreparedData:
    """Several datasets trained together (`options.mixture`), or validated on (`val_datasets`): each prepared (read,
    formatted, held out, cached) as `prepare_data` prepares one, under its entry's keys; then their examples
    concatenated, split by split. With `val_dataset` or `val_datasets`, the training splits are used whole and the
    validation is those datasets, each read alone with the top-level format and columns (the entries may differ
    from it and from each other)."""
    start = time.perf_counter()
    parts, weights = [], []
    for i, name, weight, part in mixture_entries(options, lambda entry: prepare_data(entry, tokenizer)):
        weighted = (f" (weight {weight:g}: {weighted_count(len(part.train), weight):,} an epoch)"
                    if weight != 1 else "")
        log(f"data: {i + 1}/{len(options.mixture) or 1} {name}: {len(part.train):,} train{weighted} / "
            f"{len(part.validation):,} validation examples, format {part.layout.describe()} "
            f"({'from cache' if part.from_cache else 'tokenized'} in {part.seconds:.1f}s)")
        parts.append((name, part))
        weights.append(weight)
    epoch = sum(weighted_count(len(p.train), w) for (_, p), w in zip(parts, weights))
    if epoch > MAX_EPOCH_EXAMPLES:  # (an epoch's examples are planned as one array of indices)
        (name, part), weight = max(zip(parts, weights), key=lambda pw: pw[1])
        raise SftuneError(f"the datasets' weights make an epoch of {epoch:,} examples ({name}: weight {weight:g} x "
                          f"{len(part.train):,}); an epoch is planned whole, so at most {MAX_EPOCH_EXAMPLES:,}: lower "
                          f"the weight (`weight` in its `datasets` entry), and stop within an epoch with --max-steps")
    held = held_out_datasets(options, lambda entry: prepare_data(entry, tokenizer))
    for name, part in held:
        log(f"data: validating on {name}: {len(part.validation):,} examples, format {part.layout.describe()}")
    val_parts = held or parts
    train = concat_examples([p.train for _, p in parts])
    validation = concat_examples([p.validation for _, p in val_parts])
    stats = {"train": sum_stats([p.stats["train"] for _, p in parts], train.lengths),
             "validation": sum_stats([p.stats["validation"] for _, p in val_parts], validation.lengths)}
    fingerprint = hashlib.sha256("|".join(f"{name}={p.fingerprint}" for name, p in parts).encode() + b"".join(
        f"|validation={p.fingerprint}".encode() for _, p in held)).hexdigest()
    return PreparedData(train, validation, stats, mixture_layout([p.layout for _, p in parts]), None,
                        all(p.from_cache for _, p in parts), time.perf_counter() - start, fingerprint, parts, weights,
                        val_parts)
