"""The data pipeline: load rows -> pick the text -> tokenize -> filter -> cache.

Each step is a small function you can call alone. The result of a run is a
`PreparedData`: per split, every kept example as `input_ids` plus a
`supervised` mask (1 where the token is trained on), stored flat in numpy
arrays, with the counts of what was kept and dropped and why.

    >>> encode_text([464, 3797, 3332, 319, 262, 2603], eos_id=50256, min_tokens=5, max_length=16, overlong="drop")
    ([464, 3797, 3332, 319, 262, 2603, 50256], 'kept')
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sftune.console import log
from sftune.errors import SftuneError
from sftune.formats import DEFAULT_CHAT_TEMPLATE, ROW_COLUMN, ChatTemplate, Layout, detect_layout, row_segments
from sftune.hub import from_hub_or_cache

PIPELINE_VERSION = 4  # bump when tokenization or filtering changes, to invalidate caches
MAP_BATCH_SIZE = 512  # rows per tokenizer call in datasets.map, as in the seed
FILE_BUILDERS = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    # CSV cells stay text as written (" 4" is not the number 4; an empty cell is "", not NaN): see _csv_as_text
    ".csv": ("csv", {"keep_default_na": False}),
    ".tsv": ("csv", {"delimiter": "\t", "keep_default_na": False}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),
}
VALIDATION_NAMES = ("validation", "valid", "val", "dev")
DROP_REASONS = ("empty", "too_short", "overlong", "no_targets")


# --- one example --------------------------------------------------------------


def encode_example(
    parts: list[list[int]],
    trained: list[bool],
    eos_id: int | None,
    min_tokens: int,
    max_length: int,
    overlong: str,
    truncation_side: str = "right",
    prefix: list[int] | tuple[int, ...] = (),
) -> tuple[list[int], list[bool], str]:
    """Join one example's tokenized parts, mark the trained tokens, and decide its fate.

    `parts` are the token ids of each segment (tokenized separately, so the boundaries are
    exact), `trained` says which segments are trained on. `prefix` (e.g. BOS) goes first,
    untrained. With `eos_id`, EOS is appended unless the last part already ends with it,
    trained like the last part. `min_tokens` is compared with the parts' tokens, like the
    seed's `len(input_ids) > 5`. If the example is longer than `max_length`, "truncate"
    cuts from `truncation_side` ("right" loses the end, EOS included: none is added back;
    "left" loses the start after the prefix), "drop" and "error" report it as overlong.
    Returns (input_ids, supervised mask, status) with status in
    kept | truncated | empty | too_short | overlong.

    >>> encode_example([[5, 6, 7], [8, 9]], [False, True], eos_id=0, min_tokens=0, max_length=16, overlong="drop")
    ([5, 6, 7, 8, 9, 0], [False, False, False, True, True, True], 'kept')
    >>> encode_example([[5, 6, 7], [8, 9]], [False, True], eos_id=0, min_tokens=0, max_length=4, overlong="truncate")
    ([5, 6, 7, 8], [False, False, False, True], 'truncated')
    >>> encode_example([[5, 6, 7], [8, 9]], [False, True], eos_id=0, min_tokens=0, max_length=4, overlong="truncate",
    ...                truncation_side="left")
    ([7, 8, 9, 0], [False, True, True, True], 'truncated')
    """
    ids = [t for p in parts for t in p]
    if not ids:
        return [], [], "empty"
    if len(ids) <= min_tokens:
        return [], [], "too_short"
    mask = [flag for p, flag in zip(parts, trained) for _ in p]
    if eos_id is not None and ids[-1] != eos_id:
        ids.append(eos_id)
        mask.append(trained[-1])
    room = max_length - len(prefix)
    status = "kept"
    if len(ids) > room:
        if overlong != "truncate":
            return [], [], "overlong"
        cut = slice(None, room) if truncation_side == "right" else slice(len(ids) - room, None)
        ids, mask, status = ids[cut], mask[cut], "truncated"
    return [*prefix, *ids], [False] * len(prefix) + mask, status


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text by itself (a BOS for Llama-style tokenizers; none for GPT-2)."""
    with_specials = tokenizer("a")["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    if not bare or bare[0] not in with_specials:
        return []
    return list(with_specials[: with_specials.index(bare[0])])


# --- loading rows ---------------------------------------------------------------


def local_files(dataset: str) -> list[Path] | None:
    """The files `dataset` names: one file, a comma-separated list, or a glob; None when it
    names no file (a directory or a Hub id)."""
    import glob

    names = [n.strip() for n in dataset.split(",") if n.strip()]
    if len(names) == 1 and not glob.has_magic(names[0]):
        path = Path(names[0]).expanduser()
        return [path] if path.is_file() else None
    files: list[Path] = []
    for name in names:
        matches = sorted(glob.glob(str(Path(name).expanduser()), recursive=True)) if glob.has_magic(name) else [name]
        if not matches:
            raise SftuneError(f"no file matches {name!r} (--dataset)")
        for m in matches:
            if not Path(m).is_file():
                raise SftuneError(f"{m} is not a file (--dataset: give files, a glob, a directory or a Hub id)")
            files.append(Path(m))
    return files


def load_rows(dataset: str, seed: int, val_fraction: float, config_name: str | None = None, split: str = "train"):
    """Load a dataset as a DatasetDict with 'train' and 'validation' splits.

    `dataset` is a file, several (comma-separated or a glob), a directory laid out
    like a Hub repo, or a Hub id (with `config_name`). Train is its `split`;
    validation is its own split when it has one (validation, valid, val or dev),
    else `val_fraction` of train held out with `seed`. Every row carries its number
    in the source split (column `__row__`) so errors can point at it.
    """
    import datasets

    files = local_files(dataset)
    path = Path(dataset).expanduser()
    if files is not None:
        builder, kwargs = file_loader(files)
        try:
            ds = datasets.load_dataset(builder, data_files={"train": [str(f) for f in files]}, **kwargs)
        except Exception as e:  # datasets wraps parse errors in its own types: find the bad line ourselves
            bad = next((m for f in files for m in [diagnose_file(f)] if m), None)
            raise SftuneError(bad or f"could not read {dataset}: {_root_cause(e)} (check --dataset)") from None
        if builder == "csv":
            ds = datasets.DatasetDict({k: _integer_columns(v) for k, v in ds.items()})
        split = "train"
    elif path.is_dir():
        try:
            ds = datasets.load_dataset(str(path), config_name)
        except Exception as e:
            bad = next((m for f in sorted(path.rglob("*")) if f.is_file() and f.suffix in FILE_BUILDERS
                        for m in [diagnose_file(f)] if m), None)
            raise SftuneError(bad or f"could not read a dataset from directory {dataset}: {_root_cause(e)} "
                              f"(check --dataset, --dataset-config)") from None
    else:
        ds = from_hub_or_cache(dataset, "dataset", "--dataset",
                               lambda local_files_only: _load_hub(dataset, config_name, local_files_only))
    if split not in ds:
        raise SftuneError(f"dataset {dataset} has no {split!r} split (it has: {', '.join(ds)}); set --split")
    numbered = {name: ds[name].add_column(ROW_COLUMN, np.arange(len(ds[name]))) for name in ds}
    val_name = next((n for n in VALIDATION_NAMES if n in ds and n != split), None)
    if val_name is not None:
        result = datasets.DatasetDict(train=numbered[split], validation=numbered[val_name])
        result.sources = {"train": split, "validation": val_name}
        return result
    if len(ds[split]) < 2:
        raise SftuneError(f"dataset {dataset} has {len(ds[split])} row(s): too few to hold out a validation set")
    held = numbered[split].train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
    log(f"data: no validation split in {dataset}; holding out {len(held['test']):,} of "
        f"{len(ds[split]):,} {split} rows (val_fraction {val_fraction}, seed {seed})")
    result = datasets.DatasetDict(train=held["train"], validation=held["test"])
    result.sources = {"train": split, "validation": split}  # held-out rows keep their numbers in `split`
    return result


def file_loader(files: list[Path]) -> tuple[str, dict]:
    """The `datasets` builder and its arguments for these data files (all of one type)."""
    builders = {(b, tuple(kw.items())) for b, kw in map(_builder_for, files)}
    if len(builders) > 1:
        raise SftuneError(f"--dataset mixes file types ({', '.join(sorted({f.suffix for f in files}))}); "
                          f"give files of one type")
    builder, kwargs = builders.pop()
    kwargs = dict(kwargs)
    if builder == "csv":
        kwargs["features"] = _csv_as_text(files[0], kwargs.get("delimiter", ","))
    return builder, kwargs


def _csv_as_text(path: Path, delimiter: str):
    """Features reading every column of a CSV file as text (pandas would turn " 4" into 4)."""
    import csv

    import datasets

    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f, delimiter=delimiter), [])
    except (OSError, UnicodeDecodeError):
        return None  # load_dataset fails next, and diagnose_file names the problem
    return datasets.Features({name: datasets.Value("string") for name in header}) if header else None


