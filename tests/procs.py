"""Real `sftune train` processes for the fault tests, started without paying the imports each time.

Each process is forked from a server (multiprocessing's "forkserver") that imported torch, transformers, peft and
sftune once: a real child process with its own pid, which a test signals or kills -9 and whose exit status it
reads, running `sftune.cli.main(argv)` as `python -m sftune` does. Starting one costs a fork, where a new
interpreter costs about 3 s of imports on 2 cores. The entry point itself (`python -m sftune`) is run by the tests
that are about it (`conftest.run_cli`: the quickstart, errors in a real process).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

PRELOAD = ["torch", "transformers", "peft", "sftune.cli", "sftune.train", "sftune.lora",
           "transformers.models.gpt2.modeling_gpt2"]
_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)  # (imported once, in the server, before it forks anything)
    return _CONTEXT


def _run(argv: list[str], cwd: str, env: dict, stderr: str) -> None:
    """The child: `sftune ARGV` in `cwd`, its stderr (and tqdm's) into the file `stderr`, stdout discarded."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path, flags in ((1, os.devnull, os.O_WRONLY), (2, stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    from sftune.cli import main, quick_exit
    from sftune.console import keep_writing

    keep_writing()  # (as `cli.entry`)
    quick_exit(main(argv))


class SftuneProcess:
    """`sftune ARGV` running in a forked child: `pid`, `send_signal`, `kill`, `wait`, and its stderr as it grows."""

    def __init__(self, argv: list[str], cwd: Path, stderr: Path, env: dict | None = None):
        self.stderr_path = stderr
        self.process = _context().Process(target=_run, args=(list(argv), str(cwd), {**os.environ, **(env or {})},
                                                             str(stderr)))
        stderr.write_bytes(b"")  # (there to read before the child opens it)
        self.process.start()
        self.pid = self.process.pid

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self.process.kill()

    def poll(self) -> int | None:
        return self.process.exitcode  # None while it runs; -N when signal N ended it

    def wait(self, timeout: float = 120) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
            raise TimeoutError(f"sftune did not end within {timeout} s")
        return self.process.exitcode

    def stderr(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""

    def lines(self, poll: float = 0.002):
        """Its stderr line by line as it is written (a pipe's pace: the file is polled every 2 ms), until it ends."""
        offset, partial = 0, ""
        while True:
            ended = self.poll() is not None  # (read after: nothing it wrote before ending is missed)
            with open(self.stderr_path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            *complete, partial = (partial + chunk.decode(errors="replace")).split("\n")
            yield from (line + "\n" for line in complete)
            if ended:
                if partial:
                    yield partial
                return
            if not chunk:
                time.sleep(poll)


def _rank(target: str, env: dict, argv: list[str]) -> None:
    """A child: `target` ("module:function") called with `argv`, in the environment torchrun would give a rank."""
    import importlib
    import sys

    os.environ.update(env)
    module, function = target.split(":")
    sys.exit(getattr(importlib.import_module(module), function)(*argv) or 0)


def start_ranks(target: str, world: int, argv: list[str], per_node: int | None = None) -> list:
    """`world` forked processes calling `target` ("module:function", importable here) that meet as torchrun's ranks
    would (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK and LOCAL_RANK set by hand): multiprocessing Processes with
    `exitcode`, `join`, `kill`."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world), "RANK": str(rank),
               "LOCAL_RANK": str(rank % (per_node or world)), "OMP_NUM_THREADS": "1"}
        procs.append(_context().Process(target=_rank, args=(target, env, list(argv))))
        procs[-1].start()
    return procs
