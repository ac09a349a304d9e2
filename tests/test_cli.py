"""Tier 2: the CLI end to end on a tiny random GPT-2 with the real GPT-2 tokenizer.

The shared training run and a few smoke tests run the real `sftune` in a subprocess; the rest call the
CLI's `main` in-process (the same code, without an interpreter start-up each)."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import GPT2_DIR, QUICKSTART_DATA, assert_ordinary_modes, ROOT, needs_gpt2_files, read_jsonl, run_cli, run_main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One training run (in this process) shared by the checks below."""
    out = tmp_path_factory.mktemp("run") / "out"
    proc = captured_run("train", "--model", str(tiny_model_dir), "--dataset", str(QUICKSTART_DATA), "--max-steps", "30",
                   "--batch-size", "8", "--lr", "3e-3", "--eval-every", "10", "--log-every", "5", "--precision", "fp32",
                   "--output-dir", str(out), "--sample-prompts", "the film is")
    assert proc.returncode == 0, proc.stderr
    return out, proc


def captured_run(*args):
    """In this process (the CLI as a subprocess is tested elsewhere): an object like subprocess's result."""
    import types

    from conftest import run_captured

    code, stdout, stderr = run_captured(*args)
    return types.SimpleNamespace(returncode=code, stdout=stdout, stderr=stderr)


def test_train_writes_a_loadable_model_config_and_metrics(trained, tiny_model_dir):
    out, proc = trained
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "config.yaml", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin"))  # safetensors only
    assert_ordinary_modes(out)  # (checkpoints included) readable by whom config.json is, not by this user only

    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # weights changed

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token_id == tok.eos_token_id == model.generation_config.eos_token_id == 50256
    for k, v in model.state_dict().items():
        if k in after:
            assert torch.equal(v, after[k])


