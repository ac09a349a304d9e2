"""The tokenized-data cache: prepared splits on disk, keyed by everything that decides them.

Owns the cache key (data files' identity or a Hub dataset's fingerprint, the tokenizer,
the chat template and every data setting) and the entry format: a directory holding each
split as `Examples` files and `stats.json`, written last, so a reader sees a complete
entry or none. Imports `examples`, `formats` and `sources`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from sftune.console import log
from sftune.data.examples import Examples, SplitStats
from sftune.data.formats import Layout
from sftune.data.sources import local_files

PIPELINE_VERSION = 4  # bump when tokenization or filtering changes, to invalidate caches
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


def entry_path(cache_root: Path, source: str, settings: dict) -> Path:
    """Where the entry for these data and settings lives."""
    key = hashlib.sha256(json.dumps({"source": source, **settings}, sort_keys=True, default=str).encode()).hexdigest()
    return cache_root / "data" / key[:24]


def read_entry(path: Path) -> tuple[dict[str, Examples], dict[str, SplitStats], Layout] | None:
    """The entry at `path` (memory-mapped), or None when there is no complete one."""
    if not (path / "stats.json").is_file():
        return None
    meta = json.loads((path / "stats.json").read_text())
    stats = {k: SplitStats(**v) for k, v in meta["stats"].items()}
    return {name: Examples.load(path / name) for name in SPLITS}, stats, Layout(**meta["layout"])


def write_entry(path: Path, splits: dict[str, Examples], stats: dict[str, SplitStats], layout: Layout) -> None:
    """Write atomically: a reader sees a complete entry or none (stats.json is written last).
    A cache that cannot be written is reported and skipped: the run goes on without it."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
        for name, examples in splits.items():
            examples.save(tmp / name)
        meta = {"layout": asdict(layout), "stats": {k: asdict(v) for k, v in stats.items()}}
        (tmp / "stats.json").write_text(json.dumps(meta, indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"data: could not write the cache at {path} ({e}); continuing without it")