INTEGER = re.compile(r"0|-?[1-9][0-9]{0,17}")


def _integer_columns(rows):
    """CSV columns whose every cell is an integer written plainly ("3", not " 3" or "03") become
    int64, like pandas would make them; they turn back into exactly the same text."""
    import datasets

    for name, feature in rows.features.items():
        if getattr(feature, "dtype", None) == "string" and len(rows) and all(
                v is not None and INTEGER.fullmatch(v) for v in rows[name]):
            rows = rows.cast_column(name, datasets.Value("int64"))
    return rows


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def diagnose_file(path: Path) -> str | None:
    """Name the first problem in a text data file (not UTF-8, malformed JSON line, no rows), with its line."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        return f"cannot read {path}: {e.strerror}; check the path and its permissions (--dataset)"
    if path.suffix.lower() == ".parquet":
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return (f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                f"re-encode the file as UTF-8 (--dataset)")
    if not text.strip():
        return f"{path} is empty: no rows to train on (--dataset)"
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    json.loads(line)
                except ValueError as e:
                    return f"{path}:{number}: malformed JSON ({e}); fix or remove that line (--dataset)"
    return None


def _builder_for(path: Path) -> tuple[str, dict]:
    suffix = path.suffix.lower()
    if suffix not in FILE_BUILDERS:
        raise SftuneError(
            f"unsupported data file type {suffix!r} for {path}; use one of {', '.join(FILE_BUILDERS)} (--dataset)"
        )
    return FILE_BUILDERS[suffix]


def _load_hub(name: str, config_name: str | None, local_files_only: bool):
    import datasets

    offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = offline or local_files_only  # cache only: no retries against a dead network
    try:
        return datasets.load_dataset(name, config_name)
    except ConnectionError as e:
        raise OSError(str(e)) from None
    finally:
        datasets.config.HF_HUB_OFFLINE = offline


def find_text_column(columns: dict[str, Any], requested: str | None) -> str:
    """The column to train on: `requested`, else 'text', else 'sentence', else the only string column.

    `columns` maps column names to datasets feature objects.
    """
    names = list(columns)
    if requested is not None:
        if requested not in columns:
            raise SftuneError(f"text column {requested!r} not in the dataset (columns: {', '.join(names)}); fix --text-column")
        return requested
    for name in ("text", "sentence"):
        if name in columns:
            return name
    strings = [n for n, f in columns.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if len(strings) == 1:
        return strings[0]
    raise SftuneError(
        f"cannot tell which column holds the text (string columns: {', '.join(strings) or 'none'}; "
        f"all columns: {', '.join(names)}); set --text-column"
    )


# --- tokenized splits -----------------------------------------------------------


@dataclass
class Examples:
    """Tokenized examples of one split, flat: example i is `input_ids[offsets[i]:offsets[i+1]]`."""

    input_ids: np.ndarray  # (total_tokens,) int32
    supervised: np.ndarray  # (total_tokens,) bool: True where the token is a training target
    offsets: np.ndarray  # (n + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[lo:hi], self.supervised[lo:hi]

    @classmethod
    def from_lists(cls, ids: list[list[int]], supervised: list[list[bool]] | None = None) -> "Examples":
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(x) for x in ids])
        flat = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(offsets[-1]))
        if supervised is None:
            mask = np.ones(len(flat), dtype=bool)
        else:
            mask = np.fromiter((m for x in supervised for m in x), dtype=bool, count=int(offsets[-1]))
        return cls(flat, mask, offsets)

    def save(self, prefix: Path) -> None:
        np.save(f"{prefix}.input_ids.npy", self.input_ids)
        np.save(f"{prefix}.supervised.npy", self.supervised)
        np.save(f"{prefix}.offsets.npy", self.offsets)

    @classmethod
    def load(cls, prefix: Path) -> "Examples":
        return cls(*(np.load(f"{prefix}.{k}.npy", mmap_mode="r") for k in ("input_ids", "supervised", "offsets")))


def count_targets(examples: Examples) -> int:
    """Tokens the loss is computed on: supervised tokens that have a previous token to predict them from."""
    firsts = examples.supervised[examples.offsets[:-1]].sum() if len(examples) else 0
    return int(examples.supervised.sum() - firsts)


def drop_untrained(examples: Examples) -> tuple[Examples, int]:
    """Remove examples with no training target (no supervised token after the first), so they never
    reach the loss; returns the rest and how many were removed.

    >>> kept, n = drop_untrained(Examples.from_lists([[1, 2], [3, 4]], [[True, True], [True, False]]))
    >>> (len(kept), n, kept.example(0)[0].tolist())
    (1, 1, [1, 2])
    """
    lengths = examples.lengths
    starts = examples.offsets[:-1]
    # supervised tokens per example, minus the first token's (it is never predicted)
    per_example = np.add.reduceat(examples.supervised.astype(np.int64), starts) if len(examples) else np.zeros(0)
    per_example = per_example - examples.supervised[starts].astype(np.int64)
    has_targets = (per_example > 0) & (lengths > 1)
    if has_targets.all():
        return examples, 0
    keep = np.flatnonzero(has_targets)
    token_mask = np.repeat(has_targets, lengths)
    offsets = np.zeros(len(keep) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths[keep])
    return Examples(np.ascontiguousarray(examples.input_ids[token_mask]),
                    np.ascontiguousarray(examples.supervised[token_mask]), offsets), int(len(examples) - len(keep))


@dataclass
class SplitStats:
    """What happened to one split's rows."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {r: 0 for r in DROP_REASONS})
    tokens: int = 0  # tokens of kept examples, EOS included
    supervised_tokens: int = 0  # training targets: supervised tokens after the first of each example
    untrained_tokens: int = 0  # tokens of kept examples the loss never sees (prompts, headers, BOS)
    boundary_merges: int = 0  # examples whose parts tokenize differently when joined (see tokenize_split)
    length: dict[str, float] = field(default_factory=dict)  # mean, p50, p90, p95, p99, max of kept examples


