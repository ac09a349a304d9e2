"""`sftune train --nproc-per-node N` (and `eval`): the ranks of one node started by sftune itself.

What `torchrun --standalone --nproc-per-node N -m sftune train ...` does, run in this process with torch's own
launcher (`torch.distributed.run`: the same elastic agent, rendezvous and signal forwarding), so that one command
trains on every GPU of a machine (as torchtune's `tune run --nproc_per_node` and `accelerate launch` do) and its
endings read as sftune's others do: a mistake is said once by a rank and the exit status is that rank's (torchrun
adds a `ChildFailedError` traceback and exits 1); SIGTERM, SIGINT or SIGHUP reach every rank, which stop at the same
step and save, and the exit status is 128 + the signal (torchrun prints a `SignalException` traceback); a rank
killed by a signal (`kill -9`, the kernel's out-of-memory killer) is named in one line. Several nodes are still
torchrun's (README: "Several GPUs and nodes").
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from sftune.dist import LAUNCH_GRACE_S, shutdown_timeout_supported
from sftune.errors import SftuneError

FLAG = "--nproc-per-node"


def processes(value: str) -> int:
    """How many processes `--nproc-per-node VALUE` starts: a count, or `auto` (one per visible GPU; one process
    where there is none). Refused under torchrun, which started the ranks already."""
    if os.environ.get("WORLD_SIZE") is not None:
        raise SftuneError(f"{FLAG} {value}: this process is already one of torchrun's ranks (WORLD_SIZE="
                          f"{os.environ['WORLD_SIZE']}); leave out {FLAG} (torchrun's own sets the ranks) or run "
                          f"sftune without torchrun")
    if value == "auto":
        import torch

        return max(torch.cuda.device_count(), 1)
    if not value.isdigit() or int(value) < 1:
        raise SftuneError(f"{FLAG} {value}: must be a number of processes, 1 or more, or auto (one per GPU)")
    return int(value)


def without_flag(argv: list[str]) -> list[str]:
    """The command line for each rank: `argv` less `--nproc-per-node N` (or `--nproc-per-node=N`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == FLAG:
            skip = True
        elif not arg.startswith(FLAG + "="):
            out.append(arg)
    return out


def grace_environment(env, supported: bool) -> dict[str, str]:
    """What the launch adds to its environment so that its agent waits `LAUNCH_GRACE_S` (not torchrun's 30 s) for
    the ranks to stop after it passes on a signal, where this torch can (2.12 on) and the user set no time of their
    own. The ranks inherit it, and `dist.stop_grace_s` reads it there."""
    if not supported or env.get("PET_SHUTDOWN_TIMEOUT") or env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        return {}
    return {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(LAUNCH_GRACE_S)}


def launch(command: str, argv: list[str], n: int) -> int:
    """Run `python -m sftune ARGV` as `n` ranks on this node; the exit status of the launch (see the module)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from sftune.data.tokenize import usable_cores

    threads = max(1, usable_cores() // n)  # (a container's CPU quota too)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # (torchrun's is 1, with a warning)
    os.environ.update(grace_environment(os.environ, shutdown_timeout_supported()))
    print(f"sftune {command}: {n} processes on this node (as torchrun --standalone --nproc-per-node {n} starts "
          f"them), OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} each", file=sys.stderr, flush=True)
    # the agent's own lines, said below instead (its loggers' names are derived from file paths, so not all are
    # under "torch."; nothing else logs in this process)
    logging.disable(logging.ERROR)
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={n}", "-m", "sftune", *argv]))
    except ChildFailedError as e:
        rank, failure = root_failure(e.failures)
        if failure.exitcode >= 0:  # the rank said why before it exited
            return failure.exitcode or 1
        name = signal.Signals(-failure.exitcode).name
        why = " (the kernel's out-of-memory killer sends it when the host's memory runs out)" \
            if name == "SIGKILL" else ""
        print(f"sftune {command}: rank {rank} (pid {failure.pid}) was killed by {name}{why}; the other ranks were "
              f"stopped. What was saved is intact: continue with --resume auto", file=sys.stderr)
        return 128 - failure.exitcode
    except SignalException as e:  # (forwarded to every rank, which stopped, saved and said so)
        return 128 + int(e.sigval)
    return 0


def root_failure(failures: dict) -> tuple:
    """(rank, failure) of the rank whose failure ended the launch. The agent records every rank it found stopped,
    those it stopped itself too (SIGTERM), in no reliable order (it looks every 0.1 s, and times each failure by when
    it saw it), so the cause is chosen by its kind: a rank that said its own error (exit status 2 and up: a mistake,
    a divergence, a signal it handled), else one killed by another signal than the agent's (SIGKILL: `kill -9`, the
    out-of-memory killer; SIGSEGV, SIGABRT: a crash), else one that exited 1 (a failed collective, or a traceback,
    said), else any; the lowest rank among equals."""
    stopping = {-int(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}

    def kind(code: int) -> int:
        return 0 if code >= 2 else 1 if code < 0 and code not in stopping else 2 if code >= 0 else 3

    return min(failures.items(), key=lambda rf: (kind(rf[1].exitcode), rf[0]))
