"""When the training loop saves, and what it says of its saves when it stops.

A checkpoint holds the state after a step whose update the non-finite guard has settled on (`update.py`: the
verdict is read on the host a step late), so `Saves` settles that verdict first, every time, and owns what a
skipped step leads to: a log line, and a stop with the last good state saved when too many come in a row.

    saves = Saves(run, guard, metrics, window, start)
    saves.settle()             # the last step's verdict, before anything logs or saves
    path = saves.checkpoint()  # --save-every, --save-best, an epoch's end, a signal
    saves.keep_the_steps()     # for an error's message: where the state after the last step is
"""

from __future__ import annotations

import time
from pathlib import Path

from sftune.checkpoint import CheckpointNotWritten, weights_finite
from sftune.console import MetricsWriter, log
from sftune.dist import LAUNCH_GRACE_S, shutdown_timeout_supported, stop_grace_s
from sftune.errors import TrainingDiverged
from sftune.progress import LogWindow
from sftune.update import NonFiniteGuard


class Saves:
    """The run's checkpoints as the loop writes them (`saved_at`, oldest first; a resumed run starts from the one
    it resumed from) and the non-finite guard's verdicts that precede each."""

    def __init__(self, run, guard: NonFiniteGuard, metrics: MetricsWriter, window: LogWindow, start: float):
        self.run, self.guard, self.metrics, self.window, self.start = run, guard, metrics, window, start
        self.saved_at: list[Path] = [run.resumed_from] if run.resumed_from else []
        self.last_saved = time.perf_counter()  # --save-minutes counts from this process's start or its last save
        self.bad_in_a_row = 0
        self.grace_said = False  # (`grace_notice`: said once a run)

    @property
    def newest(self) -> Path | None:
        return self.saved_at[-1] if self.saved_at else None

    def safety_due(self) -> bool:
        minutes = self.run.cfg.save_minutes
        return minutes is not None and time.perf_counter() - self.last_saved >= minutes * 60

    def settle(self) -> None:
        """Act on the last step's verdict: the guard decided on the device whether to apply its update; the host
        learns it here, at the next step or before anything that writes or logs."""
        if (verdict := self.guard.settle()) is None:
            return
        step, skipped = verdict
        if not skipped:
            self.bad_in_a_row = 0
            return
        run, cfg = self.run, self.run.cfg
        if not weights_finite(run.loss_model, run.dist):  # (rare: a sync only here) the update before broke them
            raise TrainingDiverged(
                f"the update of step {step - 1} made the weights non-finite (lr {run.scheduler.get_last_lr()[0]:g}); "
                f"nothing from it was saved. Lower --lr and resume from "
                f"{self.newest or 'the start (no checkpoint was written)'} with --resume auto")
        self.bad_in_a_row += 1
        self.metrics.write({"type": "skip", "step": step, "reason": "non-finite loss or gradient norm"})
        log(f"step {step:,}: non-finite loss or gradient norm, update skipped "
            f"({self.bad_in_a_row} in a row, limit --max-bad-steps {cfg.max_bad_steps})")
        if self.bad_in_a_row > cfg.max_bad_steps:
            path = self.checkpoint()  # the weights are those of the last good step: bad steps changed nothing
            raise TrainingDiverged(
                f"{self.bad_in_a_row} optimizer steps in a row had a non-finite loss or gradient norm (step {step}); "
                f"stopped with the last good state saved in {path}. Lower --lr, set --max-grad-norm, use "
                f"--precision fp32 or bf16, or raise --max-bad-steps; then --resume auto.")

    def overflowed(self, step: int, scale: float, lowered: float) -> None:
        """fp16's loss scaler skipped the update of `step`, whose gradients overflowed at `scale`: said (GradScaler
        says nothing; several in a row are its search for a scale at the start of a run, one every few thousand steps
        its test of a higher one). Below a scale of 1 the gradients overflow fp16 unscaled: the run has diverged, and
        stops with the last good state saved."""
        self.metrics.write({"type": "skip", "step": step, "reason": "fp16 gradients overflowed", "loss_scale": lowered})
        log(f"step {step:,}: fp16 gradients overflowed at loss scale {scale:,g}, update skipped; scale now {lowered:,g}")
        if lowered < 1:
            path = self.checkpoint()  # (the overflowing steps changed nothing)
            raise TrainingDiverged(
                f"fp16's loss scale fell to {lowered:g} (step {step}): the gradients overflow fp16 even unscaled; "
                f"stopped with the last good state saved in {path}. Lower --lr, set --max-grad-norm, or use "
                f"--precision bf16 (on a GPU from Ampere on) or fp32; then --resume auto.")

    def checkpoint(self) -> Path:
        """The state after the last step, saved (a collective under torchrun); its time out of the log window."""
        self.settle()  # (a skipped step is logged before the checkpoint that follows it)
        run, state = self.run, self.run.state
        started = time.perf_counter()
        state.window, state.elapsed_s = self.window.saved(run.dist), time.perf_counter() - self.start
        path = run.checkpointer.save(state, run.loss_model, run.optimizer, run.scheduler, run.scaler)
        log(f"checkpoint: {path}")
        self.saved_at.append(path)
        self.last_saved = time.perf_counter()
        took = time.perf_counter() - started
        self.window.exclude(took)
        if run.dist.distributed and not self.grace_said and (notice := grace_notice(took)):
            self.grace_said = True
            log(notice)
        return path

    def safety_checkpoint(self) -> None:
        """--save-minutes': a checkpoint for a crash. One that cannot be written (a full disk: a run that asked for
        no checkpoints should not stop for them) is a warning, and the next is tried later (every rank learns it
        from rank 0: `Checkpointer.save` raises on all)."""
        cfg = self.run.cfg
        try:
            self.checkpoint()
        except CheckpointNotWritten as e:
            if cfg.save_every or cfg.save_best:
                raise
            self.last_saved = time.perf_counter()
            log(f"warning: no checkpoint for safety at step {self.run.state.step} ({e.cause}); training goes on, and "
                f"the next is tried in {cfg.save_minutes:g} minutes (--save-minutes null: none)")

    def keep_the_steps(self, alone: bool = False) -> str:
        """Before a run stops on an error it can name: the state after its last step saved (unless it is already),
        and where. Under torchrun a rank that failed `alone` (ran out of memory, or its compile failed) cannot save:
        the other ranks wait for it in a collective (a step's gradient all-reduce, FSDP's gathers), so it names the
        newest checkpoint instead."""
        run, step = self.run, self.run.state.step
        if step == 0:
            return "nothing was trained yet, so nothing was saved"
        if self.newest is not None and self.newest.name == f"step-{step}":
            return f"the state after step {step} is saved in {self.newest}"
        if not (alone and run.dist.distributed):
            return f"the state after step {step} is saved in {self.checkpoint()}"
        run.dist.abandon()  # (its collectives cannot complete: the process group is left to the process's exit)
        newest = (f"the newest checkpoint is {self.newest} (--resume auto trains the "
                  f"{step - int(self.newest.name[5:])} step(s) after it again)" if self.newest is not None
                  else "no checkpoint was written yet")
        every = f"--save-minutes {run.cfg.save_minutes:g}" if run.cfg.save_minutes is not None else "--save-every N"
        return (f"the other ranks wait for this one in a collective, so this state cannot be saved (torchrun ends "
                f"them): {newest} ({every} saves more often)")


