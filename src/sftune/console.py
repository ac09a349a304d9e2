"""Human output and the metrics stream, kept apart.

Human log lines go to stderr (so `--json` output on stdout stays clean);
results a command was asked for go to stdout; metrics go to `metrics.jsonl`.
Only rank 0 prints or writes, so a later multi-process run needs no
`if rank == 0` at each call site.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sftune.dist import env_rank


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
