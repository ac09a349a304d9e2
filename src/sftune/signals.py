"""Graceful preemption: SIGTERM or SIGINT finish the current optimizer step, save, and exit.

The exit status is 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), as a shell
reports a process killed by that signal, so schedulers see the usual codes; a checkpoint has
been written and `--resume auto` continues. A second SIGINT aborts at once.
"""

from __future__ import annotations

import contextlib
import signal


class Preempted(Exception):
    """Raised after the checkpoint is written; `code` is the process exit status to use."""

    def __init__(self, signum: int, checkpoint):
        self.signum = signum
        self.code = 128 + signum
        self.checkpoint = checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint else "before the first step: nothing was trained or saved"
        super().__init__(f"stopped by {signal.Signals(signum).name}; {where}")


class StopFlag:
    def __init__(self):
        self.signum: int | None = None

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: abort now
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals():
    """Within the block, SIGTERM/SIGINT set `flag.signum` instead of killing the process."""
    flag = StopFlag()
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for s in previous:
            signal.signal(s, flag._handle)
    except ValueError:  # not the main thread: leave signals alone
        previous = {}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
