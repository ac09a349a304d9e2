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
import threading
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
def tokenizer_threads(processes: int = 1):
    """`tokenizers`' own threads for a batch tokenization (it reads PARALLELISM at each call), unless the user set
    PARALLELISM; off again after, and set, so a later fork makes no warning. SST-2 on 2 cores: 2.8 -> 2.4 s; on
    many cores most of the tokenizer's share goes (benchmarks/NOTES.md try 69). With several tokenizing
    `processes` (--data-workers), off: they share the cores, each on one."""
    if not _parallelism_ours:
        yield
        return
    os.environ[PARALLELISM] = "true" if processes == 1 else "false"
    try:
        yield
    finally:
        os.environ[PARALLELISM] = "false"


@contextlib.contextmanager
def no_library_bars():
    """transformers' own progress bars ("Loading weights", "Writing model shards") off for a call, as the command
    line has them off throughout (sftune logs each load and save itself); a program's setting is restored after.
    Also a decorator: `sftune.train`, `load_model` and `save_model` called from Python."""
    from transformers.utils import logging as transformers_logging

    was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            transformers_logging.enable_progress_bar()


GONE = (errno.EPIPE, errno.EIO)  # a write whose reader went away: a closed pipe, a terminal that hung up
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)  # a file that cannot be written: the disk


def to_devnull(fd: int) -> None:
    """Point the descriptor `fd` at /dev/null (what is written there from then on goes nowhere)."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


@contextlib.contextmanager
def stderr_muted():
    """The process's descriptor 2 at /dev/null for a C++ call that writes its own lines there (kineto's "USDT: ...
    profiler_start" at each profiler start and stop, whatever KINETO_LOG_LEVEL says); restored after, errors
    included. Python's own stderr is flushed first, so nothing of ours is lost."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        to_devnull(2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


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


def thread_error(args) -> None:
    """`threading.excepthook` for the `sftune` process: a background thread of a library that fails to write a
    file (TensorBoard's event writer on a full disk) is one line, not a traceback; the main thread meets the same
    error and says what it means for the run. Anything else is printed as Python prints it."""
    if isinstance(args.exc_value, OSError) and args.exc_value.errno in WRITE_ERRORS:
        print(f"warning: {args.thread.name if args.thread else 'a thread'}: {args.exc_value}", file=sys.stderr)
    else:
        threading.__excepthook__(args)


def keep_writing() -> None:
    """Wrap this process's sys.stdout and sys.stderr in `KeepsWriting` (once); background threads' write errors
    in one line (`thread_error`)."""
    threading.excepthook = thread_error
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
    path. The metrics are the run's record, not its work: when they cannot be written any more (a disk that
    filled up mid-run), that is said once and the training goes on without them; the checkpoints and the final
    model are written on their own (and say so if they cannot be)."""

    def __init__(self, path: Path | None, tracker=None):
        self.path = path
        self._file = open(path, "a", encoding="utf-8") if (path is not None and is_main()) else None
        self.tracker = tracker  # also sent there (`tracking.Tracker`: TensorBoard or W&B)

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            try:
                self._file.write(json.dumps(record) + "\n")
                self._file.flush()
                if self.tracker is not None:
                    self.tracker.write(record)
            except OSError as e:
                self._give_up(e, f"before step {record.get('step')}")

    def _give_up(self, e: OSError, when: str) -> None:
        log(f"warning: the metrics cannot be written any more ({e.strerror or e}: {e.filename or self.path}); "
            f"metrics.jsonl and the tracker end {when}, and the training goes on without them")
        self._file, self.tracker, closing = None, None, (self._file, self.tracker)
        for thing in closing:
            with contextlib.suppress(Exception):  # (closing flushes: it fails the same way)
                if thing is not None:
                    thing.close()

    def close(self) -> None:
        try:
            if self._file is not None:
                self._file.close()
            if self.tracker is not None:
                self.tracker.close()
        except OSError as e:
            self._give_up(e, "at the end")
        self._file, self.tracker = None, None
