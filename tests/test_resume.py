"""Tier 2: checkpoints, exact resume after real signals and kills, corruption, and resume compatibility.

One uninterrupted run (30 steps, a checkpoint every 4, crossing an epoch at step 25) is the baseline for
every resume test. Signals and kills go to real processes; the rest calls the CLI's `main` in-process.
"""

import shutil
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import (QUICKSTART_DATA, ROOT, assert_resumes_bitwise, assert_same_losses, read_jsonl, run_captured,
                      run_main, signal_at)
from sftune.checkpoint import checkpoint_ok

pytestmark = pytest.mark.slow


def train_args(model_dir, out, *extra):
    return ["train", "--model", str(model_dir), "--dataset", str(QUICKSTART_DATA), "--batch-size", "8",
            "--grad-accum", "2", "--max-steps", "30", "--lr", "3e-3", "--lr-schedule", "cosine", "--precision", "fp32",
            "--log-every", "1", "--eval-every", "10", "--save-every", "4", "--no-run-report", "--output-dir", str(out),
            *extra]


def resumed_equals(capsys, model_dir, out, reference, checkpoint, *run) -> str:
    """`--resume auto` in OUT continues from CHECKPOINT and ends as REFERENCE did: weights bitwise, every loss."""
    code, _, err = run_main(capsys, *train_args(model_dir, out, *run, "--resume", "auto"))
    assert code == 0, err
    assert f"resumed from {checkpoint}" in err
    assert same_weights(reference, out)
    assert_same_losses(out, reference)
    return err


def same_weights(a_dir, b_dir) -> bool:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise, fp32 on CPU


