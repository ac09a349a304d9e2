"""Crash-safe, self-describing checkpoints, and finding the one to resume from.

A checkpoint is a directory `<output_dir>/checkpoints/step-<N>/` holding
  - the model (safetensors) and tokenizer, loadable with `from_pretrained`;
  - `training_state.pt`: optimizer, LR scheduler, grad scaler and RNG states
    (read back with `torch.load(weights_only=True)`: tensors and plain values only);
  - `state.json`: epoch, step, position in the epoch's data order, counters, evals;
  - `config.yaml`: the resolved config of the run.
It is built under a `.staging-*` name, every file is fsynced, then it is published by an
atomic rename and the parent directory is fsynced. A reader therefore sees a complete
checkpoint or none. `state.json`, written last, lists every file's size (always checked on
resume) and, with `checkpoint_hashes`, its SHA-256 (checked too: minutes for a 7B model, so
off by default); a checkpoint that fails the check is skipped.

The loop talks to a `Checkpointer` (`checkpointers.py`: full, sharded or adapter-only) and does not care
which kind; this module is what they share: the directory's layout, its atomic publication, rotation, and the
checkpoint to resume from.

    sftune train --config configs/quickstart.yaml --output-dir runs/qs --save-every 50
    sftune train --config configs/quickstart.yaml --output-dir runs/qs --save-every 50 --resume auto
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from sftune.console import log
from sftune.dist import Dist
from sftune.errors import SftuneError
from sftune.shards import DCP_METADATA, WHOLE_MODEL, first_failure

STATE_FILE = "state.json"
TRAINING_STATE = "training_state.pt"
WEIGHT_FILES = (WHOLE_MODEL, DCP_METADATA, "adapter_model.safetensors")  # whole, sharded (DCP), LoRA
FORMAT_VERSION = 1


@dataclass
class TrainState:
    """Where a run stands after an optimizer step; enough to continue it exactly."""

    epoch: int = 0  # epoch in progress
    step_in_epoch: int = 0  # optimizer steps of this epoch already done
    step: int = 0  # optimizer steps done in all
    micro_step: int = 0  # micro-batches done inside the current step: always 0, saves happen between steps
    tokens: int = 0  # non-pad tokens trained on
    padded_tokens: int = 0  # tokens computed, padding included
    elapsed_s: float = 0.0  # training time before this process
    window: dict = field(default_factory=dict)  # the log window's accumulators, so logged values continue exactly
    stream: dict | None = None  # streaming: the StreamPosition in the current epoch
    evals: list = field(default_factory=list)
    run_id: str = ""  # made at a fresh start and kept by resumes: checkpoint rotation touches only this run's
    fingerprints: dict = field(default_factory=dict)  # {"data": ..., "tokenizer": ...}: what resume must find again
    world_size: int = 1  # ranks that trained it (batch_size is per rank: a resume on another count must keep the steps)
    best_step: int | None = None  # the evaluation (after step 0) with the lowest val loss so far


def rng_state() -> dict:
    _, py_key, py_gauss = random.getstate()
    _, np_key, np_pos, _, _ = np.random.get_state()
    state = {  # plain lists and tensors only, so torch.load(weights_only=True) can read them back
        "python": list(py_key) + [py_gauss if py_gauss is not None else -1],
        "numpy": np_key.tolist() + [int(np_pos)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((3, tuple(int(x) for x in py[:-1]), None if py[-1] == -1 else float(py[-1])))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np.asarray(np_state[:-1], dtype=np.uint32), int(np_state[-1]), 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seal_tree(path: Path) -> None:
    """Ready `path`'s files to be published: each with the mode an ordinary new file gets (0o666 less the umask,
    as `open` gives config.json: safetensors 0.8 writes its files 0o600, so that another user or a container's
    could not load the model or adapter; safetensors issue 782), then on disk (fsync)."""
    mode = 0o666 & ~current_umask()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            os.chmod(p, mode)
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def current_umask() -> int:
    """The process's umask, read without changing it (Linux shows it in /proc; elsewhere it is set and restored,
    which for an instant applies to every thread)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o077)
        os.umask(umask)
        return umask


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def weights_finite(model, dist: Dist | None = None) -> bool:
    """True when every parameter is finite, on every rank (FSDP: each rank checks its shards). note: syncs."""
    with torch.no_grad():
        params = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
        ok = bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) if params else True
    return not dist.any(not ok) if dist is not None else ok


