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
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sftune.console import log
from sftune.errors import SftuneError
from sftune.hub import from_hub_or_cache

PIPELINE_VERSION = 2  # bump when tokenization or filtering changes, to invalidate caches
MAP_BATCH_SIZE = 512  # rows per tokenizer call in datasets.map, as in the seed
FILE_BUILDERS = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),
}
VALIDATION_NAMES = ("validation", "valid", "val", "dev")
DROP_REASONS = ("empty", "too_short", "overlong", "no_targets")


# --- one example --------------------------------------------------------------


def encode_text(ids: list[int], eos_id: int, min_tokens: int, max_length: int, overlong: str) -> tuple[list[int], str]:
    """Decide the fate of one tokenized text and append EOS.

    `min_tokens` is compared with the text's own tokens (before EOS), like the
    seed's `len(input_ids) > 5`. The example is `ids + [EOS]`; if that exceeds
    `max_length`, "truncate" keeps the first `max_length` tokens with no EOS (the
    text did not end there), "drop" and "error" report it as overlong.
    Returns (input_ids, status) with status in kept | truncated | empty | too_short | overlong.

    >>> encode_text([1, 2, 3, 4, 5, 6, 7], eos_id=0, min_tokens=5, max_length=4, overlong="truncate")
    ([1, 2, 3, 4], 'truncated')
    >>> encode_text([1, 2, 3], eos_id=0, min_tokens=5, max_length=4, overlong="drop")
    ([], 'too_short')
    """
    if not ids:
        return [], "empty"
    if len(ids) <= min_tokens:
        return [], "too_short"
    example = ids if ids[-1] == eos_id else ids + [eos_id]
    if len(example) <= max_length:
        return example, "kept"
    if overlong == "truncate":
        return ids[:max_length], "truncated"
    return [], "overlong"


# --- loading rows ---------------------------------------------------------------


def load_rows(dataset: str, seed: int, val_fraction: float):
    """Load a dataset as a DatasetDict with 'train' and 'validation' splits.

    Validation is the dataset's own split when it has one (validation, valid,
    val or dev), else `val_fraction` of train held out with `seed`.
    """
    import datasets

    path = Path(dataset).expanduser()
    if path.is_file():
        builder, kwargs = _builder_for(path)
        try:
            ds = datasets.load_dataset(builder, data_files={"train": str(path)}, **kwargs)
        except Exception as e:  # datasets wraps parse errors in its own types: find the bad line ourselves
            raise SftuneError(diagnose_file(path) or f"could not read {path}: {_root_cause(e)} (check --dataset)") from None
    elif path.is_dir():
        try:
            ds = datasets.load_dataset(str(path))
        except Exception as e:
            bad = next((m for f in sorted(path.rglob("*")) if f.is_file() and f.suffix in FILE_BUILDERS
                        for m in [diagnose_file(f)] if m), None)
            raise SftuneError(bad or f"could not read a dataset from directory {dataset}: {_root_cause(e)} "
                              f"(check --dataset)") from None
    else:
        ds = from_hub_or_cache(dataset, "dataset", "--dataset", lambda local_files_only: _load_hub(dataset, local_files_only))
    if "train" not in ds:
        raise SftuneError(f"dataset {dataset} has no 'train' split (it has: {', '.join(ds)}); check --dataset")
    val_name = next((n for n in VALIDATION_NAMES if n in ds), None)
    if val_name is not None:
        return datasets.DatasetDict(train=ds["train"], validation=ds[val_name])
    if len(ds["train"]) < 2:
        raise SftuneError(f"dataset {dataset} has {len(ds['train'])} row(s): too few to hold out a validation set")
    held = ds["train"].train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
    log(f"data: no validation split in {dataset}; holding out {len(held['test']):,} of "
        f"{len(ds['train']):,} train rows (val_fraction {val_fraction}, seed {seed})")
    return datasets.DatasetDict(train=held["train"], validation=held["test"])


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


def _load_hub(name: str, local_files_only: bool):
    import datasets

    offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = offline or local_files_only  # cache only: no retries against a dead network
    try:
        return datasets.load_dataset(name)
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