@pytest.fixture(scope="module")
def uninterrupted(small_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    code, _, err = run_captured(*train_args(small_model_dir, out))
    assert code == 0, err
    return out


@pytest.fixture
def copy_of(uninterrupted, tmp_path):
    """A copy of the baseline run's directory, checkpoints included, to resume or damage."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    return out


def test_keep_last_rotates(uninterrupted):
    # one epoch is 25 steps (400 rows / 8 / 2) and --max-steps 30 runs into the second: saves at 4, 8, ..., 24,
    # at the epoch's end (25) and at 28; the last 2 stay
    assert sorted(p.name for p in (uninterrupted / "checkpoints").iterdir()) == ["step-25", "step-28"]
    # (--no-run-report, which these runs pass: no report.html or loss.png; test_tracking.py checks the default)
    assert not (uninterrupted / "report.html").exists() and not (uninterrupted / "loss.png").exists()


def test_resuming_a_checkpoint_rotated_away_names_those_kept(uninterrupted, small_model_dir, tmp_path, capsys):
    gone = uninterrupted / "checkpoints" / "step-4"
    code, _, err = run_main(capsys, *train_args(small_model_dir, tmp_path / "run", "--resume", str(gone)))
    assert code == 2 and f"--resume {gone}: no such checkpoint; {gone.parent} holds step-25, step-28: give one" in err


def test_sigint_then_sigterm_then_resume_equals_an_uninterrupted_run(uninterrupted, small_model_dir, tmp_path,
                                                                      capsys):
    out = tmp_path / "run"
    code, err = signal_at(train_args(small_model_dir, out), "step      3/", signal.SIGINT)  # Ctrl-C: saved, exit 130
    assert code == 130, err
    assert "stopped by SIGINT" in err
    assert len(list((out / "checkpoints").glob("step-*"))) == 1  # saved once, at the step it stopped

    # mid-epoch (25 steps per epoch here) and off a save step
    code, err = signal_at(train_args(small_model_dir, out, "--resume", "auto"), "step      6/")
    assert code == 143, err
    assert "stopped by SIGTERM" in err and "--resume auto" in err
    saved = max(int(p.name[5:]) for p in (out / "checkpoints").iterdir())
    assert saved >= 6 and f"checkpoint {out / 'checkpoints' / f'step-{saved}'}" in err  # saved on the signal

    code, _, err = run_main(capsys, *train_args(small_model_dir, out, "--resume", "auto"))
    assert code == 0, err
    assert "resumed from" in err
    assert same_weights(uninterrupted, out)
    assert_same_losses(out, uninterrupted)
    assert [r["type"] for r in read_jsonl(out / "metrics.jsonl")].count("resume") == 2  # one per resume


def test_a_terminal_that_hangs_up_stops_the_run_with_a_checkpoint_and_resume_is_exact(uninterrupted, small_model_dir,
                                                                                       tmp_path, capsys):
    """`python -m sftune train` writing to a terminal (a pseudo-terminal here), which then goes away (a dropped SSH
    session): the terminal is closed, so writing to it fails, and SIGHUP comes. The run saves at the step it
    stopped and exits 129 (by default SIGHUP killed it and every step since the last checkpoint), and `--resume
    auto` continues exactly."""
    import os
    import pty
    import sys

    out = tmp_path / "run"
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "sftune", *train_args(small_model_dir, out)], cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    seen = b""
    while b"step      3/" not in seen:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # (EIO: it ended)
            chunk = b""
        assert chunk, f"ended before step 3 (exit {proc.poll()}):\n{seen.decode(errors='replace')}"
        seen += chunk
    os.close(leader)  # the terminal is gone: its writes now fail with EIO
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=120) == 129
    saved = sorted((out / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and checkpoint_ok(saved[0]), saved  # saved at the step it stopped
    stopped = int(saved[0].name[5:])
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "train"] == list(range(1, stopped + 1))

    resumed_equals(capsys, small_model_dir, out, uninterrupted, saved[0])


def test_a_step_that_runs_out_of_memory_is_undone_and_the_run_resumes_exactly(small_model_dir, tmp_path, capsys,
                                                                               monkeypatch):
    """Step 7 runs out of memory after its forward and backward (a test hook raises torch's OutOfMemoryError there:
    no CPU runs out as a GPU does). The step is undone (its gradients dropped, its dropout draws given back), the
    state after step 6 is saved, and the message says what keeps the steps; `--resume auto` then ends bitwise
    where an uninterrupted run does (dropout on: the draws must be the same)."""
    run = ("--model-config-overrides", "resid_pdrop=0.1,embd_pdrop=0.1,attn_pdrop=0.1", "--max-steps", "10")
    straight = tmp_path / "straight"
    code, _, err = run_main(capsys, *train_args(small_model_dir, straight, *run))
    assert code == 0, err

    out = tmp_path / "run"
    monkeypatch.setenv("SFTUNE_FAULT_OOM", "step 7")
    code, _, err = run_main(capsys, *train_args(small_model_dir, out, *run))
    assert code == 2, err
    assert "out of memory in step 7 (micro-batches of up to 8 rows x " in err and "Traceback" not in err
    assert f"the state after step 6 is saved in {out / 'checkpoints' / 'step-6'}" in err
    assert "--resume auto: --batch-size 4 --grad-accum 4 (the same rows in each step) or --gradient-checkpointing" in err
    monkeypatch.delenv("SFTUNE_FAULT_OOM")
    resumed_equals(capsys, small_model_dir, out, straight, out / "checkpoints" / "step-6", *run)


def test_the_memory_check_changes_no_step_and_one_out_of_memory_stops_the_run_at_its_start(small_model_dir, tmp_path,
                                                                                              capsys, monkeypatch):
    """--memory-check (auto: on a GPU) runs the heaviest micro-batch a step can hold once after the first step, and
    undoes it: with dropout on, every figure of metrics.jsonl but the times and the weights are those of a run
    without it. When it runs out of memory (the test hook), the run stops right there, the state after step 1 saved
    and the fix named; --resume auto (which checks again after its own first step) ends as the others do."""
    run = ("--model-config-overrides", "resid_pdrop=0.1,embd_pdrop=0.1,attn_pdrop=0.1", "--max-steps", "10")
    off, on = tmp_path / "off", tmp_path / "on"
    for out, mode in ((off, "off"), (on, "on")):
        code, _, err = run_main(capsys, *train_args(small_model_dir, out, *run, "--memory-check", mode))
        assert code == 0, err
    assert "memory check: the heaviest micro-batch a step can hold (8 rows x " in err
    assert same_weights(off, on)

    def figures(out):
        timing = {"elapsed_s", "tokens_per_s", "eta_s"}
        return [{k: v for k, v in r.items() if k not in timing} for r in read_jsonl(out / "metrics.jsonl")]

    assert figures(on) == figures(off)

    out = tmp_path / "run"
    monkeypatch.setenv("SFTUNE_FAULT_OOM", "check 1")
    code, _, err = run_main(capsys, *train_args(small_model_dir, out, *run, "--memory-check", "on"))
    assert code == 2 and "out of memory in the memory check after step 1 (the heaviest micro-batch" in err, err
    assert f"the state after step 1 is saved in {out / 'checkpoints' / 'step-1'}" in err and "Traceback" not in err
    monkeypatch.delenv("SFTUNE_FAULT_OOM")
    resumed_equals(capsys, small_model_dir, out, off, out / "checkpoints" / "step-1", *run, "--memory-check", "on")

    code, _, err = run_main(capsys, *train_args(small_model_dir, tmp_path / "packed", "--max-steps", "2", "--packing",
                                                "--memory-check", "on"))
    assert code == 0 and "memory check: not made: packed micro-batches all have one shape" in err, err


def test_an_evaluation_that_runs_out_of_memory_saves_the_steps_before_it(small_model_dir, tmp_path, capsys,
                                                                         monkeypatch):
    """The evaluation before training runs out of memory: nothing to save, said. The final one (step 10): the
    state after step 10 is saved, and the resume makes the evaluation and writes the model the uninterrupted run
    writes. (Under the same test hook as above.)"""
    run = ("--max-steps", "10")
    straight = tmp_path / "straight"
    code, _, err = run_main(capsys, *train_args(small_model_dir, straight, *run))
    assert code == 0, err
    out = tmp_path / "run"
    monkeypatch.setenv("SFTUNE_FAULT_OOM", "eval 0")
    code, _, err = run_main(capsys, *train_args(small_model_dir, out, *run))
    assert code == 2 and "out of memory evaluating at step 0 (batches of up to 8 rows" in err, err
    assert "nothing was trained yet, so nothing was saved. Lower --eval-batch-size" in err and "Traceback" not in err
    monkeypatch.setenv("SFTUNE_FAULT_OOM", "eval 10")
    code, _, err = run_main(capsys, *train_args(small_model_dir, out, *run, "--overwrite"))
    assert code == 2 and "out of memory evaluating at step 10" in err, err
    assert f"the state after step 10 is saved in {out / 'checkpoints' / 'step-10'} (the resume makes this" in err
    monkeypatch.delenv("SFTUNE_FAULT_OOM")
    code, _, err = run_main(capsys, *train_args(small_model_dir, out, *run, "--resume", "auto", "--eval-batch-size", "4"))
    assert code == 0, err
    assert same_weights(straight, out)
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [0, 10]


def test_checkpoints_by_time_survive_a_kill_and_go_once_the_model_is_saved(uninterrupted, small_model_dir, tmp_path,
                                                                            capsys):
    """No --save-every: --save-minutes (30 by default; 3.6 ms here, so after every step) still writes checkpoints,
    so a kill -9 after step 10 loses at most the step in flight, and `--resume auto` ends bitwise as the
    uninterrupted run. Once the final model is saved those checkpoints are removed: they were only for a crash."""
    from procs import SftuneProcess

    out = tmp_path / "run"
    by_time = ("--save-every", "null", "--save-minutes", "0.00006")
    proc = SftuneProcess(train_args(small_model_dir, out, *by_time), ROOT, tmp_path / "stderr")
    for line in proc.lines():
        if line.startswith("step     10/"):
            proc.kill()
            break
    assert proc.wait() == -signal.SIGKILL
    left = sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*"))
    assert len(left) == 1 and left[-1] >= 9, left  # the newest alone (it serves), within a step of the kill

    err = resumed_equals(capsys, small_model_dir, out, uninterrupted, out / "checkpoints" / f"step-{left[-1]}", *by_time)
    assert "checkpoints: the 1 kept for safety (--save-minutes) removed, now that the model is saved" in err
    assert not (out / "checkpoints").exists()


def test_a_corrupted_checkpoint_is_skipped_for_the_one_before(uninterrupted, copy_of, small_model_dir, capsys):
    newest = copy_of / "checkpoints" / "step-28"
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) // 2])  # a torn write
    code, _, err = run_main(capsys, *train_args(small_model_dir, copy_of, "--resume", "auto"))
    assert code == 0, err
    assert f"checkpoint {newest} is incomplete or corrupted; skipping it" in err
    assert "resumed from" in err and "step-25" in err
    assert same_weights(uninterrupted, copy_of)  # steps 26-30 again, exactly


def test_checkpoint_hashes_catch_damage_of_the_same_size(copy_of, small_model_dir, capsys):
    """Sizes are always checked; with --checkpoint-hashes a flipped byte is caught as well."""
    out = copy_of.parent / "hashed"
    code, _, err = run_main(capsys, *train_args(small_model_dir, out, "--max-steps", "4", "--checkpoint-hashes"))
    assert code == 0, err
    ckpt = out / "checkpoints" / "step-4"
    assert checkpoint_ok(ckpt)
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    assert not checkpoint_ok(ckpt)
    assert checkpoint_ok(copy_of / "checkpoints" / "step-28")  # no hashes recorded: sizes only


def test_resume_refuses_changed_training_settings(copy_of, small_model_dir, capsys):
    code, _, err = run_main(capsys, *train_args(small_model_dir, copy_of, "--resume", "auto", "--lr", "1e-3"))
    assert code == 2
    assert "training settings differ (lr: 0.003 -> 0.001)" in err and "--resume-force" in err
    assert "Traceback" not in err
    # logging and evaluation frequency may change
    code, _, err = run_main(capsys, *train_args(small_model_dir, copy_of, "--resume", "auto", "--log-every", "2",
                                                 "--eval-every", "3"))
    assert code == 0, err


def test_resume_with_another_split_of_the_same_steps(uninterrupted, copy_of, small_model_dir, capsys):
    """batch_size and grad_accum may change on resume when each step keeps its rows (8 x 2 -> 16 x 1: e.g. a
    micro-batch that no longer fits in memory, split in two); a change that puts other rows in the steps is refused
    with the settings that would keep them."""
    code, _, err = run_main(capsys, *train_args(small_model_dir, copy_of, "--resume", "auto", "--grad-accum", "1"))
    assert code == 2 and "written by a run of 1 process(es) x batch 8 x accum 2 (16 rows a step)" in err, err
    assert "--batch-size 16 --grad-accum 1" in err
    new = copy_of.parent / "new" / "run"  # refused into a new directory: none is left behind (it held only the lock)
    code, _, err = run_main(capsys, *train_args(small_model_dir, new, "--resume", str(copy_of / "checkpoints" /
                                                                                      "step-28"), "--grad-accum", "1"))
    assert code == 2 and "written by a run of 1 process(es)" in err and not (copy_of.parent / "new").exists()
    code, _, err = run_main(capsys, *train_args(small_model_dir, copy_of.parent / "forced", "--resume",
                                                 str(copy_of / "checkpoints" / "step-28"), "--grad-accum", "1",
                                                 "--resume-force"))
    assert code == 0 and "because --resume-force is set: the steps from here on hold other rows" in err, err
    code, _, err = run_main(capsys, *train_args(small_model_dir, copy_of, "--resume", "auto", "--batch-size", "16",
                                                 "--grad-accum", "1"))
    assert code == 0 and "as 1 process(es) x batch 16 x accum 1: the same 16 rows in each step" in err, err
    a, b = load_file(uninterrupted / "model.safetensors"), load_file(copy_of / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)


def test_non_empty_output_needs_resume_or_overwrite(small_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run_main(capsys, *train_args(small_model_dir, out, "--max-steps", "2"))
    assert code == 2 and "already exists and is not empty" in err
    code, _, err = run_main(capsys, *train_args(small_model_dir, out, "--max-steps", "2", "--overwrite"))
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"
    file_out = tmp_path / "afile"
    file_out.write_text("x")
    code, _, err = run_main(capsys, *train_args(small_model_dir, file_out, "--max-steps", "2"))
    assert code == 2 and "is a file, not a directory" in err


def test_a_non_finite_step_is_skipped_and_training_goes_on(small_model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("SFTUNE_FAULT_NAN_STEPS", "3")
    code, _, err = run_main(capsys, *train_args(small_model_dir, out, "--max-steps", "6", "--save-every", "100"))
    assert code == 0, err
    assert "step 3: non-finite loss or gradient norm, update skipped (1 in a row" in err
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows if r["type"] == "skip"] == [3]
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] == r["loss"] for r in rows if r["type"] == "train")  # no NaN reaches the log


def test_fp16_scales_its_loss_skips_a_bad_step_and_resumes_exactly(small_model_dir, tmp_path, capsys, monkeypatch):
    """--precision fp16 (what auto takes on a T4 or a V100), here on the CPU, whose autocast and GradScaler run
    torch's same code: the loss is scaled and unscaled before the clip, the guard decides on the host (the scaler
    reads its own flag there), a non-finite step is skipped, the checkpoint holds the scaler's state, and a resume
    from it writes the same model, bitwise."""
    out = tmp_path / "run"
    monkeypatch.setenv("SFTUNE_FAULT_NAN_STEPS", "3")
    code, _, err = run_main(capsys, *train_args(small_model_dir, out, "--max-steps", "8", "--save-every", "5",
                                                 "--precision", "fp16"))
    assert code == 0, err
    assert "device: cpu, precision: fp16" in err and "note: fp16 on a CPU" in err
    assert "step 3: non-finite loss or gradient norm, update skipped" in err
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows if r["type"] == "skip"] == [3]
    evals = [r["val_loss"] for r in rows if r["type"] == "eval"]
    assert evals[-1] < evals[0] - 0.5  # it learns
    scaler = torch.load(out / "checkpoints" / "step-5" / "training_state.pt", weights_only=False)["scaler"]
    assert scaler["scale"] == 2.0 ** 16 and scaler["_growth_tracker"] == 5  # (no overflow: 5 steps towards growth)
    assert_resumes_bitwise(capsys, out, "step-5")


def test_an_fp16_step_whose_gradients_overflow_is_said_with_the_lowered_loss_scale(small_model_dir, tmp_path, capsys):
    """GradScaler skips an update whose gradients overflowed fp16 and halves its scale, saying nothing: a run whose
    first steps all overflowed looked trained. Each such step is said, with the scale, and written as a skip.
    (Weights drawn at 100 times GPT-2's spread, initializer_range 2: gradients 4-8 times past what fits at the first
    scale, 2^16: three overflows.)"""
    out = tmp_path / "run"
    code, _, err = run_main(capsys, *train_args(small_model_dir, out, "--max-steps", "4", "--save-every", "100",
                                                 "--precision", "fp16", "--init", "random",
                                                 "--model-config-overrides", "initializer_range=2"))
    assert code == 0, err
    assert "step 1: fp16 gradients overflowed at loss scale 65,536, update skipped; scale now 32,768" in err
    skips = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "skip"]
    assert skips[0] == {"type": "skip", "step": 1, "reason": "fp16 gradients overflowed", "loss_scale": 32768.0}
    assert [r["loss_scale"] for r in skips] == [2.0 ** (15 - i) for i in range(len(skips))]  # halved at each


def test_an_fp16_loss_scale_under_1_stops_the_run_with_the_last_good_state(small_model_dir, tmp_path, capsys,
                                                                          monkeypatch):
    """Gradients that overflow fp16 at every scale (a test hook puts an inf in one from step 3 on): the scaler halves
    its scale at each, from 2^16 to under 1 in 17 steps, where it means the gradients overflow unscaled: the run
    stops (exit 3) with the state after step 2, the last that changed anything, saved."""
    good = tmp_path / "good"
    fp16 = ("--save-every", "100", "--precision", "fp16", "--lr-schedule", "constant")
    code, _, err = run_main(capsys, *train_args(small_model_dir, good, "--max-steps", "2", *fp16))
    assert code == 0, err
    out = tmp_path / "run"
    monkeypatch.setenv("SFTUNE_FAULT_INF_GRAD_STEPS", ",".join(str(s) for s in range(3, 31)))
    code, _, err = run_main(capsys, *train_args(small_model_dir, out, *fp16))
    assert code == 3, err
    assert "step 3: fp16 gradients overflowed at loss scale 65,536, update skipped; scale now 32,768" in err
    assert "fp16's loss scale fell to 0.5 (step 19): the gradients overflow fp16 even unscaled" in err
    assert "Traceback" not in err and "--resume auto" in err
    saved = load_file(out / "checkpoints" / "step-18" / "model.safetensors")
    after_two = load_file(good / "model.safetensors")
    assert all(torch.equal(saved[k], after_two[k]) for k in saved)  # the overflowing steps changed nothing


def test_too_many_bad_steps_stop_with_the_last_good_state(small_model_dir, tmp_path, capsys, monkeypatch):
    constant = ("--lr-schedule", "constant", "--save-every", "100")
    good = tmp_path / "good"
    code, _, err = run_main(capsys, *train_args(small_model_dir, good, "--max-steps", "2", *constant))
    assert code == 0, err
    out = tmp_path / "run"
    monkeypatch.setenv("SFTUNE_FAULT_NAN_STEPS", "3,4,5,6")
    code, _, err = run_main(capsys, *train_args(small_model_dir, out, "--max-steps", "20", "--max-bad-steps", "2",
                                                 *constant))
    assert code == 3, err
    assert "3 optimizer steps in a row had a non-finite loss" in err and "--resume auto" in err
    assert "Traceback" not in err
    saved = load_file(out / "checkpoints" / "step-5" / "model.safetensors")
    after_two = load_file(good / "model.safetensors")
    assert all(torch.equal(saved[k], after_two[k]) for k in saved)  # bad steps changed nothing


def test_kill_9_mid_save_and_mid_training_then_resume_equals_uninterrupted(uninterrupted, small_model_dir, tmp_path,
                                                                           capsys):
    """Real SIGKILLs: once while a checkpoint is being written (the save is held open by a test hook, and the
    staging directory left behind proves the kill landed inside it), once mid-training; each time the run is
    resumed with --resume auto. No partial checkpoint ever appears under a final name, and the end result is
    the uninterrupted run's, bitwise."""
    from procs import SftuneProcess

    out = tmp_path / "run"
    ckpts = out / "checkpoints"

    def kill_when(condition, env=None, limit=120):
        proc = SftuneProcess(train_args(small_model_dir, out, "--resume", "auto"), ROOT, tmp_path / "stderr", env)
        deadline = time.monotonic() + limit
        while proc.poll() is None and time.monotonic() < deadline:
            if condition():
                proc.kill()  # SIGKILL: no handler runs
                break
            time.sleep(0.01)
        return proc.wait()

    def staging():
        return sorted(p.name for p in ckpts.iterdir() if p.name.startswith(".staging-")) if ckpts.is_dir() else []

    def past_step(n):
        rows = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        return any(f'"step": {n},' in r and '"type": "train"' in r for r in rows)

    # 1. mid-save: the staging directory of step 4 is still there after the process died
    assert kill_when(lambda: bool(staging()), env={"SFTUNE_FAULT_SLOW_SAVE": "30"}) == -signal.SIGKILL
    assert staging() == [".staging-step-4"] and not any(p.name.startswith("step-") for p in ckpts.iterdir())
    # 2. mid-training, after some checkpoints (the stale staging directory is cleared by the next save)
    assert kill_when(lambda: past_step(14)) == -signal.SIGKILL
    # (step 4's is gone; on a busy machine the kill can land late, inside step 16's save: that one may be there)
    assert staging() in ([], [".staging-step-16"])
    for p in ckpts.iterdir():
        assert checkpoint_ok(p), p  # published = complete
    code, _, err = run_main(capsys, *train_args(small_model_dir, out, "--resume", "auto"))
    assert code == 0, err
    assert same_weights(uninterrupted, out)
    assert_same_losses(out, uninterrupted)