def length_summary(lengths: np.ndarray) -> dict[str, float]:
    if len(lengths) == 0:
        return {}
    p = np.percentile(lengths, [50, 90, 95, 99])
    return {
        "mean": round(float(lengths.mean()), 2),
        "p50": float(p[0]),
        "p90": float(p[1]),
        "p95": float(p[2]),
        "p99": float(p[3]),
        "max": int(lengths.max()),
    }


@dataclass(frozen=True)
class EncodeOptions:
    """How rows become training examples (everything but the data and the tokenizer)."""

    max_length: int
    min_tokens: int = 5
    overlong: str = "drop"
    truncation_side: str = "right"
    train_on_prompt: bool = False
    train_on_all_turns: bool = False


def tokenize_split(rows, tokenizer, layout: Layout, options: EncodeOptions, template: ChatTemplate | None = None,
                   source: str = "train"):
    """Tokenize one split with batched `datasets.map` (512 rows a call, original columns removed)
    and keep what `encode_example` keeps. Returns (Examples, SplitStats).

    Each row's segments (`formats.row_segments`) are tokenized separately, so the trained
    tokens are exactly the answer's own tokens. Where tokenizing the joined text would
    merge tokens across a boundary, the parts' tokens win (they are what the model sees
    when it is given the prompt alone); such rows are counted in `boundary_merges`.
    `source` names the split the rows came from, for error messages.
    """
    eos_id = tokenizer.eos_token_id
    plain = layout.format in ("text", "prompt_completion")  # these get BOS/EOS from us; chat templates write their own
    prefix = special_prefix(tokenizer) if plain else []
    o = options

    def encode_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        numbers = batch[ROW_COLUMN] if ROW_COLUMN in batch else indices
        segments = [
            row_segments({k: batch[k][i] for k in layout.columns.values()}, layout, template, o.train_on_prompt,
                         o.train_on_all_turns, where=f"{source} row {numbers[i] + 1}")
            for i in range(len(numbers))
        ]
        flat = tokenizer([text for segs in segments for text, _ in segs], add_special_tokens=False)["input_ids"]
        multi = [i for i, segs in enumerate(segments) if len(segs) > 1]
        joined = tokenizer(["".join(text for text, _ in segments[i]) for i in multi], add_special_tokens=False)[
            "input_ids"] if multi else []
        whole = dict(zip(multi, joined))
        out: dict[str, list] = {"input_ids": [], "supervised": [], "status": [], "merged": [], "n_tokens": []}
        at = 0
        for i, segs in enumerate(segments):
            parts, at = flat[at : at + len(segs)], at + len(segs)
            ids, mask, status = encode_example(parts, [t for _, t in segs], eos_id if plain else None, o.min_tokens,
                                               o.max_length, o.overlong, o.truncation_side, prefix)
            joined_parts = [t for p in parts for t in p]
            out["input_ids"].append(ids)
            out["supervised"].append(mask)
            out["status"].append(status)
            out["merged"].append(i in whole and whole[i] != joined_parts)
            out["n_tokens"].append(len(prefix) + len(joined_parts) + int(plain))
        return out

    mapped = rows.map(
        encode_batch,
        batched=True,
        batch_size=MAP_BATCH_SIZE,
        with_indices=True,
        remove_columns=rows.column_names,
        keep_in_memory=True,  # our own cache holds the result; no second copy in the datasets cache
        desc="tokenizing",
    )
    table = mapped.data.table  # pyarrow: read columns without building Python lists
    status = table.column("status").to_numpy(zero_copy_only=False).astype(str)
    stats = SplitStats(rows=len(rows))
    for reason in DROP_REASONS:
        stats.dropped[reason] = int((status == reason).sum())
    stats.truncated = int((status == "truncated").sum())
    if o.overlong == "error" and stats.dropped["overlong"]:
        longest = int(table.column("n_tokens").to_numpy()[status == "overlong"].max())
        raise SftuneError(
            f"{stats.dropped['overlong']:,} example(s) are longer than max_length {o.max_length} tokens "
            f"(longest: about {longest}). "
            f"Raise --max-length, or set --overlong drop or --overlong truncate."
        )
    keep = np.flatnonzero((status == "kept") | (status == "truncated"))
    stats.boundary_merges = int(table.column("merged").to_numpy(zero_copy_only=False)[keep].sum())
    kept = table.select(["input_ids", "supervised"]).take(keep)
    flat, offsets = _flat_lists(kept.column("input_ids"), np.int32)
    mask, _ = _flat_lists(kept.column("supervised"), bool)
    examples, stats.dropped["no_targets"] = drop_untrained(Examples(flat, mask, offsets))
    stats.kept = len(examples)
    stats.tokens = int(len(examples.input_ids))
    stats.supervised_tokens = count_targets(examples)
    stats.untrained_tokens = int(len(examples.input_ids) - examples.supervised.sum())
    stats.length = length_summary(examples.lengths)
    return examples, stats