def test_the_next_rlhf_stages_load_the_saved_model(trained):
    """The saved directory is what a reward model and DPO start from, as they load it: a reward model
    (`AutoModelForSequenceClassification`, a new one-label head) scores each text of a right-padded batch as it scores
    the text alone (it finds each row's last token through the config's pad token: without one it refuses batches);
    and a DPO policy's or reference's log-probability of a completion given its prompt, from a padded batch, is the
    one computed alone."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    out, _ = trained
    tok = AutoTokenizer.from_pretrained(out)
    texts = ["a fine film", "a long and tedious film that drags on"]
    reward = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1).eval()
    with torch.no_grad():
        together = reward(**tok(texts, return_tensors="pt", padding=True)).logits[:, 0]
        alone = torch.cat([reward(**tok([t], return_tensors="pt")).logits[:, 0] for t in texts])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)

    policy = AutoModelForCausalLM.from_pretrained(out).eval()
    pairs = [("the movie is", " a gem"), ("a gripping", " story of love and loss")]

    def completion_logprobs(batch_pairs):
        rows = [(tok(p)["input_ids"], tok(c)["input_ids"]) for p, c in batch_pairs]
        width = max(len(p) + len(c) for p, c in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, (p, c) in enumerate(rows):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            mask[i, : len(p) + len(c)] = 1
        with torch.no_grad():
            logprobs = policy(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
        return torch.stack([logprobs[i, len(p) - 1 : len(p) + len(c) - 1].gather(1, torch.tensor(c)[:, None]).sum()
                            for i, (p, c) in enumerate(rows)])

    torch.testing.assert_close(completion_logprobs(pairs), torch.cat([completion_logprobs([p]) for p in pairs]),
                               rtol=1e-5, atol=1e-4)


def test_metrics_lines_and_falling_val_loss(trained):
    out, proc = trained
    rows = read_jsonl(out / "metrics.jsonl")
    train_rows = [r for r in rows if r["type"] == "train"]
    evals = [r for r in rows if r["type"] == "eval"]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20, 25, 30]
    for r in train_rows:
        assert set(r) >= {"step", "epoch", "loss", "lr", "tokens", "elapsed_s"}
    tokens = [r["tokens"] for r in train_rows]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    assert [r["step"] for r in evals] == [0, 10, 20, 30]  # before training, every 10, none twice at the end
    for r in evals:
        assert r["val_ppl"] == pytest.approx(2.718281828 ** r["val_loss"], rel=1e-6)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    assert "val loss" in proc.stdout and f"model saved to {out}" in proc.stdout
    assert "sample: 'the film is' ->" in proc.stdout


def test_resolved_config_is_written_and_reloads(trained):
    from sftune.config import load_config

    out, _ = trained
    cfg = load_config(out / "config.yaml")
    assert (cfg.max_steps, cfg.batch_size, cfg.max_length, cfg.precision, cfg.output_dir) == (30, 8, 128, "fp32", str(out))


def test_eval_reproduces_the_final_val_loss(trained, capsys):
    out, _ = trained
    code, stdout, err = run_main(capsys, "eval", "--model", str(out), "--dataset", str(QUICKSTART_DATA), "--json")
    assert code == 0, err
    assert "precision: fp32, as the run trained" in err  # eval defaults to the run's precision
    report = json.loads(stdout)
    assert report["precision"] == "fp32"
    last = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "eval"][-1]
    assert report["val_loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    # the run given in front, as export, report and push take theirs: the same evaluation
    code, stdout, err = run_main(capsys, "eval", str(out), "--dataset", str(QUICKSTART_DATA), "--json")
    assert code == 0 and json.loads(stdout)["val_loss"] == report["val_loss"], err
    assert report["val_token_accuracy"] == pytest.approx(last["val_token_accuracy"], abs=1e-3)  # (1 target = 5e-4)
    assert 0 < last["val_token_accuracy"] < 1 and f"| acc {last['val_token_accuracy']:.3f} |" in trained[1].stderr
    assert report["examples"] == 60


def test_eval_of_a_run_without_a_dataset_evaluates_what_the_run_did(trained, capsys, tmp_path):
    """`sftune eval --model RUN_DIR` alone: the data the run trained on, from its config.yaml (before, the config's
    default dataset: SST-2 from the Hub, which fails offline), its final val loss to the bit; --dataset still
    names other data; a model directory that is no run gets no data of its own (the default, as before)."""
    out, _ = trained
    code, stdout, err = run_main(capsys, "eval", "--model", str(out), "--json")
    assert code == 0, err
    assert f"eval: the data {out} trained on, from its config.yaml: {QUICKSTART_DATA}" in err
    last = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "eval"][-1]
    report = json.loads(stdout)
    assert (report["val_loss"], report["examples"], report["dataset"]) == (last["val_loss"], 60, str(QUICKSTART_DATA))
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": f"another film number {i} that is long enough"}) + "\n"
                             for i in range(40)))
    code, stdout, err = run_main(capsys, "eval", "--model", str(out), "--dataset", str(other), "--json")
    assert code == 0 and "trained on, from its config.yaml" not in err and json.loads(stdout)["examples"] == 2, err


def test_eval_in_bf16_keeps_the_matrices_in_bf16_and_gives_the_runs_own_val_loss(small_model_dir, tmp_path, capsys):
    """`sftune eval` of a bf16 run (in bf16, as it trained) keeps the weights only matrix products read in bf16
    before the model goes to the device: half their memory. Autocast rounded them alike where the products read
    them, so the val loss is the run's last to the bit; the Llama fixture's untied head, read by the fused loss, too."""
    from conftest import FIXTURES

    out = tmp_path / "run"
    code, _, err = run_main(capsys, "train", "--no-run-report", "--model", str(FIXTURES / "tiny-llama"), "--init",
                            "random", "--tokenizer", str(small_model_dir), "--dataset", str(QUICKSTART_DATA),
                            "--precision", "bf16", "--max-steps", "3", "--batch-size", "8", "--lr", "3e-3",
                            "--save-dtype", "fp32", "--sample-prompts", "", "--output-dir", str(out))
    assert code == 0, err
    code, stdout, err = run_main(capsys, "eval", "--model", str(out), "--json")
    assert code == 0, err
    assert "precision: bf16, as the run trained" in err and "eval: the matrices kept in bf16, " in err
    last = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "eval"][-1]
    assert json.loads(stdout)["val_loss"] == last["val_loss"]


def test_eval_with_a_training_config_evaluates_the_trained_model(trained, capsys):
    """A config that trains from random weights (`init: random`) still evaluates the run's trained ones."""
    out, _ = trained
    code, stdout, err = run_main(capsys, "eval", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--model",
                                 str(out), "--dataset", str(QUICKSTART_DATA), "--json")
    assert code == 0, err
    assert "holds trained weights: evaluating them" in err
    last = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "eval"][-1]
    assert json.loads(stdout)["val_loss"] == pytest.approx(last["val_loss"], rel=1e-5)


