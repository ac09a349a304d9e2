"""Tier 2: checkpoints, exact resume after a real SIGTERM, corruption, and resume compatibility."""

import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICKSTART_DATA, ROOT, needs_shared, read_jsonl, run_cli

pytestmark = needs_shared


def train_args(model_dir, out, *extra):
    return ["train", "--model", str(model_dir), "--dataset", str(QUICKSTART_DATA), "--batch-size", "8",
            "--grad-accum", "2", "--max-steps", "30", "--lr", "3e-3", "--lr-schedule", "cosine", "--precision", "fp32",
            "--log-every", "1", "--eval-every", "10", "--save-every", "4", "--output-dir", str(out), *extra]


def train_losses(out):
    rows = read_jsonl(out / "metrics.jsonl")
    losses = [(r["step"], r["loss"]) for r in rows if r["type"] == "train"]
    return losses, [(r["step"], r["val_loss"]) for r in rows if r["type"] == "eval"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    proc = run_cli(*train_args(tiny_model_dir, out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_sigterm_then_resume_equals_an_uninterrupted_run(uninterrupted, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "sftune", *train_args(tiny_model_dir, out)], cwd=ROOT,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:  # wait until training is mid-epoch (25 steps per epoch here) and off a save step
        if line.startswith("step      6/"):
            proc.send_signal(signal.SIGTERM)
            break
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 143, err
    assert "stopped by SIGTERM" in err and "--resume auto" in err
    saved = max(int(p.name[5:]) for p in (out / "checkpoints").iterdir())
    assert saved >= 6 and f"checkpoint {out / 'checkpoints' / f'step-{saved}'}" in err  # saved on the signal

    resumed = run_cli(*train_args(tiny_model_dir, out, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr

    a, b = load_file(uninterrupted / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise, fp32 on CPU
    assert train_losses(out) == train_losses(uninterrupted)  # every step's loss, every eval; nothing duplicated
    assert [r["type"] for r in read_jsonl(out / "metrics.jsonl")].count("resume") == 1


def test_corrupted_checkpoint_is_skipped(uninterrupted, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*train_args(tiny_model_dir, out, "--max-steps", "8", "--keep-last", "3"))
    assert proc.returncode == 0, proc.stderr
    newest = out / "checkpoints" / "step-8"
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) // 2])  # a torn write
    resumed = run_cli(*train_args(tiny_model_dir, out, "--max-steps", "8", "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"checkpoint {newest} is incomplete or corrupted; skipping it" in resumed.stderr
    assert "resumed from" in resumed.stderr and "step-4" in resumed.stderr


def test_keep_last_rotates(uninterrupted):
    # one epoch is 25 steps (400 rows / 8 / 2) and --max-steps 30 runs into the second: saves at 4, 8, ..., 24,
    # at the epoch's end (25) and at 28; the last 2 stay
    assert sorted(p.name for p in (uninterrupted / "checkpoints").iterdir()) == ["step-25", "step-28"]


def test_resume_refuses_changed_training_settings(uninterrupted, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert run_cli(*train_args(tiny_model_dir, out, "--max-steps", "4")).returncode == 0
    proc = run_cli(*train_args(tiny_model_dir, out, "--max-steps", "4", "--resume", "auto", "--lr", "1e-3"))
    assert proc.returncode == 2
    assert "training settings differ (lr: 0.003 -> 0.001)" in proc.stderr and "--resume-force" in proc.stderr
    assert "Traceback" not in proc.stderr
    # logging and evaluation frequency may change
    ok = run_cli(*train_args(tiny_model_dir, out, "--max-steps", "4", "--resume", "auto", "--log-every", "2",
                             "--eval-every", "3"))
    assert ok.returncode == 0, ok.stderr


def test_non_empty_output_needs_resume_or_overwrite(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run_cli(*train_args(tiny_model_dir, out, "--max-steps", "2")).returncode == 2
    ok = run_cli(*train_args(tiny_model_dir, out, "--max-steps", "2", "--overwrite"))
    assert ok.returncode == 0, ok.stderr
    assert (out / "notes.txt").read_text() == "mine"
    file_out = tmp_path / "afile"
    file_out.write_text("x")
    proc = run_cli(*train_args(tiny_model_dir, file_out, "--max-steps", "2"))
    assert proc.returncode == 2 and "is a file, not a directory" in proc.stderr


def test_a_non_finite_step_is_skipped_and_training_goes_on(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*train_args(tiny_model_dir, out, "--max-steps", "6", "--save-every", "100"),
                   env={"SFTUNE_FAULT_NAN_STEPS": "3"})
    assert proc.returncode == 0, proc.stderr
    assert "step 3: non-finite loss or gradient norm, update skipped (1 in a row" in proc.stderr
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows if r["type"] == "skip"] == [3]
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] == r["loss"] for r in rows if r["type"] == "train")  # no NaN reaches the log


def test_too_many_bad_steps_stop_with_the_last_good_state(tiny_model_dir, tmp_path):
    constant = ("--lr-schedule", "constant", "--save-every", "100")
    good = tmp_path / "good"
    assert run_cli(*train_args(tiny_model_dir, good, "--max-steps", "2", *constant)).returncode == 0
    out = tmp_path / "run"
    proc = run_cli(*train_args(tiny_model_dir, out, "--max-steps", "20", "--max-bad-steps", "2", *constant),
                   env={"SFTUNE_FAULT_NAN_STEPS": "3,4,5,6"})
    assert proc.returncode == 3, proc.stderr
    assert "3 optimizer steps in a row had a non-finite loss" in proc.stderr and "--resume auto" in proc.stderr
    assert "Traceback" not in proc.stderr
    saved = load_file(out / "checkpoints" / "step-5" / "model.safetensors")
    after_two = load_file(good / "model.safetensors")
    assert all(torch.equal(saved[k], after_two[k]) for k in saved)  # bad steps changed nothing


def test_kill_9_anywhere_including_mid_save_then_resume_equals_uninterrupted(uninterrupted, tiny_model_dir, tmp_path):
    """Real SIGKILLs: once while a checkpoint is being written, once mid-training; each time the run is
    resumed with --resume auto. No partial checkpoint ever appears under a final name, and the end result
    is the uninterrupted run's, bitwise."""
    from sftune.checkpoint import checkpoint_ok

    out = tmp_path / "run"
    args = [sys.executable, "-m", "sftune", *train_args(tiny_model_dir, out, "--resume", "auto")]
    ckpts = out / "checkpoints"

    def kill_when(condition, limit=120):
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + limit
        while proc.poll() is None and time.monotonic() < deadline:
            if condition():
                proc.kill()  # SIGKILL: no handler runs
                break
            time.sleep(0.001)
        proc.wait()
        return proc.returncode

    def saving():
        return ckpts.is_dir() and any(p.name.startswith(".staging-") for p in ckpts.iterdir())

    def past_step(n):
        rows = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        return any(f'"step": {n},' in r and '"type": "train"' in r for r in rows)

    kills = 0
    for condition in (saving, lambda: past_step(14)):
        if kill_when(condition) == -signal.SIGKILL:
            kills += 1
        for p in ckpts.iterdir():
            assert p.name.startswith(".staging-") or checkpoint_ok(p), p  # published = complete
    assert kills >= 1
    final = run_cli(*train_args(tiny_model_dir, out, "--resume", "auto"))
    assert final.returncode == 0, final.stderr
    a, b = load_file(uninterrupted / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(out) == train_losses(uninterrupted)


@pytest.fixture
def small_disk(tmp_path):
    """A 70 MB tmpfs: room for one checkpoint of the tiny model (~45 MB), not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=70M", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_disk_full_during_a_save_fails_cleanly(tiny_model_dir, small_disk):
    from sftune.checkpoint import checkpoint_ok

    out = small_disk / "run"
    proc = run_cli(*train_args(tiny_model_dir, out, "--max-steps", "12", "--keep-last", "3"))
    assert proc.returncode == 2, proc.stderr
    assert "could not write checkpoint" in proc.stderr and "Earlier checkpoints are intact" in proc.stderr
    assert "Traceback" not in proc.stderr
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert left == ["step-4"] and checkpoint_ok(out / "checkpoints" / "step-4")  # no staging debris


def test_sigint_saves_and_exits_130(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "sftune", *train_args(tiny_model_dir, out, "--save-every", "100")],
                            cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:
        if line.startswith("step      3/"):
            proc.send_signal(signal.SIGINT)
            break
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, err
    assert "stopped by SIGINT" in err
    assert len(list((out / "checkpoints").glob("step-*"))) == 1
