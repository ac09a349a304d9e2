"""Graceful preemption: SIGTERM, SIGINT or SIGHUP finish the current optimizer step, save, and exit.

The exit status is 128 + the signal's number (143 for SIGTERM, 130 for SIGINT, 129 for SIGHUP), as a
shell reports a process killed by that signal, so schedulers see the usual codes; a checkpoint has
been written and `--resume auto` continues. A second SIGINT aborts at once.

SIGHUP is the terminal going away (a dropped SSH session, a closed terminal window): by default it
kills the process and every step since the last checkpoint (all of them, without `--save-every`).
Once the terminal is gone, writing to it fails (EIO), so the output that went to it goes to
/dev/null from then on; the run's metrics, TensorBoard events and checkpoints are files and carry on.
"""

from __future__ import annotations

import contextlib
import os
import signal

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


class Preempted(BaseException):
    """Raised after the checkpoint is written (or, before the first step, where the signal found the process);
    `code` is the process exit status to use. A BaseException, as KeyboardInterrupt is: raised from the signal
    handler inside a library call, it must not be caught as that call's failure (`except Exception`)."""

    def __init__(self, signum: int, checkpoint):
        self.signum = signum
        self.code = 128 + signum
        self.checkpoint = checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint else "before the first step: nothing was trained or saved"
        super().__init__(f"stopped by {signal.Signals(signum).name}; {where}")


class StopFlag:
    def __init__(self, terminals: tuple[int, ...] = ()):
        self.signum: int | None = None
        self.terminals = terminals  # stdout/stderr's descriptors that were a terminal when the run started
        # while set, a signal stops the process where it is (`Preempted` raised from the handler, as Ctrl-C's
        # KeyboardInterrupt is): for a single process's preparation (reading, tokenizing, loading), which can take
        # minutes and has nothing to save; the run's directory is not written yet
        self.at_once = False

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: abort now
        if signum == getattr(signal, "SIGHUP", None):
            detach(self.terminals)
        self.signum = signum
        if self.at_once:
            self.at_once = False
            raise Preempted(signum, None)

    @contextlib.contextmanager
    def stops_at_once(self, when: bool = True):
        """Within the block (when `when`), a signal stops at once; one that came before stops here."""
        if when and self.signum is not None:
            raise Preempted(self.signum, None)
        self.at_once = when
        try:
            yield
        finally:
            self.at_once = False


def detach(fds: tuple[int, ...]) -> None:
    """Point `fds` at /dev/null: what is still printed after a hangup goes nowhere instead of failing (also what
    C code prints, which `console.KeepsWriting` does not see)."""
    from sftune.console import to_devnull

    for fd in fds:
        to_devnull(fd)


@contextlib.contextmanager
def stop_on_signals():
    """Within the block, SIGTERM/SIGINT/SIGHUP set `flag.signum` instead of killing the process."""
    flag = StopFlag(tuple(fd for fd in (1, 2) if os.isatty(fd)))
    previous = {s: signal.getsignal(s) for s in SIGNALS}
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
