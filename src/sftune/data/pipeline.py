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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sftune.data.cache import PIPELINE_VERSION, default_cache_dir, entry_path, read_entry, sources_fingerprint, \
    tokenizer_fingerprint, write_entry
from sftune.data.examples import Examples, SplitStats
from sftune.data.formats import ROW_COLUMN, Layout, detect_layout
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
    seed: int = 42
    cache_dir: str | Path | None = None
    stream_val_rows: int = 1000

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

    @property
    def text_column(self) -> str | None:
        return self.layout.columns.get("text")


def prepare_data(options: DataOptions, tokenizer) -> PreparedData:
    """Load, tokenize and filter `options.dataset`, or read the result from cache.

    The format (text, prompt_completion, chat, chat_prompt_completion) is `options.format`,
    or detected from the columns (renamed by `options.columns`). Chat data is rendered with
    the tokenizer's chat template (sftune's default when it has none). The cache key
    covers the data files (or the Hub dataset's fingerprint), the tokenizer, its chat
    template and every setting that changes the result.
    """
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
        "seed": o.seed,
        "dataset_config": o.dataset_config,
        "split": o.split,
    }
    source = sources_fingerprint(o.dataset, o.val_dataset)
    rows = None
    if source is None:  # a Hub dataset: its fingerprint is known only once loaded (from the datasets cache)
        rows = load_rows(o.dataset, o.seed, o.val_fraction, o.dataset_config, o.split, o.val_split, o.val_dataset)
        source = rows["train"]._fingerprint + rows["validation"]._fingerprint
    path = entry_path(cache_root, source, settings)
    cached = read_entry(path, len(tokenizer))
    if cached is not None:
        splits, stats, layout = cached
        if layout.format.startswith("chat"):
            chat_template_for(tokenizer)
        return PreparedData(splits["train"], splits["validation"], stats, layout, path, True,
                            time.perf_counter() - start, source)
    if rows is None:
        rows = load_rows(o.dataset, o.seed, o.val_fraction, o.dataset_config, o.split, o.val_split, o.val_dataset)
    layout = detect_layout(rows["train"].features, o.format, o.columns, o.text_column)
    missing = [c for c in layout.columns.values() if c not in rows["validation"].features]
    if missing:
        names = [c for c in rows["validation"].column_names if c != ROW_COLUMN]
        raise SftuneError(f"the validation split has no column {missing[0]!r} (columns: {', '.join(names)}); "
                          f"give both splits the same columns ({'--val-dataset' if o.val_dataset else '--dataset'})")
    template = load_chat_template(tokenizer) if layout.format.startswith("chat") else None
    if template is not None:
        check_end_of_turn(template)
    splits, stats = {}, {}
    for name in ("train", "validation"):
        splits[name], stats[name] = tokenize_split(rows[name], tokenizer, layout, o.encode, template,
                                                   source=getattr(rows, "sources", {}).get(name, name))
        if len(splits[name]) == 0:
            s = stats[name]
            raise SftuneError(
                f"no {name} example is left after filtering ({s.rows:,} rows; dropped: {s.dropped}). "
                f"Lower --min-tokens ({o.min_tokens}) or raise --max-length ({o.max_length}), or check the data's "
                f"format: {layout.describe()} (--format, --columns)."
            )
    warn_about(stats, layout, o.encode)
    write_entry(path, splits, stats, layout)
    return PreparedData(splits["train"], splits["validation"], stats, layout, path, False, time.perf_counter() - start,
                        source)