@pytest.fixture
def small_disk(tmp_path):
    """A 70 MB tmpfs: room for one checkpoint of the tiny model (~45 MB), not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=70M", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    done = subprocess.run(["umount", str(mount)], capture_output=True, text=True)
    assert done.returncode == 0, f"a file in the run's directory is still open after the run: {done.stderr}"


def test_disk_full_during_a_save_fails_cleanly(tiny_model_dir, small_disk, capsys):
    out = small_disk / "run"
    code, _, err = run_main(capsys, *train_args(tiny_model_dir, out, "--max-steps", "12", "--keep-last", "3"))
    assert code == 2, err
    assert "could not write checkpoint" in err and "Earlier checkpoints are intact" in err
    assert "Traceback" not in err
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert left == ["step-4"] and checkpoint_ok(out / "checkpoints" / "step-4")  # no staging debris




def test_a_signal_during_an_evaluation_stops_it_and_the_resume_makes_it(small_model_dir, tmp_path, capsys):
    """An evaluation of a large split takes minutes, past a scheduler's grace between SIGTERM and SIGKILL: a signal
    stops it between batches and the run stops with a checkpoint of the step it evaluated (exit 143), both for an
    evaluation inside the run (`--eval-every`) and for the final one. Each resume makes the evaluation first, as
    the uninterrupted run made it; weights and every evaluation equal that run's."""
    import json

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"text": f"a short review number {i} of a film"}) + "\n"
                                              for i in range(64)))
    (data / "validation.jsonl").write_text((json.dumps({"text": "a long and winding review of a film " * 3}) + "\n")
                                           * 4000)  # (1.3 s an evaluation on this 2-core Xeon)
    run = ["train", "--model", str(small_model_dir), "--dataset", str(data), "--batch-size", "8", "--max-steps", "3",
           "--eval-every", "2", "--log-every", "1", "--precision", "fp32", "--no-run-report", "--sample-prompts", ""]
    straight, out = tmp_path / "straight", tmp_path / "run"
    code, _, err = run_main(capsys, *run, "--output-dir", str(straight))
    assert code == 0, err

    code, err = signal_at([*run, "--output-dir", str(out)], "step      2/3")  # the evaluation of step 2 starts
    assert code == 143, err
    assert "eval  step      2 | stopped by SIGTERM (the resume makes it)" in err
    assert f"stopped by SIGTERM; checkpoint {out / 'checkpoints' / 'step-2'}" in err
    # the final evaluation, 0.4 s into it (it starts within milliseconds of the last step's line)
    code, err = signal_at([*run, "--output-dir", str(out), "--resume", "auto"], "step      3/3", after=0.4)
    assert code == 143, err
    assert err.index("eval  step      2 | val_loss") < err.index("step      3/3")  # made before step 3
    assert "eval  step      3 | stopped by SIGTERM" in err and f"checkpoint {out / 'checkpoints' / 'step-3'}" in err
    code, _, err = run_main(capsys, *run, "--output-dir", str(out), "--resume", "auto")
    assert code == 0, err
    assert same_weights(straight, out)
    evals = [[(r["step"], r["val_loss"]) for r in read_jsonl(d / "metrics.jsonl") if r["type"] == "eval"]
             for d in (straight, out)]
    assert evals[0] == evals[1] and [s for s, _ in evals[1]] == [0, 2, 3]
