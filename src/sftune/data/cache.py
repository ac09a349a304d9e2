"""The tokenized-data cache: prepared splits on disk, keyed by everything that decides them.

Owns the cache key (data files' identity or a Hub dataset's fingerprint, the tokenizer,
the chat template and every data setting) and the entry format: a directory holding each
split as `Examples` files and `stats.json`, written last with each file's size and CRC-32, so a
reader sees a complete entry or none, and an entry damaged later is detected, reported and
rebuilt. A cache directory that cannot be used is warned about and skipped. Imports `examples`,
`formats` and `sources`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np

from sftune.console import log
from sftune.data.examples import Examples, SplitStats
from sftune.data.formats import Layout
from sftune.data.sources import local_files

PIPELINE_VERSION = 8  # bump when tokenization, filtering or the entry format changes, to invalidate caches
SPLITS = ("train", "validation")


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


def sources_fingerprint(dataset: str, val_dataset: str | None = None) -> str | None:
    """`source_fingerprint` of the dataset and of the one validated on (`--val-dataset`), if any: None when either is
    a Hub id."""
    fingerprints = [source_fingerprint(d) for d in (dataset, val_dataset) if d is not None]
    return None if None in fingerprints else "".join(fingerprints)


def source_fingerprint(dataset: str) -> str | None:
    """Identity of local data files by their content (path, size and the bytes: a file rewritten with the same
    size and modification time still changes it); None for a Hub id."""
    path = Path(dataset).expanduser()
    files = local_files(dataset)
    if files is None and path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts[len(path.parts):]))
    if files is None:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.resolve()}|{f.stat().st_size}\n".encode())
        h.update(content_digest(f))
    return h.hexdigest()


WHOLE_FILE_BYTES = 1 << 30  # files up to 1 GiB are hashed whole (about a second); larger ones by samples
SAMPLES, SAMPLE_BYTES = 256, 1 << 20


def content_digest(path: Path) -> bytes:
    """SHA-256 of the file, or for a file over 1 GiB of 256 evenly spaced 1 MiB blocks and its mtime."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= WHOLE_FILE_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(str(path.stat().st_mtime_ns).encode())
            for i in range(SAMPLES):
                f.seek(i * (size - SAMPLE_BYTES) // (SAMPLES - 1))
                h.update(f.read(SAMPLE_BYTES))
    return h.digest()


def entry_path(cache_root: Path, source: str, settings: dict) -> Path:
    """Where the entry for these data and settings lives."""
    key = hashlib.sha256(json.dumps({"source": source, **settings}, sort_keys=True, default=str).encode()).hexdigest()
    return cache_root / "data" / key[:24]


ARRAYS = ("input_ids", "supervised", "offsets")


def _file_crc(path: Path) -> int:
    """CRC-32 of a file (about 1 GB/s: cheap enough to check on every read)."""
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(block, crc)
    return crc


def read_entry(path: Path, vocab_size: int) -> tuple[dict[str, Examples], dict[str, SplitStats], Layout] | None:
    """The entry at `path` (memory-mapped), or None when there is none. An entry that does not verify
    (a file missing, truncated or rewritten, offsets that do not add up, a token id outside the vocabulary)
    is reported and treated as missing, so it is rebuilt."""
    try:
        if not (path / "stats.json").is_file():
            return None
        meta = json.loads((path / "stats.json").read_text())
        files = meta["files"]  # name -> [size, crc32], written with the arrays
        for name, (size, crc) in files.items():
            if (path / name).stat().st_size != size or _file_crc(path / name) != crc:
                raise ValueError(f"{name} does not match its recorded size and checksum")
        splits = {name: Examples.load(path / name) for name in SPLITS}
        for name, ex in splits.items():
            n = len(ex.input_ids)
            if ex.offsets[0] != 0 or ex.offsets[-1] != n or len(ex.supervised) != n or (np.diff(ex.offsets) < 0).any():
                raise ValueError(f"the {name} offsets do not match its tokens")
            if n and (int(ex.input_ids.max()) >= vocab_size or int(ex.input_ids.min()) < 0):
                raise ValueError(f"{name} holds token ids outside the vocabulary of {vocab_size:,}")
        stats = {k: SplitStats(**v) for k, v in meta["stats"].items()}
        return splits, stats, Layout(**meta["layout"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        log(f"warning: the data cache at {path} is damaged ({e}); tokenizing again")
        return None


def write_entry(path: Path, splits: dict[str, Examples], stats: dict[str, SplitStats], layout: Layout) -> None:
    """Write atomically: a reader sees a complete entry or none (stats.json is written last).
    A cache that cannot be written is reported and skipped: the run goes on without it."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
        for name, examples in splits.items():
            examples.save(tmp / name)
        files = {f"{name}.{a}.npy": [(tmp / f"{name}.{a}.npy").stat().st_size, _file_crc(tmp / f"{name}.{a}.npy")]
                 for name in splits for a in ARRAYS}
        meta = {"layout": asdict(layout), "stats": {k: asdict(v) for k, v in stats.items()}, "files": files}
        (tmp / "stats.json").write_text(json.dumps(meta, indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as e:  # (a signal that stops the run while it writes leaves no half-written entry either)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, OSError):
            raise
        log(f"data: could not write the cache at {path} ({e}); continuing without it")
