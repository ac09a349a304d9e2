"""Human output and the metrics stream, kept apart.

Human log lines go to stderr (so `--json` output on stdout stays clean);
results a command was asked for go to stdout; metrics go to `metrics.jsonl`.
Only rank 0 prints or writes, so a later multi-process run needs no
`if rank == 0` at each call site.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sftune.dist import env_rank


PARALLELISM = "TOKENIZERS_PARALLELISM"
_parallelism_ours = False  # sftune set PARALLELISM (the user had not)


def quiet_tokenizers() -> None:
    """`tokenizers` warns when a process forks after its threads were used, unless PARALLELISM is set: set it
    (false) where the user has not. `tokenizer_threads` turns the threads on while a dataset is tokenized."""
    global _parallelism_ours
    if PARALLELISM not in os.environ:
        os.environ[PARALLELISM] = "false"
        _parallelism_ours = True


@contextlib.contextmanager
def tokenizer_threads():
    """`tokenizers`' own threads for a batch tokenization (it reads PARALLELISM at each call), unless the user set
    PARALLELISM; off again after, and set, so a later fork makes no warning. SST-2 on 2 cores: 2.8 -> 2.4 s; on
    many cores most of the tokenizer's share goes (benchmarks/NOTES.md try 69)."""
    if not _parallelism_ours:
        yield
        return
    os.environ[PARALLELISM] = "true"
    try:
        yield
    finally:
        os.environ[PARALLELISM] = "false"


GONE = (errno.EPIPE, errno.EIO)  # a write whose reader went away: a closed pipe, a terminal that hung up


def to_devnull(fd: int) -> None:
    """Point the descriptor `fd` at /dev/null (what is written there from then on goes nowhere)."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


class KeepsWriting:
    """sys.stdout or sys.stderr, except that losing its reader does not end the run: a pipe closed by the reader
    (`sftune train 2>&1 | head`, a `tee` or log shipper that died) or a terminal that hung up makes a write fail
    (EPIPE, EIO), which would raise in the middle of a step or a save. Here the descriptor is pointed at
    /dev/null and the write made again: that output is lost, the training is not (metrics, TensorBoard and
    checkpoints are files). `keep_writing` installs it for the `sftune` process."""

    def __init__(self, stream):
        self._stream = stream

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            self._lost(e)
            return self._stream.write(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            self._lost(e)
            self._stream.flush()

    def _lost(self, e: OSError) -> None:
        if e.errno not in GONE:
            raise e
        to_devnull(self._stream.fileno())


def keep_writing() -> None:
    """Wrap this process's sys.stdout and sys.stderr in `KeepsWriting` (once)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, KeepsWriting):
            setattr(sys, name, KeepsWriting(stream))


def is_main() -> bool:
    return env_rank() == 0


def log(msg: str) -> None:
    """One human log line on stderr, without breaking a live progress bar."""
    if is_main():
        tqdm.write(msg, file=sys.stderr)


class MetricsWriter:
    """Appends one JSON object per line to `path` (and hands it to a tracker); a no-op off rank 0 or without a
    path."""

    def __init__(self, path: Path | None, tracker=None):
        self._file = open(path, "a", encoding="utf-8") if (path is not None and is_main()) else None
        self.tracker = tracker  # also sent there (`tracking.Tracker`: TensorBoard or W&B)

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            if self.tracker is not None:
                self.tracker.write(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
