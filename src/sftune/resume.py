"""Whether a checkpoint may be resumed by this run, and what may differ.

A resume continues the same run or is refused, naming what changed and how to restore it (or `--resume-force`):
the settings that change training (`check_resume_compatible`; run controls such as `--eval-every`, `--strategy`
or `--dist-timeout` may change), the data, tokenizer and a LoRA base's weights (`check_same_inputs`, by content
fingerprints), and the rows of each optimizer step when the number of processes or the batch split changes
(`check_same_steps`: 2 ranks x 16 rows continue as 1 process x 32 rows; other rows in a step would not).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from sftune.checkpoint import STATE_FILE
from sftune.config import SFTConfig
from sftune.console import log
from sftune.errors import SftuneError, on_every_rank
from sftune.steps import InMemorySteps, StepSource, epoch_plan


PLAN_KEYS = ("batch_size", "grad_accum", "batch_tokens")  # with the world size, what splits a step's rows


def check_same_steps(checkpoint: Path, cfg: SFTConfig, steps: StepSource, max_length: int, world_size: int) -> tuple:
    """A run resumes on another number of processes when the rest of it takes the same rows in each optimizer step:
    `batch_size` is per process, so 2 ranks x 16 rows continue as 1 process x 32 rows, or x 16 rows x `grad_accum` 2
    (the loss is token-weighted over the whole step: only the order of float sums changes). Compares the plans of
    the epoch in progress and the next; returns the keys that may then differ from the checkpoint's config.
    --resume-force continues with other steps, as it continues with other settings."""
    import yaml

    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
        written = yaml.safe_load((checkpoint / "config.yaml").read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return ()  # (an unreadable checkpoint is reported where it is loaded)
    saved_world, epoch = state.get("world_size", 1), state.get("epoch", 0)
    saved = {k: written.get(k, getattr(cfg, k)) for k in PLAN_KEYS}
    if saved_world == world_size and all(saved[k] == getattr(cfg, k) for k in PLAN_KEYS):
        return ()  # nothing that splits the steps changed (any other change is `check_resume_compatible`'s)
    rows = saved["batch_size"] * saved["grad_accum"] * saved_world
    here = f"{world_size} process(es) x batch {cfg.batch_size} x accum {cfg.grad_accum}"
    there = f"{saved_world} process(es) x batch {saved['batch_size']} x accum {saved['grad_accum']}"
    then = replace(cfg, **saved)
    same = isinstance(steps, InMemorySteps) and all(
        [_rows(s) for s in epoch_plan(steps.data, then, max_length, e, saved_world)]
        == [_rows(s) for s in steps.plan(e)] for e in (epoch, epoch + 1))
    if same:
        log(f"resuming a run of {there} as {here}: the same {rows} rows in each step and the same optimizer state; "
            f"only the order of float sums (and any dropout's random masks) differs")
        return PLAN_KEYS
    if cfg.resume_force:
        log(f"warning: resuming a run of {there} as {here} because --resume-force is set: the steps from here on "
            f"hold other rows than the run's would have")
        return PLAN_KEYS
    fix = (f"keep {rows} rows a step, e.g. --batch-size {rows // world_size} --grad-accum 1"
           if rows % world_size == 0 and not cfg.streaming and not cfg.batch_tokens else "")
    why = ("a stream's steps are not known ahead, so they cannot be compared" if cfg.streaming else
           "the token cap --batch-tokens is per process" if cfg.batch_tokens else "")
    raise on_every_rank(SftuneError(
        f"cannot resume from {checkpoint} with {here}: it was written by a run of {there} ({rows} rows a step), and "
        f"the rest of the run would take other rows in each step{f' ({why})' if why else ''}. Resume with torchrun "
        f"--nproc-per-node {saved_world}{' (or without torchrun)' if saved_world == 1 else ''} and its settings"
        f"{f', or {fix}' if fix else ''}"))


def _rows(step: list) -> list[int]:
    """The example indices of a planned step, sorted (micro-batches, packed rows and ranks split them anyhow)."""
    return sorted(int(i) for micro in step for item in micro for i in np.atleast_1d(item))


def check_same_inputs(checkpoint: Path, fingerprints: dict, force: bool) -> None:
    """Refuse to resume when the data or the tokenizer changed since the checkpoint (content, not names), or a
    LoRA run's base weights (their files' sizes and times)."""
    try:
        saved = json.loads((checkpoint / STATE_FILE).read_text()).get("fingerprints") or {}
    except (OSError, ValueError):
        saved = {}
    what = {"data": "the training data (--dataset) changed", "tokenizer": "the tokenizer (--tokenizer/--model) changed",
            "base": "the base model's weights (--model) changed"}
    changed = [what[k] for k in what if k in saved and k in fingerprints and saved[k] != fingerprints[k]]
    if not changed:
        return
    if force:
        log(f"warning: resuming although {' and '.join(changed)}, because --resume-force is set")
        return
    raise SftuneError(f"cannot resume from {checkpoint}: {' and '.join(changed)} since it was written, so the "
                      f"rest of the run would not continue the same one. Restore them, start a new run in another "
                      f"--output-dir, or pass --resume-force to continue anyway.")


# Keys that set the shapes of what a checkpoint holds (the adapter's matrices, DoRA's magnitudes, the embedding rows
# of added tokens): a checkpoint of other values cannot be loaded, so no --resume-force lets them differ.
SHAPE_KEYS = {"lora_r", "lora_targets", "lora_modules_to_save", "lora_use_dora", "add_tokens"}


def as_flag(value) -> str:
    """A config value as a flag takes it: a list's items apart (`""` for none), null as null."""
    if isinstance(value, list):
        return " ".join(str(v) for v in value) or '""'
    return "null" if value is None else str(value)


def check_resume_compatible(checkpoint: Path, resolved: dict, force: bool, may_differ: tuple = ()) -> None:
    """Refuse to resume when a setting that changes training differs from the checkpoint's (but `may_differ`)."""
    import yaml

    from sftune.config import RUN_CONTROL_KEYS, SFTConfig, to_dict

    # keys added to sftune after the checkpoint was written count as their defaults
    saved = {**to_dict(SFTConfig()), **(yaml.safe_load((checkpoint / "config.yaml").read_text()) or {})}
    differing = sorted(k for k, v in resolved.items()
                       if k not in RUN_CONTROL_KEYS and k not in may_differ and saved.get(k) != v)
    if not differing:
        return
    detail = ", ".join(f"{k}: {saved.get(k)!r} -> {resolved[k]!r}" for k in differing)
    if shaping := [k for k in differing if k in SHAPE_KEYS]:
        keys = ", ".join(f"{k} {saved.get(k)!r} -> {resolved[k]!r}" for k in shaping)
        flags = " ".join(f"--{k.replace('_', '-')} {as_flag(saved.get(k))}" for k in shaping)
        raise on_every_rank(SftuneError(
            f"cannot resume from {checkpoint}: {keys} changes the shapes of the trained tensors, which "
            f"--resume-force cannot bridge; restore {flags} as the checkpoint has them, or start a new run (another "
            f"--output-dir, or --overwrite)"))
    if force:
        log(f"warning: resuming with changed training settings ({detail}) because --resume-force is set")
        return
    raise on_every_rank(SftuneError(f"cannot resume from {checkpoint}: training settings differ ({detail}). "
                                    f"Restore them, or pass --resume-force to continue anyway."))
