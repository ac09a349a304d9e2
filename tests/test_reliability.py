"""Tier 2: no run can lose or mix another's data (issue 13, items 1-5), with real processes where it matters.

    1. --overwrite removes the older run's checkpoints, metrics and model first; rotation spares other runs'
    2. two runs into one --output-dir: the second is refused while the first holds the directory's lock
    3. an infinite lr is a config error; an update that makes the weights non-finite stops the run, and
       nothing non-finite is saved
    4. a failed final save keeps the weights (in a rescue directory) and says where; an unwritable output
       directory is refused before anything is loaded
    5. --resume auto on a finished run without checkpoints is refused, naming --overwrite
"""

import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICKSTART_DATA, ROOT, read_jsonl, run_main

pytestmark = pytest.mark.slow


def args(model_dir, out, *extra):
    return ["train", "--no-run-report", "--model", str(model_dir), "--dataset", str(QUICKSTART_DATA), "--batch-size", "16",
            "--lr", "3e-3", "--precision", "fp32", "--log-every", "1", "--output-dir", str(out), *extra]


def train_steps(out):
    return [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "train"]


def test_overwrite_removes_the_older_run_first(small_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_main(capsys, *args(small_model_dir, out, "--max-steps", "12", "--save-every", "4"))
    assert code == 0, err
    (out / "notes.txt").write_text("mine")
    code, _, err = run_main(capsys, *args(small_model_dir, out, "--max-steps", "6", "--save-every", "2", "--overwrite",
                                          "--seed", "7"))
    assert code == 0, err
    assert "--overwrite: removed the previous run's checkpoints, metrics.jsonl, config.yaml" in err
    # the new run's checkpoints survived rotation (the old run's step-8 and step-12 are gone, not the new ones)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4", "step-6"]
    assert train_steps(out) == [1, 2, 3, 4, 5, 6]  # no line of the old run
    assert (out / "notes.txt").read_text() == "mine"  # files that are not a run's are left alone
    code, _, err = run_main(capsys, *args(small_model_dir, out, "--max-steps", "6", "--save-every", "2",
                                          "--seed", "7", "--resume", "auto", "--overwrite"))
    assert code == 0, err
    assert f"resumed from {out / 'checkpoints' / 'step-6'}" in err  # the new run continues, not the old one
    # (with --overwrite too: a resume wins, and that is said, not silently ignored)
    assert f"warning: --overwrite is not used: --resume auto continues {out / 'checkpoints' / 'step-6'}" in err


def test_rotation_never_removes_another_runs_checkpoints(tmp_path):
    from conftest import make_tiny_gpt2
    from sftune.checkpoint import TrainState, complete_checkpoints, save_checkpoint
    from sftune.modeling import load_tokenizer, save_model

    model, tok = make_tiny_gpt2(), load_tokenizer("bundled:gpt2")
    write = lambda directory: save_model(model, tok, directory)  # noqa: E731
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    root = tmp_path / "checkpoints"
    save_checkpoint(root, write, optimizer, scheduler, scaler, TrainState(step=100, run_id="other"), "", 1)
    for step in (1, 2, 3):
        save_checkpoint(root, write, optimizer, scheduler, scaler, TrainState(step=step, run_id="me"), "", 1)
    assert [p.name for p in complete_checkpoints(root)] == ["step-3", "step-100"]


def test_a_second_run_into_the_same_directory_is_refused(small_model_dir, tmp_path, capsys):
    from procs import SftuneProcess

    out = tmp_path / "run"
    first = SftuneProcess(args(small_model_dir, out, "--max-steps", "4000", "--save-every", "5"), ROOT,
                          tmp_path / "stderr")
    try:
        for line in first.lines():  # training: the directory is locked
            if line.startswith("step      2/"):
                break
        for extra in (["--overwrite"], ["--resume", "auto"]):
            code, _, err = run_main(capsys, *args(small_model_dir, out, "--max-steps", "4000", "--save-every", "5",
                                                  *extra))
            assert code == 2, err
            owner = f"process {first.pid} on {socket.gethostname()}"
            assert f"output directory {out} is in use by another sftune run ({owner})" in err
            assert "Traceback" not in err
        first.send_signal(signal.SIGKILL)  # a crash: the OS releases the lock, nothing stale is left
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    code, _, err = run_main(capsys, *args(small_model_dir, out, "--max-steps", "6", "--save-every", "5",
                                          "--resume", "auto", "--resume-force"))
    assert code == 0, err


def test_an_infinite_lr_is_a_config_error(small_model_dir, tmp_path, capsys):
    for lr in ("inf", "nan"):
        code, _, err = run_main(capsys, *args(small_model_dir, tmp_path / "o", "--lr", lr))
        assert code == 2 and "lr = " in err and "must be a positive, finite number" in err
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("save_every, message", [
    ([], "the update of step 1 made the weights non-finite"),  # caught by the next step's guard
    (["--save-every", "1"], "the weights at step 1 are not finite; no checkpoint was written"),  # by the save
])
def test_an_update_that_breaks_the_weights_stops_the_run_and_nothing_bad_is_saved(save_every, message, small_model_dir,
                                                                                 tmp_path, capsys):
    """lr 1e39 is a finite double but overflows float32: the first update makes every weight infinite."""
    out = tmp_path / "run"
    code, _, err = run_main(capsys, *args(small_model_dir, out, "--lr", "1e39", "--max-steps", "10",
                                          "--max-grad-norm", "0", *save_every))
    assert code == 3, err
    assert message in err and "lower --lr" in err.lower()
    assert "Traceback" not in err
    for ckpt in (out / "checkpoints").glob("step-*"):  # whatever was saved is finite
        assert all(torch.isfinite(w).all() for w in load_file(ckpt / "model.safetensors").values())
    assert not (out / "model.safetensors").exists()


@pytest.fixture
def tmpfs(tmp_path):
    made = []

    def mount(size: str, readonly: bool = False):
        path = tmp_path / f"disk{len(made)}"
        path.mkdir()
        opts = f"size={size}" + (",ro" if readonly else "")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        made.append(path)
        return path

    yield mount
    for path in made:  # (a failed run must leave no file open in its directory: the unmount would be refused)
        done = subprocess.run(["umount", str(path)], capture_output=True, text=True)
        assert done.returncode == 0, f"a file in the run's directory is still open after the run: {done.stderr}"


def test_a_full_disk_at_the_final_save_keeps_the_weights_elsewhere(tiny_model_dir, tmpfs, capsys):
    """A 4 MB disk holds the config and the metrics, not the 13 MB model: the final save fails, nothing
    half-written is left in the output directory, and the weights are written to a rescue directory."""
    out = tmpfs("4M") / "run"
    code, _, err = run_main(capsys, *args(tiny_model_dir, out, "--max-steps", "3"))
    assert code == 2, err
    assert f"could not write the final model to {out}" in err and "Traceback" not in err
    assert "the trained model was written to " in err
    rescue = err.split("the trained model was written to ")[1].split(" instead")[0]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(rescue) is not None
    assert not (out / "model.safetensors").exists() and not (out / ".staging-final").exists()
    assert train_steps(out) == [1, 2, 3]  # the metrics are kept

    shutil.rmtree(rescue)


def test_a_disk_that_fills_up_mid_run_stops_the_metrics_not_the_training(tiny_model_dir, tmpfs, tmp_path):
    """Another process fills the run's disk after step 3 (a shared disk). Writing the metrics and TensorBoard's
    events then fails: that is said in one line each, no traceback, and the training goes on to its last step; the
    final model cannot be written there either, so it goes to a rescue directory (exit 2, said), as a full disk at
    the final save does. (A traceback and exit 1 at the next metrics line before: every step since the last
    checkpoint lost.) A real process: TensorBoard's writer thread and the process's own error output included."""
    from procs import SftuneProcess

    disk = tmpfs("30M")
    out = disk / "run"
    proc = SftuneProcess(args(tiny_model_dir, out, "--max-steps", "40", "--eval-every", "20", "--sample-prompts", ""),
                         ROOT, tmp_path / "stderr")
    for line in proc.lines():
        if line.startswith("step      3/"):
            with open(disk / "filler", "wb") as filler:  # another process's file takes what is left
                try:
                    while True:
                        filler.write(b"\0" * (1 << 20))
                        filler.flush()
                except OSError:
                    pass
            break
    assert proc.wait(timeout=120) == 2
    err = proc.stderr()
    assert "warning: the metrics cannot be written any more (No space left on device" in err
    assert "the training goes on without them" in err and "Traceback" not in err
    assert "eval  step     40 |" in err  # trained to the end, evaluated
    rescue = err.split("the trained model was written to ")[1].split(" instead")[0]
    assert (Path(rescue) / "model.safetensors").is_file()
    shutil.rmtree(rescue)
    steps = train_steps(out)
    assert steps == list(range(1, len(steps) + 1)) and 3 <= len(steps) < 40  # the record ends where the disk did
    (disk / "filler").unlink()


def test_a_checkpoint_for_safety_that_does_not_fit_does_not_stop_the_run(tiny_model_dir, tmpfs, capsys):
    """A run that asked for no checkpoints, on a 30 MB disk: --save-minutes' checkpoints (about 40 MB: weights and
    AdamW state) cannot be written there, which is a warning, not the end of the run; the final model (13 MB) fits."""
    out = tmpfs("30M") / "run"
    code, _, err = run_main(capsys, *args(tiny_model_dir, out, "--max-steps", "4", "--save-minutes", "0.00006"))
    assert code == 0, err
    assert "warning: no checkpoint for safety at step 1 (" in err and "training goes on" in err
    assert "(the disk is full: " in err  # (torch.save says only "unexpected pos ...")
    assert "Traceback" not in err and (out / "model.safetensors").is_file()
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())  # no staging left
    assert train_steps(out) == [1, 2, 3, 4]


