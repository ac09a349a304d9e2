"""The run's output directory: choosing it, owning it, and publishing into it without losing anything.

Owns the rules that keep runs apart and work safe:
  - a non-empty directory is refused unless --resume or --overwrite says what to do with it;
  - it must be writable before anything is loaded (minutes of loading end in a clear error, not a traceback);
  - one run at a time: an exclusive OS lock (`.sftune.lock`, holding the owner's PID and host) for the whole run,
    released on any exit by the OS itself, so a crashed run leaves no stale lock;
  - under torchrun, one directory for all nodes: every rank must see rank 0's lock file (`check_shared`);
  - --overwrite sets nothing of the old run aside for the new one: its checkpoints, metrics, model and
    report are removed (and listed) before the new run writes; other files are left alone;
  - the final model is staged and then published file by file with atomic renames; when that fails, the
    weights are written to a rescue directory instead, and the message says where.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

from sftune.console import log
from sftune.errors import SftuneError

LOCK_FILE = ".sftune.lock"
# what an sftune run writes into its output directory (besides the model files, which come from save_pretrained)
RUN_FILES = ("checkpoints", "metrics.jsonl", "metrics.tmp", "config.yaml", "report.html", "loss.png", "tensorboard",
             ".staging-final", "base", "merged", "data.json", "README.md")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
               "added_tokens.json", "chat_template.jinja", "tokenizer.model", "adapter_config.json",
               "adapter_model.safetensors")


def resolve_output_dir(requested: str | None) -> Path:
    """`requested`, or runs/<timestamp>; a path that cannot hold a run is a clear error."""
    if requested is not None:
        try:
            requested.encode("utf-8")
        except UnicodeEncodeError:
            raise SftuneError(f"output directory {requested!r} has a name that is not UTF-8; choose another "
                              f"--output-dir") from None
    out = Path(requested) if requested else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if out.is_symlink() and not out.exists():
        raise SftuneError(f"output directory {out} is a symbolic link to nothing ({os.readlink(out)}); remove it or "
                          f"choose another --output-dir")
    if out.exists() and not out.is_dir():
        raise SftuneError(f"output path {out} is a file, not a directory; choose another --output-dir")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise SftuneError(f"output directory {out} cannot be made: {parent} is a file; choose another "
                                  f"--output-dir")
            break
    return out


def is_empty(out: Path) -> bool:
    return not out.exists() or all(p.name == LOCK_FILE for p in out.iterdir())


def check_output_dir(out: Path, resume: bool, overwrite: bool, flag: str = "--output-dir") -> None:
    """Refuse a non-empty directory unless `resume` or `overwrite`, and one we could not write into. `flag`: the
    option that named it (`sftune export`'s is --merge, and it has nothing to resume)."""
    if not is_empty(out) and not (resume or overwrite):
        again = ", continue it with --resume auto," if flag == "--output-dir" else ""
        raise SftuneError(f"output directory {out} already exists and is not empty; choose another {flag}{again} "
                          f"or pass --overwrite")
    if overwrite and not resume and flag == "--output-dir" and (mine := not_a_runs_files(out)):
        raise SftuneError(f"--overwrite removes what an earlier sftune run wrote in {out}, but nothing there is one "
                          f"(no metrics.jsonl, checkpoints or run config.yaml), and it would remove {', '.join(mine)}: "
                          f"files of yours; choose another --output-dir")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SftuneError(f"cannot write into {existing} (permission denied), so nothing could be saved there; "
                          f"choose another {flag}")


def not_a_runs_files(out: Path) -> list[str]:
    """The files `clear_previous_run` would remove from `out` when `out` holds no sftune run (a project directory's
    README.md and config.yaml, a downloaded model's files): [] when it holds one, or none of those names."""
    names = [n for n in (*RUN_FILES, *MODEL_FILES) if (out / n).exists() or (out / n).is_symlink()]
    if not names or (out / "metrics.jsonl").is_file() or any((out / "checkpoints").glob("step-*")):
        return []
    # (a run that stopped before its first evaluation wrote config.yaml and data.json only; a config.yaml of the
    # user's own, beside no data.json, is theirs)
    from sftune.config import run_config

    return [] if (out / "data.json").is_file() and run_config(out) is not None else names


def finished_without_checkpoints(out: Path) -> bool:
    """A completed run (its final model is there) that kept no checkpoint: nothing to resume."""
    ckpts = out / "checkpoints"
    has_ckpt = ckpts.is_dir() and any(p.name.startswith("step-") for p in ckpts.iterdir())
    saved = (out / "model.safetensors").is_file() or (out / "adapter_model.safetensors").is_file()
    return saved and (out / "metrics.jsonl").is_file() and not has_ckpt


class OutputLock:
    """An exclusive lock on the output directory for the life of this process (flock: released by the OS on
    any exit, kill -9 included, so it is never stale)."""

    def __init__(self, out: Path):
        self.out = out
        self.fd: int | None = None
        self.owner = f"{os.getpid()} on {socket.gethostname()}"  # what the lock file says while this run holds it
        self.created: list[Path] = []  # the directories `acquire` made, deepest first

    def acquire(self) -> None:
        self.created = [d for d in (self.out, *self.out.parents) if not d.exists()]
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # (a parent that is a file, a file system that makes no directories, no permission)
            raise SftuneError(f"could not create the output directory {self.out}: {e.strerror or e}; choose another "
                              f"--output-dir") from None
        path = self.out / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SftuneError(f"output directory {self.out} is in use by another sftune run (process {owner}); "
                                  f"wait for it to finish, or choose another --output-dir") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.owner}\n".encode(), 0)
        os.fsync(fd)  # (on NFS: what other nodes read when they check they see this directory)
        self.fd = fd

    def release(self) -> None:
        """Release the lock; a directory this run made and left empty (it stopped before writing: a refused resume,
        a config mistake found late) is removed again, so that no litter is left behind."""
        if self.fd is None:
            return
        if self.created and [p.name for p in self.out.iterdir()] == [LOCK_FILE]:
            (self.out / LOCK_FILE).unlink()  # (while the lock is still held)
            for directory in self.created:
                try:
                    directory.rmdir()
                except OSError:  # not empty (something else was written there meanwhile): kept
                    break
        os.close(self.fd)  # closing the descriptor releases the lock
        self.fd = None