def _flat_lists(column, dtype) -> tuple[np.ndarray, np.ndarray]:
    """A pyarrow list column as (flat values, offsets from 0)."""
    lists = column.combine_chunks()
    offsets = lists.offsets.to_numpy().astype(np.int64)
    values = lists.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]].astype(dtype)
    return np.ascontiguousarray(values), offsets - offsets[0]


# --- the whole pipeline, cached ------------------------------------------------


@dataclass
class PreparedData:
    train: Examples
    validation: Examples
    stats: dict[str, SplitStats]
    layout: Layout
    cache_path: Path
    from_cache: bool
    seconds: float  # wall time of prepare_data

    @property
    def text_column(self) -> str | None:
        return self.layout.columns.get("text")


def default_cache_dir() -> Path:
    return Path(os.environ.get("SFTUNE_CACHE", Path.home() / ".cache" / "sftune"))


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything that decides token ids: vocabulary, merges, normaliser, special tokens."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(json.dumps(tokenizer("a b")["input_ids"]).encode())  # catches add_bos/eos behaviour
    return h.hexdigest()


def source_fingerprint(dataset: str) -> str | None:
    """Cheap identity of local data files (path, size, mtime); None for a Hub id."""
    path = Path(dataset).expanduser()
    files = local_files(dataset)
    if files is None and path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts[len(path.parts):]))
    if files is None:
        return None
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def chat_template_for(tokenizer) -> str:
    """The tokenizer's chat template, else sftune's default (set on the tokenizer, so it is saved with the model)."""
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if not template:
        tokenizer.chat_template = template = DEFAULT_CHAT_TEMPLATE
        log("chat: the tokenizer has no chat template; using sftune's default "
            "(<|role|>\\n{content}<|endoftext|> per turn; see README) and saving it with the model")
    return template