def test_an_unwritable_output_directory_is_refused_before_loading(small_model_dir, tmpfs, capsys):
    readonly = tmpfs("1M", readonly=True)
    code, _, err = run_main(capsys, *args(small_model_dir, readonly / "run"))
    assert code == 2 and f"cannot write into {readonly}" in err and "--output-dir" in err
    assert "model:" not in err and "data:" not in err  # nothing was loaded


def test_resume_auto_on_a_finished_run_without_checkpoints_is_refused(small_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_main(capsys, *args(small_model_dir, out, "--max-steps", "2"))
    assert code == 0, err
    before = (out / "model.safetensors").read_bytes(), (out / "metrics.jsonl").read_text()
    code, _, err = run_main(capsys, *args(small_model_dir, out, "--max-steps", "2", "--resume", "auto"))
    assert code == 2, err
    assert f"nothing to resume in {out}" in err and "--overwrite" in err
    assert ((out / "model.safetensors").read_bytes(), (out / "metrics.jsonl").read_text()) == before


def test_resume_auto_on_a_finished_run_with_checkpoints_says_so_and_trains_nothing(small_model_dir, tmp_path,
                                                                                     capsys):
    out = tmp_path / "run"
    code, _, err = run_main(capsys, *args(small_model_dir, out, "--max-steps", "2", "--save-every", "1"))
    assert code == 0, err
    model = (out / "model.safetensors").read_bytes()
    code, _, err = run_main(capsys, *args(small_model_dir, out, "--max-steps", "2", "--save-every", "1",
                                          "--resume", "auto"))
    assert code == 0, err
    assert "the training had finished; nothing is trained again" in err and "step      1" not in err
    assert train_steps(out) == [1, 2] and (out / "model.safetensors").read_bytes() == model


def test_output_dir_mistakes_are_clear_errors(small_model_dir, tmp_path, capsys):
    dangling = tmp_path / "dangling"
    os.symlink(tmp_path / "nowhere", dangling)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, words in ((dangling, "is a symbolic link to nothing"), (afile / "run", f"{afile} is a file")):
        code, _, err = run_main(capsys, *args(small_model_dir, out))
        assert code == 2 and words in err and "--output-dir" in err and "Traceback" not in err, err


def test_a_lock_file_alone_does_not_make_a_directory_non_empty(tmp_path):
    from sftune.outputs import LOCK_FILE, is_empty

    (tmp_path / LOCK_FILE).write_text(json.dumps(1))
    assert is_empty(tmp_path)


# --- 6. resume checks what it resumes -------------------------------------------------------------------


@pytest.fixture
def own_data(tmp_path):
    """A copy of the quickstart's data that a test may change."""

    d = tmp_path / "data"
    shutil.copytree(QUICKSTART_DATA, d)
    return d


def resume_args(model_dir, data, out, *extra):
    return ["train", "--no-run-report", "--model", str(model_dir), "--dataset", str(data), "--batch-size", "16", "--lr", "3e-3",
            "--precision", "fp32", "--max-steps", "4", "--save-every", "2", "--output-dir", str(out), *extra]


def _rewrite_same_size(path):
    """Swap two words of equal length in the first row: same size, same row count, other content."""
    text = path.read_text()
    first, rest = text.split("\n", 1)
    words = first.split(" ")
    i, j = next((i, j) for i in range(len(words)) for j in range(i + 1, len(words))
                if len(words[i]) == len(words[j]) and words[i] != words[j])
    words[i], words[j] = words[j], words[i]
    mtime = path.stat().st_mtime_ns
    path.write_text(" ".join(words) + "\n" + rest)
    os.utime(path, ns=(mtime, mtime))  # and the same modification time


@pytest.mark.parametrize("change, what", [
    ("rewrite", "the training data (--dataset) changed"),
    ("shrink", "the training data (--dataset) changed"),
    ("tokenizer", "the tokenizer (--tokenizer/--model) changed"),
])
def test_resume_refuses_changed_data_or_tokenizer(change, what, small_model_dir, own_data, tmp_path, capsys):

    model = tmp_path / "model"
    shutil.copytree(small_model_dir, model)
    out = tmp_path / "run"
    code, _, err = run_main(capsys, *resume_args(model, own_data, out, "--max-steps", "2"))
    assert code == 0, err
    train = own_data / "train.jsonl"
    if change == "rewrite":
        _rewrite_same_size(train)
    elif change == "shrink":
        train.write_text("".join(train.read_text().splitlines(keepends=True)[:-16]))
    else:  # the tokenizer directory changed in place: two tokens swap ids (same size, other ids)
        for name in ("vocab.json", "tokenizer.json"):
            if (model / name).is_file():
                spec = json.loads((model / name).read_text())
                vocab = spec if name == "vocab.json" else spec["model"]["vocab"]
                vocab["Ġthe"], vocab["Ġa"] = vocab["Ġa"], vocab["Ġthe"]
                (model / name).write_text(json.dumps(spec))
    code, _, err = run_main(capsys, *resume_args(model, own_data, out, "--max-steps", "2", "--resume", "auto"))
    assert code == 2, err
    assert what in err and "--resume-force" in err and "Traceback" not in err
    code, _, err = run_main(capsys, *resume_args(model, own_data, out, "--max-steps", "2", "--resume", "auto",
                                                 "--resume-force"))
    assert code == 0, err
    assert "because --resume-force is set" in err


# --- 7. the tokenized-data cache is verified ------------------------------------------------------------


def _prepare(data, cache, capsys):
    from conftest import prepare
    from sftune.modeling import load_tokenizer

    result = prepare(data, load_tokenizer("bundled:gpt2"), 64, cache_dir=cache)
    return result, capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncate", "flip", "out-of-vocabulary", "delete-stats-file"])
def test_a_damaged_cache_is_rebuilt_with_a_warning(damage, own_data, tmp_path, capsys):
    import numpy as np

    cache = tmp_path / "cache"
    first, _ = _prepare(own_data, cache, capsys)
    ids_file = first.cache_path / "train.input_ids.npy"
    if damage == "truncate":
        ids_file.write_bytes(ids_file.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(ids_file.read_bytes())
        data[-1] ^= 0x01
        ids_file.write_bytes(bytes(data))
    elif damage == "out-of-vocabulary":  # a consistent file, checksum included, with an impossible id
        from sftune.data.cache import _file_crc

        ids = np.load(ids_file)
        ids[0] = 10**6
        np.save(ids_file, ids)
        stats = json.loads((first.cache_path / "stats.json").read_text())
        stats["files"]["train.input_ids.npy"] = [ids_file.stat().st_size, _file_crc(ids_file)]
        (first.cache_path / "stats.json").write_text(json.dumps(stats))
    else:
        (first.cache_path / "stats.json").unlink()
    again, err = _prepare(own_data, cache, capsys)
    assert not again.from_cache
    if damage != "delete-stats-file":  # no entry at all is just a miss
        assert "the data cache at" in err and "is damaged" in err and "tokenizing again" in err
    assert np.array_equal(np.asarray(again.train.input_ids), np.asarray(first.train.input_ids))
    third, _ = _prepare(own_data, cache, capsys)
    assert third.from_cache  # rebuilt and verified


def test_a_source_rewritten_with_the_same_size_and_time_is_not_served_stale(own_data, tmp_path, capsys):
    cache = tmp_path / "cache"
    first, _ = _prepare(own_data, cache, capsys)
    _rewrite_same_size(own_data / "train.jsonl")
    again, _ = _prepare(own_data, cache, capsys)
    assert not again.from_cache and again.cache_path != first.cache_path


@pytest.mark.parametrize("kind", ["read-only", "a-file"])
def test_an_unusable_cache_dir_warns_and_goes_on(kind, own_data, tmp_path, tmpfs, capsys):
    cache = tmpfs("1M", readonly=True) / "cache" if kind == "read-only" else tmp_path / "afile"
    if kind == "a-file":
        cache.write_text("x")
    result, err = _prepare(own_data, cache, capsys)
    assert len(result.train) == 400 and not result.from_cache
    assert "could not write the cache" in err and "continuing without it" in err


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    """Without --output-dir a run claims runs/<time> at once (made and locked): a second run of the same second
    takes runs/<time>-2 (it took the same name, and failed when it came to write, after loading everything); a
    finished run's directory of that second is passed over; a claim released with nothing written is removed."""
    from datetime import datetime

    import sftune.outputs
    from sftune.outputs import claim_new_run_dir

    class SameSecond(datetime):  # (the clock held still: the claims below fall in one second)
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 11, 28, 3, 0, 0)

    monkeypatch.setattr(sftune.outputs, "datetime", SameSecond)
    monkeypatch.chdir(tmp_path)
    first, held = claim_new_run_dir()
    second, also = claim_new_run_dir()
    assert (str(first), str(second)) == ("runs/20261128-030000", "runs/20261128-030000-2")
    also.release()
    assert not second.exists()  # (nothing written: removed)
    (first / "metrics.jsonl").write_text("")  # (a run's)
    held.release()
    third, last = claim_new_run_dir()
    assert str(third) == "runs/20261128-030000-2" and (first / "metrics.jsonl").is_file()
    last.release()