def grace_notice(took: float, grace: float | None = None, supported: bool | None = None) -> str | None:
    """A warning when a checkpoint took more than half the time torchrun gives the ranks to stop after it passes on
    a signal (`dist.stop_grace_s`): a stop (a scheduler's SIGTERM, Ctrl-C) must finish its step and save in that
    time, or torchrun kills the ranks in the save and the steps since the last checkpoint are lost (the checkpoint
    before it stays whole: saves are atomic). None otherwise, and when not under torchrun."""
    grace = stop_grace_s() if grace is None else grace
    if grace is None or took <= grace / 2:
        return None
    more = max(LAUNCH_GRACE_S, 60 * -(-int(4 * took) // 60))
    how = (f"start torchrun with --shutdown-timeout {more} (or TORCH_ELASTIC_SHUTDOWN_TIMEOUT={more} in its "
           f"environment; sftune train --nproc-per-node sets {LAUNCH_GRACE_S} itself)"
           if (shutdown_timeout_supported() if supported is None else supported) else
           f"torch 2.12 or later lets torchrun wait longer (--shutdown-timeout {more}); with this one, save more "
           f"often (--save-minutes) so that a cut save loses less")
    return (f"warning: this checkpoint took {took:.1f} s to write, and torchrun kills the ranks {grace:g} s after it "
            f"passes on a stop signal (SIGTERM, Ctrl-C): a stop, which finishes its step and saves, would be cut "
            f"short and the steps since the last checkpoint lost. To give it time, {how}")