def prepare_data(
    dataset: str,
    tokenizer,
    max_length: int,
    text_column: str | None = None,
    min_tokens: int = 5,
    overlong: str = "drop",
    val_fraction: float = 0.05,
    seed: int = 42,
    cache_dir: str | Path | None = None,
    format: str = "auto",
    columns: dict[str, str] | None = None,
    truncation_side: str = "right",
    train_on_prompt: bool = False,
    train_on_all_turns: bool = False,
    dataset_config: str | None = None,
    split: str = "train",
) -> PreparedData:
    """Load, tokenize and filter `dataset`, or read the result from cache.

    The format (text, prompt_completion, chat, chat_prompt_completion) is `format`,
    or detected from the columns (renamed by `columns`). Chat data is rendered with
    the tokenizer's chat template (sftune's default when it has none). The cache key
    covers the data files (or the Hub dataset's fingerprint), the tokenizer, its chat
    template and every setting that changes the result.
    """
    start = time.perf_counter()
    cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    options = EncodeOptions(max_length, min_tokens, overlong, truncation_side, train_on_prompt, train_on_all_turns)
    settings = {
        "version": PIPELINE_VERSION,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
        "text_column": text_column,
        "format": format,
        "columns": columns or {},
        "options": asdict(options),
        "val_fraction": val_fraction,
        "seed": seed,
        "dataset_config": dataset_config,
        "split": split,
    }
    source = source_fingerprint(dataset)
    rows = None
    if source is None:  # a Hub dataset: its fingerprint is known only once loaded (from the datasets cache)
        rows = load_rows(dataset, seed, val_fraction, dataset_config, split)
        source = rows["train"]._fingerprint + rows["validation"]._fingerprint
    key = hashlib.sha256(json.dumps({"source": source, **settings}, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_root / "data" / key
    if (path / "stats.json").is_file():
        meta = json.loads((path / "stats.json").read_text())
        stats = {k: SplitStats(**v) for k, v in meta["stats"].items()}
        layout = Layout(**meta["layout"])
        if layout.format.startswith("chat"):
            chat_template_for(tokenizer)
        return PreparedData(Examples.load(path / "train"), Examples.load(path / "validation"), stats, layout,
                            path, True, time.perf_counter() - start)
    if rows is None:
        rows = load_rows(dataset, seed, val_fraction, dataset_config, split)
    layout = detect_layout(rows["train"].features, format, columns, text_column)
    missing = [c for c in layout.columns.values() if c not in rows["validation"].features]
    if missing:
        names = [c for c in rows["validation"].column_names if c != ROW_COLUMN]
        raise SftuneError(f"the validation split has no column {missing[0]!r} (columns: {', '.join(names)}); "
                          f"give both splits the same columns (--dataset)")
    template = ChatTemplate(chat_template_for(tokenizer), tokenizer) if layout.format.startswith("chat") else None
    if template is not None:
        check_end_of_turn(template)
    splits, stats = {}, {}
    for name in ("train", "validation"):
        splits[name], stats[name] = tokenize_split(rows[name], tokenizer, layout, options, template,
                                                   source=_source_name(rows, name, split))
        if len(splits[name]) == 0:
            s = stats[name]
            raise SftuneError(
                f"no {name} example is left after filtering ({s.rows:,} rows; dropped: {s.dropped}). "
                f"Lower --min-tokens ({min_tokens}) or raise --max-length ({max_length}), or check the data's "
                f"format: {layout.describe()} (--format, --columns)."
            )
    warn_about(stats, layout, options)
    _write_cache(path, splits, stats, layout)
    return PreparedData(splits["train"], splits["validation"], stats, layout, path, False, time.perf_counter() - start)


def _source_name(rows, name: str, split: str) -> str:
    """Where a split's rows come from, for error messages: 'train' for rows held out of train."""
    return getattr(rows, "sources", {}).get(name, name)


def check_end_of_turn(template: ChatTemplate) -> None:
    try:
        end = template.end_of_turn()
    except Exception as e:
        raise SftuneError(f"the chat template cannot render a simple user/assistant exchange: {e} "
                          f"(check --chat-template)") from None
    if not end.strip():
        log("warning: the chat template writes no end-of-turn marker after an assistant's answer, so the model "
            "will not learn where an answer ends; use a template that ends turns (e.g. with EOS) via --chat-template")


def warn_about(stats: dict[str, SplitStats], layout: Layout, options: EncodeOptions) -> None:
    """Say what the user should know before training: untrained rows, answers cut before their end, merges."""
    for name, st in stats.items():
        if st.dropped["no_targets"]:
            log(f"warning: {st.dropped['no_targets']:,} {name} example(s) have no trained tokens and were dropped "
                f"({'truncation cut their answer' if st.truncated else 'empty answer'}); "
                f"see `sftune data --show N`")
        if st.truncated and options.truncation_side == "right":
            log(f"warning: {st.truncated:,} {name} example(s) were truncated on the right: they do not end with "
                f"EOS{'/end-of-turn' if layout.format.startswith('chat') else ''}, so they do not teach the model "
                f"to stop (raise --max-length, or --overlong drop)")
        if st.boundary_merges:
            log(f"data: {st.boundary_merges:,} {name} example(s) tokenize differently as one text than as parts "
                f"(BPE merges across the prompt/answer boundary); sftune trains on the parts' tokens, which are "
                f"what the model sees when given the prompt alone")


def _write_cache(path: Path, splits: dict[str, Examples], stats: dict[str, SplitStats], layout: Layout) -> None:
    """Write atomically: a reader sees a complete entry or none (stats.json is written last)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        for name, examples in splits.items():
            examples.save(tmp / name)
        meta = {"layout": asdict(layout), "stats": {k: asdict(v) for k, v in stats.items()}}
        (tmp / "stats.json").write_text(json.dumps(meta, indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"data: could not write the cache at {path} ({e}); continuing without it")