def tokenize_split(rows, tokenizer, text_column: str, min_tokens: int, max_length: int, overlong: str):
    """Tokenize one split with batched `datasets.map` (512 rows a call, original columns removed)
    and keep what `encode_text` keeps. Returns (Examples, SplitStats)."""
    eos_id = tokenizer.eos_token_id

    def encode_batch(batch: dict[str, list]) -> dict[str, list]:
        texts = [t if isinstance(t, str) else "" for t in batch[text_column]]
        encoded = tokenizer(texts)["input_ids"]
        out = [encode_text(ids, eos_id, min_tokens, max_length, overlong) for ids in encoded]
        return {"input_ids": [ids for ids, _ in out], "status": [s for _, s in out], "n_text": [len(x) for x in encoded]}

    mapped = rows.map(
        encode_batch,
        batched=True,
        batch_size=MAP_BATCH_SIZE,
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
    if overlong == "error" and stats.dropped["overlong"]:
        longest = int(table.column("n_text").to_numpy()[status == "overlong"].max())
        raise SftuneError(
            f"{stats.dropped['overlong']:,} example(s) are longer than max_length {max_length} tokens "
            f"(longest: {longest} + EOS). Raise --max-length, or set --overlong drop or --overlong truncate."
        )
    keep = np.flatnonzero((status == "kept") | (status == "truncated"))
    kept_ids = table.select(["input_ids"]).take(keep).column("input_ids").combine_chunks()
    offsets = kept_ids.offsets.to_numpy().astype(np.int64)
    flat = kept_ids.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]].astype(np.int32)
    offsets = offsets - offsets[0]
    examples, stats.dropped["no_targets"] = drop_untrained(Examples(flat, np.ones(len(flat), dtype=bool), offsets))
    stats.kept = len(examples)
    stats.tokens = int(len(flat))
    stats.supervised_tokens = count_targets(examples)
    stats.length = length_summary(examples.lengths)
    return examples, stats


# --- the whole pipeline, cached ------------------------------------------------


@dataclass
class PreparedData:
    train: Examples
    validation: Examples
    stats: dict[str, SplitStats]
    text_column: str
    cache_path: Path
    from_cache: bool
    seconds: float  # wall time of prepare_data


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
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts[len(path.parts):]))
    else:
        return None
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


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
) -> PreparedData:
    """Load, tokenize and filter `dataset`, or read the result from cache.

    The cache key covers the data files (or the Hub dataset's fingerprint),
    the tokenizer and every setting that changes the result.
    """
    start = time.perf_counter()
    cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    settings = {
        "version": PIPELINE_VERSION,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "text_column": text_column,
        "min_tokens": min_tokens,
        "max_length": max_length,
        "overlong": overlong,
        "val_fraction": val_fraction,
        "seed": seed,
    }
    source = source_fingerprint(dataset)
    rows = None
    if source is None:  # a Hub dataset: its fingerprint is known only once loaded (from the datasets cache)
        rows = load_rows(dataset, seed, val_fraction)
        source = rows["train"]._fingerprint + rows["validation"]._fingerprint
    key = hashlib.sha256(json.dumps({"source": source, **settings}, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_root / "data" / key
    if (path / "stats.json").is_file():
        meta = json.loads((path / "stats.json").read_text())
        stats = {k: SplitStats(**v) for k, v in meta["stats"].items()}
        return PreparedData(
            Examples.load(path / "train"), Examples.load(path / "validation"), stats, meta["text_column"],
            path, True, time.perf_counter() - start,
        )
    if rows is None:
        rows = load_rows(dataset, seed, val_fraction)
    column = find_text_column(rows["train"].features, text_column)
    if column not in rows["validation"].features:
        raise SftuneError(f"validation split has no column {column!r} (columns: {', '.join(rows['validation'].column_names)})")
    splits, stats = {}, {}
    for name in ("train", "validation"):
        splits[name], stats[name] = tokenize_split(rows[name], tokenizer, column, min_tokens, max_length, overlong)
        if len(splits[name]) == 0:
            s = stats[name]
            raise SftuneError(
                f"no {name} example is left after filtering ({s.rows:,} rows; dropped: {s.dropped}). "
                f"Lower --min-tokens ({min_tokens}) or raise --max-length ({max_length}), or check --text-column ({column})."
            )
    _write_cache(path, splits, stats, column)
    return PreparedData(splits["train"], splits["validation"], stats, column, path, False, time.perf_counter() - start)


def _write_cache(path: Path, splits: dict[str, Examples], stats: dict[str, SplitStats], column: str) -> None:
    """Write atomically: a reader sees a complete entry or none (stats.json is written last)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        for name, examples in splits.items():
            examples.save(tmp / name)
        meta = {"text_column": column, "stats": {k: asdict(v) for k, v in stats.items()}}
        (tmp / "stats.json").write_text(json.dumps(meta, indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"data: could not write the cache at {path} ({e}); continuing without it")