def save_checkpoint(root: Path, write_model, optimizer, scheduler, scaler, state: TrainState,
                    config_yaml: str, keep_last: int, hashes: bool = False, rng_ranks: list | None = None,
                    protected: int | None = None) -> Path:
    """Write `root/step-<N>` atomically (`write_model(directory)` writes the model's files), then remove all but
    the newest `keep_last` complete ones (and `step-<protected>`)."""
    final = root / f"step-{state.step}"
    staging = None
    try:
        staging = new_staging(root, state.step)
        write_model(staging)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "rng": rng_state(), "rng_ranks": rng_ranks or []},
                   staging / TRAINING_STATE)
        (staging / "config.yaml").write_text(config_yaml)
        if os.environ.get("SFTUNE_FAULT_SLOW_SAVE"):  # test hook: hold the staging phase open for a kill test
            time.sleep(float(os.environ["SFTUNE_FAULT_SLOW_SAVE"]))
        publish(staging, final, state, hashes)
    except Exception as e:  # ENOSPC surfaces as OSError, RuntimeError (torch.save) or SafetensorError
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise write_failed(final, e) from None
    rotate(root, state.run_id, keep_last, protected)
    return final


def new_staging(root: Path, step: int) -> Path:
    """An empty `root/.staging-step-N`, after removing any staging directory a killed process left behind."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".staging-*"):  # left by a process killed mid-save: never a checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    staging = root / f".staging-step-{step}"
    staging.mkdir()
    return staging


def publish(staging: Path, final: Path, state: TrainState, hashes: bool) -> None:
    """Write state.json last (every other file with its size, and hash), fsync, and rename into place."""
    files = {str(f.relative_to(staging)): [f.stat().st_size, _sha256(f) if hashes else None]
             for f in sorted(staging.rglob("*")) if f.is_file()}
    (staging / STATE_FILE).write_text(json.dumps({"format": FORMAT_VERSION, "files": files, **asdict(state)}, indent=1))
    seal_tree(staging)
    if final.exists():  # a checkpoint of the same step from an earlier attempt: replace it
        shutil.rmtree(final)
    os.rename(staging, final)
    _fsync_dir(final.parent)


def remove_run_checkpoints(root: Path, run_id: str) -> int:
    """Remove every complete checkpoint of run `run_id` under `root` (never another run's); how many."""
    ours = [c for c in complete_checkpoints(root) if run_id_of(c) == run_id] if root.is_dir() else []
    for checkpoint in ours:
        shutil.rmtree(checkpoint, ignore_errors=True)
    with contextlib.suppress(OSError):  # (empty now, unless another run's are there)
        root.rmdir()
    return len(ours)


def rotate(root: Path, run_id: str, keep_last: int, protected: int | None = None) -> None:
    """Remove all but this run's newest `keep_last` checkpoints (never another run's, never `step-<protected>`)."""
    ours = [c for c in complete_checkpoints(root) if run_id_of(c) == run_id and c.name != f"step-{protected}"]
    for old in ours[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


class CheckpointNotWritten(SftuneError):
    """A checkpoint that could not be written (a full disk): nothing of it is left, the earlier ones are intact.
    `cause`: what failed, in a line."""

    def __init__(self, final: Path, cause: str):
        self.cause = cause
        super().__init__(f"could not write checkpoint {final}: {cause}. Earlier checkpoints are intact; "
                         f"free disk space and resume with --resume auto")


def write_failed(final: Path, e: BaseException) -> CheckpointNotWritten:
    """`e` in a line (DCP's error: the first failing rank's), saying so when the disk is full (torch.save on a full
    disk says only "unexpected pos 704 vs 598"). Called once the partial checkpoint is removed."""
    prefix, e = first_failure(e)
    text = str(e)
    cause = prefix + ((text.strip().splitlines() or [type(e).__name__])[0][:300])
    full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in text or "unexpected pos" in text
    where = next((p for p in (final, *final.parents) if p.exists()), None)
    if full and where is not None:
        cause += f" (the disk is full: {shutil.disk_usage(where).free / 2**20:,.1f} MB free there without it)"
    return CheckpointNotWritten(final, cause)


def run_id_of(path: Path) -> str | None:
    try:
        return json.loads((path / STATE_FILE).read_text()).get("run_id", "")
    except (OSError, ValueError):
        return None


def _step_of(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_ok(path: Path) -> bool:
    """A checkpoint is usable when state.json is readable and every file it lists has its size (and its
    hash, when one was recorded)."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        files = state["files"]
        has_weights = any(name in files for name in WEIGHT_FILES)
        if state.get("format") != FORMAT_VERSION or TRAINING_STATE not in files or not has_weights:
            return False
        return all((path / name).stat().st_size == size and (digest is None or _sha256(path / name) == digest)
                   for name, (size, digest) in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def complete_checkpoints(root: Path) -> list[Path]:
    """Published checkpoints, oldest first (staging directories are never listed)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=_step_of)


def find_resume_checkpoint(output_dir: Path, resume: str) -> Path | None:
    """`resume` = 'auto' (newest good checkpoint under output_dir, or None to start fresh) or a path."""
    if resume != "auto":
        path = Path(resume)
        if not path.exists():  # (a typo, or a checkpoint rotated away by --keep-last)
            where = path.parent if complete_checkpoints(path.parent) else output_dir / "checkpoints"
            there = ", ".join(p.name for p in complete_checkpoints(where))
            raise SftuneError(f"--resume {resume}: no such checkpoint; " + (
                f"{where} holds {there}: give one of them, or --resume auto for the newest" if there else
                "give a checkpoint directory (<output_dir>/checkpoints/step-N), or --resume auto"))
        if not checkpoint_ok(path):
            raise SftuneError(f"--resume {resume}: not a complete sftune checkpoint (needs {STATE_FILE}, "
                              f"{TRAINING_STATE} and the weights); use --resume auto")
        return path
    for path in reversed(complete_checkpoints(output_dir / "checkpoints")):
        if checkpoint_ok(path):
            return path
        log(f"warning: checkpoint {path} is incomplete or corrupted; skipping it")
    return None


def load_training_state(path: Path, load_optimizer, scheduler, scaler, rank: int = 0, mmap: bool = False) -> TrainState:
    """Restore optimizer, scheduler, scaler and RNG states from checkpoint `path`; return its TrainState.
    `load_optimizer` is given the saved optimizer state (None: it is not in training_state.pt, as a sharded
    checkpoint keeps it in DCP). `mmap`: the tensors are read from the file as they are used, through the page
    cache, which every rank of a node shares (rather than one private copy of the whole state per rank)."""
    try:
        blob = torch.load(path / TRAINING_STATE, map_location="cpu", weights_only=True, mmap=mmap)
        raw = json.loads((path / STATE_FILE).read_text())
    except Exception as e:  # a truncated or foreign file: say which and what to do
        raise SftuneError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); "
                          f"remove it or pass another --resume PATH") from None
    if load_optimizer is not None:
        load_optimizer(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    scaler.load_state_dict(blob["scaler"])
    ranks = blob.get("rng_ranks") or []
    set_rng_state(ranks[rank] if rank < len(ranks) else blob["rng"])
    raw.pop("format", None)
    raw.pop("files", None)
    return TrainState(**raw)