def claim_new_run_dir() -> tuple[Path, OutputLock]:
    """The default output directory, runs/<time> (then runs/<time>-2, -3 ...: a name no other run holds), made and
    locked at once: two runs started in the same second both took runs/<time>, and the second failed when it came to
    write, after loading its data and model. Released (and removed while empty) as any lock is."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for k in range(1, 1000):
        out = resolve_output_dir(str(Path("runs") / (stamp if k == 1 else f"{stamp}-{k}")))
        if not is_empty(out):  # (an earlier run's)
            continue
        lock = OutputLock(out)
        try:
            lock.acquire()
        except SftuneError:  # in use: another run made it a moment ago
            continue
        return out, lock
    raise SftuneError(f"no free name for a run under runs/ ({stamp}-2 to -999 are taken); give --output-dir")


SHARED_WAIT_S = 15.0  # how long a rank that cannot see rank 0's lock file yet keeps looking (NFS caches lookups)


def check_shared(out: Path, lock: OutputLock, dist) -> None:
    """Under torchrun every rank must see the directory rank 0 locked, on a filesystem every node mounts: else each
    node would write its own checkpoint shards, and a resume would find another checkpoint (or none) on each node.
    A collective: every rank learns which ranks see another directory, and all stop together."""
    if not dist.distributed:
        return
    owner = dist.gather(lock.owner)[0]  # rank 0's lock file names its process and host
    deadline = time.monotonic() + SHARED_WAIT_S
    while True:
        try:
            seen = (out / LOCK_FILE).read_text().strip()
        except OSError:
            seen = None  # not there (yet, on a filesystem slow to show a new file)
        if seen or time.monotonic() > deadline:  # (another owner's file: a different directory)
            break
        time.sleep(0.5)
    views = dist.gather((seen == owner, socket.gethostname()))
    blind = [f"{rank} (on {host})" for rank, (sees, host) in enumerate(views) if not sees]
    if blind:
        raise SftuneError(
            f"output directory {out} is not the same directory on every node: rank{'s' * (len(blind) > 1)} "
            f"{', '.join(blind)} cannot see what rank 0 (on {views[0][1]}) wrote there, so checkpoints would be "
            f"scattered over the nodes. Put --output-dir on a filesystem that every node mounts at the same path "
            f"(an absolute path: a relative one depends on the directory each node was launched from)")


def clear_previous_run(out: Path) -> list[str]:
    """--overwrite: remove what an earlier run wrote here (never other files); returns the names removed."""
    removed = []
    for name in (*RUN_FILES, *MODEL_FILES):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        log(f"--overwrite: removed the previous run's {', '.join(removed)} from {out}")
    return removed


def publish_model(out: Path, write: Callable[[Path], None]) -> Path:
    """Write a model into `out` like a checkpoint: `write(directory)` writes its files into `out/.staging-final`,
    they are sealed (`seal_tree`: ordinary modes, fsync), then each is moved into `out` by an atomic rename. If that
    fails (a full disk), they are written to a rescue directory under the system's temporary directory instead and
    the error says where; files already in `out` are never left half-written."""
    from sftune.checkpoint import seal_tree

    staging = out / ".staging-final"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        write(staging)
        seal_tree(staging)
        for f in sorted(staging.iterdir()):
            os.replace(f, out / f.name)
        staging.rmdir()
        return out
    except Exception as e:  # ENOSPC surfaces as OSError, RuntimeError or SafetensorError
        shutil.rmtree(staging, ignore_errors=True)
        rescue = Path(tempfile.mkdtemp(prefix="sftune-rescue-"))
        try:
            write(rescue)
            kept = f"the trained model was written to {rescue} instead"
        except Exception:
            shutil.rmtree(rescue, ignore_errors=True)
            kept = "no space was found for the trained model either"
        raise SftuneError(f"could not write the final model to {out}: {e}; {kept}. metrics.jsonl and any "
                          f"checkpoints in {out.parent if out.name in ('merged', 'base') else out} are intact (free "
                          f"disk space, then --resume auto saves again from the last checkpoint)") from None
