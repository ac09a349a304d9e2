"""Data sources: where rows come from (files, a directory laid out like a Hub repo, the Hub).

Owns reading rows into a `datasets.DatasetDict` with 'train' and 'validation' splits
(`load_rows`), opening them as streams (`open_stream`), naming the first problem in a bad
file (`diagnose_file`), and finding the text column. Imports `formats` (for the row-number
column) and `hub`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import re
from pathlib import Path

import numpy as np

from sftune.console import log
from sftune.data.formats import ROW_COLUMN
from sftune.errors import SftuneError
from sftune.hub import from_hub_or_cache

FILE_BUILDERS = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    # CSV cells stay text as written (" 4" is not the number 4; an empty cell is "", not NaN): see _csv_as_text.
    # utf-8-sig: a file that starts with a byte-order mark (Excel's "CSV UTF-8", Notepad) reads without it; as
    # plain UTF-8 its first column's name began with U+FEFF (not found), or a text file's first row did (trained)
    ".csv": ("csv", {"keep_default_na": False, "encoding": "utf-8-sig"}),
    ".tsv": ("csv", {"delimiter": "\t", "keep_default_na": False, "encoding": "utf-8-sig"}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {"encoding": "utf-8-sig"}),
}
VALIDATION_NAMES = ("validation", "valid", "val", "dev")


def local_files(dataset: str, flag: str = "--dataset") -> list[Path] | None:
    """The files `dataset` names: one file, a comma-separated list, or a glob; None when it
    names no file (a directory or a Hub id)."""
    import glob

    names = [n.strip() for n in dataset.split(",") if n.strip()]
    if not names:
        raise SftuneError(f"{flag} {dataset!r} names no file, directory or Hub id; give one, e.g. "
                          f"{flag} data/train.jsonl")
    if len(names) == 1 and not glob.has_magic(names[0]):
        path = Path(names[0]).expanduser()
        return [path] if path.is_file() else None
    files: list[Path] = []
    for name in names:
        matches = sorted(glob.glob(str(Path(name).expanduser()), recursive=True)) if glob.has_magic(name) else [name]
        if not matches:
            raise SftuneError(f"no file matches {name!r} ({flag})")
        for m in matches:
            if not Path(m).is_file():
                raise SftuneError(f"{m} is not a file ({flag}: give files, a glob, a directory or a Hub id)")
            files.append(Path(m))
    return files


def load_rows(dataset: str, seed: int, val_fraction: float, config_name: str | None = None, split: str = "train",
              val_split: str | None = None, val_dataset: str | None = None, only: str | None = None):
    """Load a dataset as a DatasetDict with 'train' and 'validation' splits.

    `dataset` is a file, several (comma-separated or a glob), a directory laid out
    like a Hub repo, or a Hub id (with `config_name`). Train is its `split`;
    validation is `val_dataset` when given (its `val_split`, else its own validation split, else all of it),
    else `val_split` of `dataset`, else its own split when it has one (validation, valid, val or dev),
    else `val_fraction` of train held out with `seed`. Every row carries its number
    in the source split (column `__row__`) so errors can point at it. `only` ("train" or "validation"; for
    `datasets`): that split alone (the train split whole; the rows `--val-dataset` would give), the other empty.
    """
    import datasets

    if only == "validation":
        validation, name = rows_to_validate_on(dataset, val_split)
        result = datasets.DatasetDict(train=validation.select([]), validation=validation)
        result.sources = {"train": name, "validation": name}
        return result
    ds, files = read_splits(dataset, config_name, "--dataset")
    split = "train" if files and not is_slice(split) else split
    if split not in ds and not is_slice(split):
        raise SftuneError(f"dataset {dataset} has no {split!r} split (it has: {', '.join(ds)}); set --split")
    numbered = numbered_splits(ds)
    train = pick_split(numbered, split, dataset, "--split")
    if only == "train":
        result = datasets.DatasetDict(train=train, validation=train.select([]))
        result.sources = {"train": split, "validation": split}
        return result
    if val_dataset is not None:
        validation, name = rows_to_validate_on(val_dataset, val_split)
        result = datasets.DatasetDict(train=train, validation=validation)
        result.sources = {"train": split, "validation": name}
        return result
    val_name = validation_split(ds, dataset, split, val_split)
    if val_name is not None:
        result = datasets.DatasetDict(train=train, validation=pick_split(numbered, val_name, dataset, "--val-split"))
        result.sources = {"train": split, "validation": val_name}
        return result
    if len(train) < 2:
        raise SftuneError(f"dataset {dataset} has {len(train)} row(s) in {split}: too few to hold out a validation set")
    held = train.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
    log(f"data: no validation split in {dataset}; holding out {len(held['test']):,} of "
        f"{len(train):,} {split} rows (val_fraction {val_fraction}, seed {seed})")
    result = datasets.DatasetDict(train=held["train"], validation=held["test"])
    result.sources = {"train": split, "validation": split}  # held-out rows keep their numbers in `split`
    return result


def rows_to_validate_on(val_dataset: str, val_split: str | None):
    """(`--val-dataset`'s rows to validate on, numbered; what to call them): its `val_split`, else its validation
    split, else its training split (or only split), whole."""
    other, _ = read_splits(val_dataset, None, "--val-dataset")
    name = validation_split(other, val_dataset, None, val_split, flag="--val-dataset") or \
        ("train" if "train" in other else next(iter(other)))
    numbered = numbered_splits(other)
    return pick_split(numbered, name, val_dataset, "--val-split"), f"{name} of {val_dataset}"


def numbered_splits(splits) -> dict:
    """Each split with its rows' numbers in it (column `__row__`), so that errors can point at a row."""
    return {name: rows.add_column(ROW_COLUMN, np.arange(len(rows))) for name, rows in splits.items()}


def is_slice(split: str) -> bool:
    """A slice of splits as `datasets` writes one (train[:1000], train[:10%], train[:5%]+validation), not a name."""
    return "[" in split or "+" in split


def pick_split(splits: dict, spec: str, dataset: str, flag: str):
    """The rows `spec` names in `splits`: a split, or a slice of splits (`is_slice`), rows keeping their numbers."""
    if not is_slice(spec):
        return splits[spec]
    import datasets

    try:
        parts = datasets.ReadInstruction.from_spec(spec).to_absolute({n: len(rows) for n, rows in splits.items()})
    except (ValueError, AssertionError) as e:
        raise SftuneError(f"{flag} {spec!r}: not a split of {dataset} or a slice of one ({e}); write e.g. "
                          f"train[:1000], train[:10%] or train[10%:20%]") from None
    picked = [splits[p.splitname].select(range(p.from_, p.to) if p.from_ < p.to else []) for p in parts]
    if not sum(map(len, picked)):
        raise SftuneError(f"{flag} {spec!r} selects no row of {dataset} ({', '.join(f'{n}: {len(r):,} rows' for n, r in splits.items())})")
    return picked[0] if len(picked) == 1 else datasets.concatenate_datasets(picked)


def read_splits(dataset: str, config_name: str | None, flag: str):
    """(DatasetDict of every split of `dataset`, whether it was given as files: then its one split is 'train').
    Errors name `flag`."""
    import datasets

    files = local_files(dataset, flag)
    path = Path(dataset).expanduser()
    if files is not None:
        builder, kwargs = file_loader(files)
        for f in files:  # what `datasets` would read wrongly, or with unbounded memory: say so first
            problem = precheck_file(f, kwargs.get("delimiter", ","))
            if problem:
                raise SftuneError(problem)
        try:
            with datasets_errors_unsaid():
                ds = datasets.load_dataset(builder, data_files={"train": [str(f) for f in files]}, **kwargs)
        except Exception as e:  # datasets wraps parse errors in its own types: find the bad line ourselves
            bad = unwritable_cache(e) or next((m for f in files for m in [diagnose_file(f)] if m), None)
            raise SftuneError(bad or f"could not read {dataset}: {_root_cause(e)} (check {flag})") from None
        if builder == "csv":
            ds = datasets.DatasetDict({k: _integer_columns(v) for k, v in ds.items()})
        return ds, True
    if path.is_dir() and saved_to_disk(path):
        return from_disk(path), False
    if path.is_dir():
        try:
            return datasets.load_dataset(str(path), config_name), False
        except Exception as e:
            bad = unwritable_cache(e) or next((m for f in sorted(path.rglob("*")) if f.is_file() and f.suffix in
                                               FILE_BUILDERS for m in [diagnose_file(f)] if m), None)
            raise SftuneError(bad or f"could not read a dataset from directory {dataset}: {_root_cause(e)} "
                              f"(check {flag}{', --dataset-config' if flag == '--dataset' else ''})") from None
    return from_hub_or_cache(dataset, "dataset", flag,
                             lambda local_files_only: _load_hub(dataset, config_name, local_files_only)), False


def validation_split(splits, dataset: str, split: str | None, val_split: str | None,
                     flag: str = "--dataset") -> str | None:
    """The split to validate on: `val_split` (which must exist), else the dataset's own validation split (validation,
    valid, val or dev), else None (a hold-out of the training split, or all of a --val-dataset)."""
    if val_split is None:
        trained = {part.split("[")[0].strip() for part in (split or "").split("+")}  # (a slice's splits too)
        return next((n for n in VALIDATION_NAMES if n in splits and n not in trained), None)
    if val_split not in splits and not is_slice(val_split):
        hint = (f" (files given as {flag} are one split; put each split's files in a directory, named after their "
                f"split, e.g. train.jsonl and test.jsonl)" if list(splits) == ["train"] else "")
        raise SftuneError(f"dataset {dataset} has no {val_split!r} split to validate on (it has: {', '.join(splits)})"
                          f"{hint}; set --val-split, or leave it out to hold out --val-fraction of the training split")
    return val_split


def file_loader(files: list[Path]) -> tuple[str, dict]:
    """The `datasets` builder and its arguments for these data files (all of one type)."""
    builders = {(b, tuple(kw.items())) for b, kw in map(_builder_for, files)}
    if len(builders) > 1:
        raise SftuneError(f"--dataset mixes file types ({', '.join(sorted({f.suffix for f in files}))}); "
                          f"give files of one type")
    builder, kwargs = builders.pop()
    kwargs = dict(kwargs)
    if builder == "csv":
        if "delimiter" not in kwargs and (header := _semicolon_header(files[0])):
            kwargs["delimiter"] = ";"  # (as some spreadsheets write CSV: read with commas, one column held it all)
            log(f"data: the header of {files[0].name} ({header!r}) has no comma and has semicolons: its fields are "
                f"read as separated by ';'")
        kwargs["features"] = _csv_as_text(files[0], kwargs.get("delimiter", ","))
    if builder == "json" and (field := rows_field(files)):
        kwargs.update(field=field, encoding="utf-8-sig")  # (read by json.load: a byte-order mark is no JSON)
        log(f"data: the rows of {files[0].name} are the list under {field!r}")
    return builder, kwargs


def _semicolon_header(path: Path) -> str | None:
    """The first line of a .csv file whose fields are separated by ';' rather than ',' (none of its header's
    names holds a comma, and there are several), else None."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            header = f.readline().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return header if "," not in header and ";" in header else None


@contextlib.contextmanager
def datasets_errors_unsaid():
    """`datasets` logs a file it cannot parse ("Failed to load JSON from file ... with error <class
    'pyarrow.lib.ArrowInvalid'>") before raising; sftune's own error names the file and line, so that log line is
    left out while a file is read."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _csv_as_text(path: Path, delimiter: str):
    """Features reading every column of a CSV file as text (pandas would turn " 4" into 4)."""
    import csv

    import datasets

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # (as the builder reads it: FILE_BUILDERS)
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


def unwritable_cache(e: BaseException) -> str | None:
    """The message for a `datasets` failure that is its own cache directory (HF_DATASETS_CACHE, under HF_HOME) that
    cannot be made or written, not the data; None for any other failure."""
    import datasets

    e = _first_cause(e)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:  # (reading writes nothing else: the cache's disk is full)
        return (f"no space left on the disk that holds the datasets library's cache ({datasets.config.HF_DATASETS_CACHE}"
                f"; it writes an Arrow copy of the data there); the data is fine. Free space there, or point "
                f"HF_DATASETS_CACHE (or HF_HOME) at a disk with room")
    if not isinstance(e, OSError) or not e.filename:
        return None
    cache, failed = Path(datasets.config.HF_DATASETS_CACHE), Path(str(e.filename))
    if not (cache.is_relative_to(failed) or failed.is_relative_to(cache)):
        return None
    return (f"the datasets library cannot write its cache at {cache} ({e.strerror or type(e).__name__}: {failed}); "
            f"the data is fine. Point HF_DATASETS_CACHE (or HF_HOME) at a directory you can write to")


def _first_cause(e: BaseException) -> BaseException:
    while e.__cause__ is not None:
        e = e.__cause__
    return e


def _root_cause(e: BaseException) -> str:
    e = _first_cause(e)
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


MAX_LINE_BYTES = 16 << 20  # one JSONL row over 16 MiB is refused: datasets would need ~100x that to parse it


def saved_to_disk(path: Path) -> bool:
    """A directory `Dataset.save_to_disk` or `DatasetDict.save_to_disk` wrote (read with `load_from_disk`; as a
    dataset directory `datasets` refuses a Dataset's, "use load_from_disk")."""
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file()
                                                       and (path / "dataset_info.json").is_file())


def from_disk(path: Path):
    """A `save_to_disk` directory's splits (a saved Dataset is the one split, train)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:
        raise SftuneError(f"could not read the dataset saved in {path} (save_to_disk): {_root_cause(e)} "
                          f"(check --dataset)") from None
    return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)


def rows_field(files: list[Path]) -> str | None:
    """For .json files that each hold one object with one list of rows in it ({"data": [{...}, ...]}, as SQuAD and
    many exports are laid out), that list's key: `datasets` reads it as `field`; without it, the whole file was one
    row of one column. None for arrays of rows and JSON lines. An object of columns ({"text": [...], "label":
    [...]}) is refused: `datasets` reads it as one row too."""
    fields = set()
    for path in files:
        if path.suffix.lower() != ".json":
            return None
        with open(path, "rb") as f:
            if f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")[:1] != b"{":  # (a byte-order mark, then an object?)
                return None
        try:
            top = json.loads(path.read_bytes())
        except ValueError:  # (JSON lines in a .json file)
            return None
        lengths = {len(v) for v in top.values() if isinstance(v, list)}
        if len(top) > 1 and len(lengths) == 1 and all(isinstance(v, list) for v in top.values()):
            raise SftuneError(f"{path} holds columns ({', '.join(list(top)[:5])}: lists of {lengths.pop():,} values), "
                              f"which are read as one row; write its rows as a JSON array of objects, or as JSON "
                              f"lines (.jsonl) (--dataset)")
        lists = [k for k, v in top.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]
        if len(lists) != 1:
            return None
        fields.add(lists[0])
    if len(fields) > 1:
        raise SftuneError(f"the .json files hold their rows under different keys ({', '.join(sorted(fields))}); "
                          f"give files of one layout (--dataset)")
    return next(iter(fields), None)


def precheck_file(path: Path, delimiter: str = ",") -> str | None:
    """Problems found by one cheap pass over a text data file: a JSONL line too long to parse within
    bounded memory, a CSV/TSV quote that is never closed (pandas would silently merge the rows after it).
    `delimiter`: the one the file is read with (`file_loader`: a tab for .tsv, ';' for a semicolon CSV)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with open(path, "rb") as f:
                line, carry = 1, 0
                for block in iter(lambda: f.read(1 << 20), b""):
                    parts = block.split(b"\n")
                    first = carry + len(parts[0])
                    longest = max([first, *map(len, parts[1:])])
                    if longest > MAX_LINE_BYTES:
                        at = line if first > MAX_LINE_BYTES else line + next(
                            i for i, p in enumerate(parts[1:], 1) if len(p) > MAX_LINE_BYTES)
                        return (f"{path}:{at}: a line of more than {MAX_LINE_BYTES >> 20} MiB (one row of JSON); "
                                f"rows that long are refused: split or remove it (--dataset)")
                    line += len(parts) - 1
                    carry = len(parts[-1]) if len(parts) > 1 else first
        elif suffix in (".csv", ".tsv"):
            import csv

            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f, delimiter=delimiter, strict=True)
                try:
                    for _ in reader:
                        pass
                except csv.Error as e:
                    return (f"{path}:{reader.line_num}: {e} (a quote opened and never closed?); fix the quoting "
                            f"(--dataset)")
    except (OSError, UnicodeDecodeError):
        return None  # diagnose_file names these after the load fails
    return None


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
        return f"{path} is empty: it holds no rows (--dataset)"
    if path.suffix.lower() in (".csv", ".tsv") and len([line for line in text.splitlines() if line.strip()]) == 1:
        return f"{path} holds a header line and no rows (--dataset)"
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    json.dumps(json.loads(line), ensure_ascii=False).encode("utf-8")
                except ValueError as e:  # (UnicodeEncodeError is one)
                    what = "a \\u escape of half a surrogate pair, which is no character" if isinstance(
                        e, UnicodeEncodeError) else f"malformed JSON ({e})"
                    return f"{path}:{number}: {what}; fix or remove that line (--dataset)"
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


def open_stream(dataset: str, config_name: str | None, split: str):
    """The dataset's splits as IterableDatasets (nothing is read yet)."""
    import datasets

    files = local_files(dataset)
    if files is not None:
        builder, kwargs = file_loader(files)
        return datasets.load_dataset(builder, data_files={"train": [str(f) for f in files]}, streaming=True, **kwargs)
    if (path := Path(dataset).expanduser()).is_dir() and saved_to_disk(path):
        return datasets.IterableDatasetDict({name: rows.to_iterable_dataset()
                                             for name, rows in from_disk(path).items()})
    if path.is_dir():
        return datasets.load_dataset(str(path), config_name, streaming=True)

    def load(local_files_only: bool):
        if local_files_only:  # a stream needs the Hub; cached files are read without --streaming
            raise OSError("streaming needs the Hub")
        return datasets.load_dataset(dataset, config_name, streaming=True)

    return from_hub_or_cache(dataset, "dataset", "--dataset", load)