def test_generate_from_the_run(trained, capsys):
    out, _ = trained
    code, stdout, err = run_main(capsys, "generate", "--model", str(out), "--prompt", "the film is", "--num-samples",
                                 "2", "--max-new-tokens", "8", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["prompt"] == "the film is" and len(result["completions"]) == 2
    assert all(isinstance(c, str) for c in result["completions"])


def test_existing_output_is_never_overwritten(trained, tiny_model_dir, capsys):
    out, _ = trained
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    code, _, err = run_main(capsys, "train", "--model", str(tiny_model_dir), "--dataset", str(QUICKSTART_DATA),
                            "--max-steps", "1", "--output-dir", str(out))
    assert code == 2
    assert "already exists and is not empty; choose another --output-dir" in err
    assert "Traceback" not in err
    assert hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "eight"], "`batch_size` must be an integer, got 'eight'"),
    (["--lr", "-1"], "lr = -1.0: must be a positive, finite number"),
    (["--dataset", "./nope.jsonl"], "dataset path not found: './nope.jsonl' (check --dataset)"),
    (["--model", "./no-model"], "model path not found: './no-model' (check --model)"),
    (["--text-column", "body"], "text column 'body' not in the dataset"),
    (["--max-length", "4096"], "max_length 4096 exceeds the model's context of 128 tokens"),
])
def test_user_mistakes_get_a_clear_error(args, message, tiny_model_dir, tmp_path, capsys):
    code, _, err = run_main(capsys, "train", "--model", str(tiny_model_dir), "--dataset", str(QUICKSTART_DATA),
                            "--output-dir", str(tmp_path / "o"), *args)
    assert code == 2, err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_unknown_yaml_key_in_a_real_process(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lerning_rate: 1e-4\n")
    proc = run_cli("train", "--config", str(cfg))
    assert proc.returncode == 2
    assert "unknown key `lerning_rate`" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("env", [{}, {"HF_HUB_OFFLINE": "1"}], ids=["no-network", "HF_HUB_OFFLINE"])
def test_hub_model_offline_is_a_clear_error_naming_model_path(env, tmp_path):
    """Without a network the Hub id is looked up in the local cache only (no retries: `hub.hub_reachable`
    makes one connection attempt), and the message names the flag for a local copy."""
    proc = run_cli("train", "--model", "gpt2", "--dataset", str(QUICKSTART_DATA), "--output-dir", str(tmp_path / "o"),
                   env=env)
    assert proc.returncode == 2
    assert "'gpt2' is not a local path" in proc.stderr and "--model PATH" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_cached_hub_model_loads_offline_without_asking_the_hub(tmp_path, small_model_dir, monkeypatch):
    """A Hub id in the local cache loads without a network lookup when the Hub cannot be reached. transformers 5
    looks for the id's adapter_config.json without passing on `local_files_only`: 5 retries, 24 s lost at each
    start (train, eval, generate) before the fix."""
    import shutil

    import huggingface_hub.constants
    import huggingface_hub.file_download

    from sftune.hub import hub_reachable
    from sftune.modeling import load_model

    repo = tmp_path / "hub" / "models--someone--tiny"
    shutil.copytree(small_model_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # (sftune's check reads it; huggingface_hub read it when imported)
    asked = []

    def lookup(url, *args, **kwargs):  # where huggingface_hub asks the Hub about a file (no network here)
        asked.append(url)
        raise OSError("no network in this test")

    monkeypatch.setattr(huggingface_hub.file_download, "get_hf_file_metadata", lookup)
    hub_reachable.cache_clear()
    try:
        model = load_model("someone/tiny", "pretrained")
    finally:
        hub_reachable.cache_clear()
    assert asked == [] and model.num_parameters() > 0


def test_data_report_json_with_examples(tiny_model_dir, capsys):
    code, out, err = run_main(capsys, "data", "--model", str(tiny_model_dir), "--dataset", str(QUICKSTART_DATA),
                              "--batch-size", "16", "--grad-accum", "2", "--json", "--show", "2")
    assert code == 0, err
    report = json.loads(out)
    train = report["splits"]["train"]
    assert (train["rows"], train["kept"], report["splits"]["validation"]["kept"]) == (400, 400, 60)
    assert train["micro_batches_per_epoch"] == 25 and train["optimizer_steps_per_epoch"] == 13
    assert train["heaviest_micro_batch"] == [16, train["length"]["max"]]  # the 16 longest rows (--memory-check's)
    assert 0 < train["padding_efficiency"] <= 1
    assert set(train["length"]) == {"mean", "p50", "p90", "p95", "p99", "max"}
    assert len(report["examples"]) == 2
    for ex in report["examples"]:
        assert ex["input_ids"][-1] == 50256 and ex["labels"] == ex["input_ids"]  # EOS trained, nothing masked


def test_data_report_of_a_tokenizer_alone_reads_no_model(tiny_model_dir, capsys):
    """`sftune data --tokenizer DIR` without --model: the report needs no model (the default, gpt2, is on the Hub,
    which the tests cannot reach); the context is the tokenizer's, and --max-length is checked against nothing."""
    code, out, err = run_main(capsys, "data", "--tokenizer", str(tiny_model_dir), "--dataset", str(QUICKSTART_DATA),
                              "--json")
    assert code == 0, err
    assert "no model is read" in err and "max_length: 1024 (the tokenizer's context)" in err
    assert json.loads(out)["splits"]["train"]["kept"] == 400
    code, out, err = run_main(capsys, "data", "--tokenizer", str(tiny_model_dir), "--dataset", str(QUICKSTART_DATA),
                              "--max-length", "16", "--overlong", "truncate", "--json")
    assert code == 0, err
    assert json.loads(out)["splits"]["train"]["length"]["max"] == 16


def test_data_report_table(tiny_model_dir, capsys):
    code, out, err = run_main(capsys, "data", "--model", str(tiny_model_dir), "--dataset", str(QUICKSTART_DATA),
                              "--show", "1")
    assert code == 0, err
    assert "padding efficiency" in out and "optimizer steps" in out
    assert "<|endoftext|>" in out


def test_one_process_commands_under_torchrun_run_once_and_data_plans_the_ranks_steps(tiny_model_dir, capsys,
                                                                                      monkeypatch):
    """`torchrun ... -m sftune data` (or generate, tokenize, report, export, push) does the work once, on rank 0
    (each rank did it, printing it N times, and two ranks' exports raced for one directory); `sftune data` plans
    the steps as the ranks would train them: 2 ranks x 16 rows a step over 400 rows = 13 steps, as training says;
    and so does `sftune data --nproc-per-node 2` without torchrun."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["data", "--model", str(tiny_model_dir), "--dataset", str(QUICKSTART_DATA), "--batch-size", "16"]
    monkeypatch.setenv("RANK", "1")
    assert run_main(capsys, *argv) == (0, "", "")
    monkeypatch.setenv("RANK", "0")
    code, out, err = run_main(capsys, *argv, "--json")
    assert code == 0 and "sftune data: one process's work: rank 0 does it, the other 1 rank(s) exit" in err, err
    report = json.loads(out)
    assert report["ranks"] == 2 and report["splits"]["train"]["optimizer_steps_per_epoch"] == 13
    assert report["splits"]["train"]["heaviest_micro_batch"][0] == 16  # each rank's share of the 32 longest
    code, out, err = run_main(capsys, *argv)
    assert "13 batches of up to 32 rows (16 a rank x 2 ranks) per epoch = 13 optimizer steps" in out, out
    code, out, err = run_main(capsys, "tokenize", "--tokenizer", "bundled:gpt2", "Hello")
    assert code == 0 and out.count("ids:") == 1
    # without torchrun, `--nproc-per-node 2` plans them as `sftune train --nproc-per-node 2` will train them
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name)
    code, out, err = run_main(capsys, *argv, "--nproc-per-node", "2")
    assert code == 0 and "13 batches of up to 32 rows (16 a rank x 2 ranks) per epoch = 13 optimizer steps" in out, err


@needs_gpt2_files
def test_tokenize(tmp_path, capsys):
    text = "Hello, this is the first step of RLHF training."
    code, out, err = run_main(capsys, "tokenize", "--model", str(GPT2_DIR), "--json", text)
    assert code == 0, err
    row = json.loads(out)
    assert row["input_ids"] == [15496, 11, 428, 318, 262, 717, 2239, 286, 45715, 29567, 3047, 13]
    assert row["tokens"][:3] == ["Hello", ",", "Ġthis"] and row["decoded"] == text
    lines = tmp_path / "t.txt"
    lines.write_text("I have a dog\nI also have a cat\n")
    code, out, err = run_main(capsys, "tokenize", "--tokenizer", "bundled:gpt2", "--file", str(lines))
    assert code == 0, err
    assert "[40, 423, 257, 3290]" in out and "round trip exact" in out


def test_quickstart_config_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config's paths are relative to the repository
    out = tmp_path / "qs"
    code, stdout, err = run_main(capsys, "train", "--config", "configs/quickstart.yaml", "--max-steps", "10",
                                 "--eval-every", "5", "--output-dir", str(out))
    assert code == 0, err
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert stdout.count("sample: ") == 3


def test_a_real_process_has_written_everything_when_it_exits(tiny_model_dir, tmp_path):
    """`python -m sftune` ends in `os._exit` (`cli.quick_exit`, skipping the interpreter's teardown): the final
    lines, every metric, TensorBoard's events of the last step and the report are all there by then."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    out = tmp_path / "run"
    proc = run_cli("train", "--model", str(tiny_model_dir), "--dataset", str(QUICKSTART_DATA), "--max-steps", "6",
                   "--batch-size", "8", "--eval-every", "3", "--log-every", "1", "--precision", "fp32",
                   "--report-to", "tensorboard", "--sample-prompts", "the film is", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"model saved to {out}" in proc.stdout and proc.stdout.rstrip().splitlines()[-1].startswith("sample: ")
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r["type"] == "eval"] == [0, 3, 6]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert [e.step for e in events.Tensors("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in events.Tensors("eval/loss")] == [0, 3, 6]
    assert (out / "report.html").stat().st_size > 0 and (out / "loss.png").stat().st_size > 0


def test_a_log_reader_that_goes_away_does_not_end_the_run(tiny_model_dir, tmp_path):
    """`sftune train ... 2>&1 | head` (or a `tee` that dies with its terminal): the reader closes the pipe after step
    3, so every later write to it fails (EPIPE). The run goes on to its end with its output pointed at /dev/null:
    exit 0, every step in metrics.jsonl, the model saved. (It ended at the next log line with exit 1 before.)"""
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "sftune", "train", "--model", str(tiny_model_dir), "--dataset",
                             str(QUICKSTART_DATA), "--max-steps", "12", "--batch-size", "8", "--log-every", "1",
                             "--eval-every", "6", "--precision", "fp32", "--sample-prompts", "the film is",
                             "--output-dir", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step      3/"):
            break
    proc.stdout.close()  # the reader is gone
    assert proc.wait(timeout=120) == 0
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "train"] == list(range(1, 13))
    assert (out / "model.safetensors").is_file()


def test_no_library_chatter_for_a_local_dataset_with_a_plain_readme(tiny_model_dir, tmp_path):
    """A dataset directory whose README has no metadata block (as ../shared/data/sst2's): huggingface_hub's
    'Repo card metadata block was not found' stays out of sftune's output (a real process: its own loggers)."""
    data = tmp_path / "films"
    (data / "data").mkdir(parents=True)
    (data / "README.md").write_text("# Film sentences\n\nA few sentences about films.\n")
    rows = [json.dumps({"text": f"a film that is good number {i}"}) for i in range(40)]
    (data / "data" / "train.jsonl").write_text("\n".join(rows) + "\n")
    proc = run_cli("data", "--model", str(tiny_model_dir), "--dataset", str(data), "--val-fraction", "0.1")
    assert proc.returncode == 0, proc.stderr
    assert "format text" in proc.stdout + proc.stderr
    assert "Repo card" not in proc.stderr and "CardData" not in proc.stderr, proc.stderr


def test_python_dash_m_help():
    proc = run_cli("--help")
    assert proc.returncode == 0 and "train" in proc.stdout and "tokenize" in proc.stdout


def test_packed_training_runs_and_learns(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "packed"
    code, _, err = run_main(capsys, "train", "--model", str(tiny_model_dir), "--dataset", str(QUICKSTART_DATA),
                            "--packing", "--max-length", "64", "--batch-size", "2", "--max-steps", "12", "--lr", "3e-3",
                            "--precision", "fp32", "--group-by-length", "--output-dir", str(out))
    assert code == 0, err
    assert "1 x 2 packed rows of 64" in err
    assert "warning: --group-by-length does nothing with --packing" in err  # (said, not silently ignored)
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0


def test_data_report_packing_fill_rate(tiny_model_dir, capsys):
    code, out, err = run_main(capsys, "data", "--model", str(tiny_model_dir), "--dataset", str(QUICKSTART_DATA),
                              "--packing", "--max-length", "64", "--json")
    assert code == 0, err
    train = json.loads(out)["splits"]["train"]
    assert train["pack_fill_rate"] == pytest.approx(train["tokens"] / (train["packed_rows"] * 64))
    assert train["pack_fill_rate"] > 0.9


def test_batch_tokens_smaller_than_an_example_is_refused(tiny_model_dir, tmp_path, capsys):
    code, _, err = run_main(capsys, "train", "--model", str(tiny_model_dir), "--dataset", str(QUICKSTART_DATA),
                            "--batch-tokens", "8", "--output-dir", str(tmp_path / "o"))
    assert code == 2
    assert "batch_tokens 8 is smaller than the longest training example" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()
