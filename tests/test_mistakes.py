"""Tier 2: inputs that exhausted memory or hung, and mistakes that reached the user as a traceback (issue 13,
items 8-10). Each gets one message naming the value and the fix, exit status 2, and nothing written.
In-process (`cli.main`), except the signal test."""

import json
from pathlib import Path

import pytest

from conftest import QUICKSTART_DATA, read_jsonl, run_main, signal_at

pytestmark = pytest.mark.slow


def train(model_dir, out, *extra, dataset=QUICKSTART_DATA):
    return ["train", "--model", str(model_dir), "--dataset", str(dataset), "--precision", "fp32",
            "--output-dir", str(out), *extra]


def refused(capsys, *argv, words):
    code, _, err = run_main(capsys, *argv)
    assert code == 2, err
    for w in words:
        assert w in err, err
    assert "Traceback" not in err
    return err


# --- 8. inputs that exhaust memory or hang -----------------------------------------------------------


def test_a_yaml_alias_bomb_gives_a_short_message(tmp_path, capsys):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 7)]  # 10^7 leaves
    (tmp_path / "bomb.yaml").write_text("\n".join(levels).replace("a0:", "sample_prompts_x:", 0) + "\n"
                                        "sample_prompts: *a6\n")
    code, _, err = run_main(capsys, "train", "--config", str(tmp_path / "bomb.yaml"))
    assert code == 2 and "`sample_prompts` must be a list of strings" in err
    assert len(err) < 2000  # the value is shown bounded, not expanded


def test_many_epochs_with_max_steps_plan_only_what_runs(small_model_dir, tmp_path, capsys):
    code, _, err = run_main(capsys, *train(small_model_dir, tmp_path / "run", "--epochs", "1000000", "--max-steps", "2"))
    assert code == 0, err
    assert "2 optimizer steps (13 per epoch, 0.15 epochs)" in err


def test_an_overlong_jsonl_line_is_refused_before_loading(small_model_dir, tmp_path, capsys):
    data = tmp_path / "big.jsonl"
    row = json.dumps({"text": "a warm film"})
    data.write_text(f"{row}\n{row}\n" + json.dumps({"text": "x " * (9 << 20)}) + f"\n{row}\n")  # line 3: 18 MiB
    refused(capsys, *train(small_model_dir, tmp_path / "o", dataset=data),
            words=[f"{data}:3: a line of more than 16 MiB", "split or remove it", "--dataset"])


@pytest.mark.parametrize("when", ["always", "partial"])
def test_a_chat_template_that_does_not_finish_is_stopped(when, small_model_dir, tmp_path, capsys, monkeypatch):
    """A template that loops: on every conversation, or only on a part of one (one of the partial renders that
    find the turns, whose other errors mean "this prefix does not render": the time limit is not one of them)."""
    from sftune.data import templates

    monkeypatch.setattr(templates, "RENDER_LIMIT_S", 0.5)
    template = tmp_path / "slow.jinja"
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    if when == "partial":  # (the first message alone, without the generation prompt: only a partial render)
        loop = "{% if messages|length == 1 and not add_generation_prompt %}" + loop + "{% endif %}"
    template.write_text(loop + "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    chat = tmp_path / "chat.jsonl"
    row = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    chat.write_text((row + "\n") * 4)
    refused(capsys, *train(small_model_dir, tmp_path / "o", "--chat-template", str(template), dataset=chat),
            words=["the chat template took more than 0.5 s", "--chat-template"])


# --- 9. no traceback for a user's mistake -----------------------------------------------------------


def test_yaml_keys_that_are_not_names_and_files_that_are_not_utf8(tmp_path, capsys):
    (tmp_path / "numbers.yaml").write_text("1: 2\nlr: 1e-4\n")
    refused(capsys, "train", "--config", str(tmp_path / "numbers.yaml"), words=["key 1 is not a name"])
    (tmp_path / "latin1.yaml").write_bytes("output_dir: caf\xe9\n".encode("latin-1"))
    refused(capsys, "train", "--config", str(tmp_path / "latin1.yaml"), words=["is not UTF-8 text", "--config"])


@pytest.mark.parametrize("flags, words", [
    (["--seed", "-5"], ["seed = -5: must be from 0 to 2**64 - 1", "--seed"]),
    (["--seed", str(2**64)], ["seed = 18446744073709551616: must be from 0 to 2**64 - 1", "--seed"]),
    (["--model-config-overrides", "n_embd=1.5"], ["--model-config-overrides n_embd=1.5: ", "int",
                                                  "fix it in --model-config-overrides"]),
    (["--packing", "--model-config-overrides", "n_positions=8192"],  # (a 8k-context model packed without a length)
     ["--packing fills rows of max_length tokens", "32 x 8,192 = 262,144 tokens", "Set --max-length"]),
    (["--resume", "nowhere/step-4"], ["--resume nowhere/step-4: no such checkpoint; give a checkpoint directory",
                                      "--resume auto"]),
    (["--dist-timeout", str(10**20)], ["dist_timeout = 100000000000000000000: must be from 1 second", "10**9",
                                       "--dist-timeout"]),
    (["--dataset", ","], ["--dataset ',' names no file", "--dataset"]),
    (["--sample-prompts", "the film", "--sample-max-new-tokens", "500"],
     ["sample_max_new_tokens 500 does not fit the model's context of 128", "--sample-max-new-tokens"]),
    (["--sample-prompts", "the film", " "], ["sample_prompts", "must be non-empty texts", '--sample-prompts ""']),
])
def test_train_mistakes(flags, words, small_model_dir, tmp_path, capsys):
    refused(capsys, *train(small_model_dir, tmp_path / "o", *flags), words=words)
    assert not (tmp_path / "o").exists()


def test_a_tokenizer_larger_than_the_models_vocabulary(tmp_path, capsys):
    from transformers import GPT2Config

    model = tmp_path / "small-vocab"
    GPT2Config(n_layer=1, n_embd=16, n_head=1, n_positions=64, vocab_size=1000).save_pretrained(model)
    refused(capsys, "train", "--model", str(model), "--tokenizer", "bundled:gpt2", "--init", "random",
            "--dataset", str(QUICKSTART_DATA), "--output-dir", str(tmp_path / "o"),
            words=["the tokenizer has 50,257 tokens but the model's vocabulary only 1,000", "--tokenizer"])


def test_an_empty_chat_template_file_is_an_error(small_model_dir, tmp_path, capsys):
    (tmp_path / "empty.jinja").write_text("\n")
    refused(capsys, *train(small_model_dir, tmp_path / "o", "--chat-template", str(tmp_path / "empty.jinja")),
            words=["the chat template", "is empty", "--chat-template"])


def test_text_that_is_not_utf8_on_the_command_line(small_model_dir, tmp_path, capsys):
    bad = "caf\udce9"  # how Python passes the byte 0xe9 of a Latin-1 argument
    refused(capsys, "tokenize", "--tokenizer", "bundled:gpt2", bad, words=["is not UTF-8 text"])
    refused(capsys, "generate", "--model", str(small_model_dir), "--prompt", bad, words=["--prompt", "not UTF-8"])
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    refused(capsys, "tokenize", "--tokenizer", "bundled:gpt2", "--file", str(latin1), words=["not UTF-8", "--file"])
    refused(capsys, "tokenize", "--tokenizer", "bundled:gpt2", "--file", str(tmp_path),
            words=[f"{tmp_path} is a directory; give --file a text file"])


def test_an_output_directory_that_cannot_be_made(small_model_dir, capsys):
    """/proc makes no directories, even for root (a read-only directory would not stop root: CI runs as root).
    (`sftune export` takes the same lock on its output directory.)"""
    refused(capsys, *train(small_model_dir, "/proc/sftune-run"),
            words=["could not create the output directory /proc/sftune-run: No such file", "choose another --output-dir"])


def test_the_output_directory_may_not_be_one_the_run_reads(small_model_dir, tmp_path, capsys):
    """`--output-dir` = the --model directory with --overwrite removed the base's files first, then trained: a run
    that failed then left neither the base nor a fine-tuned model."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(small_model_dir, base)
    files = sorted(p.name for p in base.iterdir())
    refused(capsys, *train(base, base, "--overwrite"), words=[f"--output-dir {base} is the --model directory the "
                                                              "run reads", "choose another --output-dir"])
    assert sorted(p.name for p in base.iterdir()) == files
    project = tmp_path / "project"  # (`--output-dir . --overwrite` in a project: its README.md and config.yaml)
    project.mkdir()
    (project / "README.md").write_text("# mine\n")
    (project / "config.yaml").write_text("model: gpt2\n")
    refused(capsys, *train(small_model_dir, project, "--overwrite"),
            words=["nothing there is one (no metrics.jsonl, checkpoints or run config.yaml), and it would remove "
                   "config.yaml, README.md: files of yours"])
    assert (project / "README.md").read_text() == "# mine\n" and (project / "config.yaml").is_file()


def test_a_chat_template_directory_without_a_tokenizer(small_model_dir, tmp_path, capsys):
    refused(capsys, *train(small_model_dir, tmp_path / "o", "--chat-template", str(tmp_path)),
            words=[f"{tmp_path} holds no tokenizer files", "give --chat-template a Jinja file"])


def test_generation_options(small_model_dir, capsys):
    refused(capsys, "generate", "--model", str(small_model_dir), "--prompt", "hi", "--temperature", "nan",
            words=["temperature must be 0 (greedy) or a positive number, got nan", "--temperature"])
    code, _, err = run_main(capsys, "generate", "--model", str(small_model_dir), "--prompt", "hi",
                            "--max-new-tokens", "-1")
    assert code == 2 and "--max-new-tokens must be at least 1, got -1" in err and "activation:" not in err  # (early)
    for seed in ("-1", str(2**64)):
        refused(capsys, "generate", "--model", str(small_model_dir), "--prompt", "hi", "--seed", seed,
                words=[f"--seed must be from 0 to 2**64 - 1 (torch's seeds are unsigned 64-bit), got {seed}"])
    refused(capsys, "generate", "--model", str(small_model_dir), "--prompt", "hi", "--system", "be brief",
            words=["--system goes with --chat MESSAGE"])
    refused(capsys, "generate", "--model", str(small_model_dir), "--prompt", "hi", "--temperature", "0",
            "--num-samples", "3", words=["--temperature 0 decodes greedily, which gives one completion, not "
                                         "--num-samples 3"])
    for many in (10**12, 10**20):  # (past 2**63 torch's sizes overflow)
        refused(capsys, "generate", "--model", str(small_model_dir), "--prompt", "hi", "--num-samples", str(many),
                words=["out of memory", "--num-samples"])
    code, out, err = run_main(capsys, "generate", "--model", str(small_model_dir), "--prompt", "the film is",
                              "--max-new-tokens", "5000", "--temperature", "0", "--json")
    assert code == 0, err
    assert "exceed the model's context of 128; generating 125 (--max-new-tokens)" in err


def test_sftune_eval_out_of_memory_names_the_batch_size(small_model_dir, capsys, monkeypatch):
    """A GPU's out-of-memory error while `sftune eval` runs (raised in place of the evaluation: a CPU does not run
    out that way) is one line naming --eval-batch-size, exit 2."""
    import importlib

    import torch

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    importlib.import_module("sftune.train")  # (it binds the real evaluate for the tests after this one)
    monkeypatch.setattr(importlib.import_module("sftune.evaluate"), "evaluate", out_of_memory)
    refused(capsys, "eval", "--model", str(small_model_dir), "--dataset", str(QUICKSTART_DATA), "--eval-batch-size", "64",
            words=["out of memory evaluating batches of up to 64 rows (CUDA out of memory. Tried to allocate 20.00 GiB)",
                   "lower --eval-batch-size"])


def test_more_processes_than_gpus_on_a_node_is_said_once(small_model_dir, tmp_path, capsys, monkeypatch):
    """torchrun --nproc-per-node 3 on a node with one GPU: local rank 1 is the first without a GPU and says so (torch
    says "invalid device ordinal"); local rank 2 exits with the same status in silence (a CPU stands in for the
    node: torch.cuda reports one GPU; gpu_check.py runs the real one)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setenv("WORLD_SIZE", "3")
    argv = train(small_model_dir, tmp_path / "o", "--device", "cuda")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    refused(capsys, *argv, words=[
        "sftune train [rank 1]: error: torchrun started more processes on this node than it has GPUs: this is "
        "LOCAL_RANK 1, and 1 GPU(s) are visible (CUDA_VISIBLE_DEVICES=3); launch one process a GPU: torchrun "
        "--nproc-per-node 1 (or --device cpu)"])
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr("sftune.cli.QUIET_RANK_WAIT_S", 0.0)  # (under torchrun it waits to be ended: try 120)
    code, _, err = run_main(capsys, *argv)
    assert code == 2 and err == ""
    assert not (tmp_path / "o").exists()


def test_a_truncated_model_file_in_eval_and_generate(small_model_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(small_model_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
    for argv in (["eval", "--model", str(broken), "--dataset", str(QUICKSTART_DATA)],
                 ["generate", "--model", str(broken), "--prompt", "hi"]):
        refused(capsys, *argv, words=[f"could not load model weights from {broken}", "truncated"])


def test_an_override_that_changes_a_weights_shape_names_it(small_model_dir, tmp_path, capsys):
    """--model-config-overrides n_positions=256 (a training config's, for a model built fresh) on trained weights
    of 128 positions: transformers' "ignore_mismatched_sizes ... see the above report" (a report nobody saw) became
    the tensor, both shapes and the fix; a config.json edited after its weights were written is named too."""
    import shutil

    refused(capsys, *train(small_model_dir, tmp_path / "run"), "--model-config-overrides", "n_positions=256",
            words=[f"the weights in {small_model_dir} do not fit its config with model_config_overrides n_positions=256",
                   "transformer.wpe.weight (128, 64) in the file, (256, 64) in the config", "--init random"])
    edited = tmp_path / "edited"
    shutil.copytree(small_model_dir, edited)
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**config, "n_embd": 128}))
    refused(capsys, *train(edited, tmp_path / "run"), words=[f"the weights in {edited} do not fit its config: ",
                                                             "Its config.json was changed after the weights"])
    assert not (tmp_path / "run").exists()


def test_sigterm_during_the_first_evaluation(tiny_model_dir, tmp_path):
    """A validation split of 2,000 long rows makes the first evaluation last many seconds; SIGTERM stops it
    within a batch, with exit 143 and a message, and nothing half-written is left (no model, no checkpoint)."""
    data = tmp_path / "data"
    data.mkdir()
    row = json.dumps({"text": "a long and winding review of a film " * 12})
    (data / "train.jsonl").write_text((row + "\n") * 64)
    (data / "validation.jsonl").write_text((row + "\n") * 2000)
    out = tmp_path / "run"
    code, err = signal_at(train(tiny_model_dir, out, "--save-every", "1", dataset=data),
                          "loss:")  # the last line before the first evaluation
    assert code == 143, err
    assert "stopped by SIGTERM; before the first step: nothing was trained or saved" in err
    assert "start again with --resume auto" in err and "Traceback" not in err
    assert not (out / "model.safetensors").exists() and not (out / "checkpoints").exists()


def test_a_signal_while_the_data_is_prepared_stops_at_once(tiny_model_dir, tmp_path):
    """Reading and tokenizing a large dataset takes minutes, and a single process has nothing to save then: SIGTERM
    (or Ctrl-C) stops it where it is (it finished the preparation and loaded the model first before), exit 143,
    and neither the run's directory nor a half-written data cache entry is left."""
    import os

    rows = [json.dumps({"text": f"review {i}: a long and winding story of a film, told slowly and with care"})
            for i in range(150_000)]  # (about 3 s of tokenizing on 2 cores; the signal comes before it starts)
    (tmp_path / "big.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    code, err = signal_at(train(tiny_model_dir, out, "--dataset", str(tmp_path / "big.jsonl")), "max_length:")
    assert code == 143, err
    assert "stopped by SIGTERM; before the first step: nothing was trained or saved" in err and "Traceback" not in err
    assert "\ndata:" not in err and "\nmodel:" not in err, err  # stopped in the preparation, not after it
    assert not out.exists()
    cache = os.environ["SFTUNE_CACHE"]
    assert not [p for p in Path(cache).rglob(".tmp-*")], "a half-written cache entry was left"


# --- 10. messages that point the right way -----------------------------------------------------------


def test_generate_on_an_unfinished_run_points_at_its_checkpoints(small_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-4").mkdir(parents=True)
    (run / "config.json").write_text((small_model_dir / "config.json").read_text())
    err = refused(capsys, "generate", "--model", str(run), "--prompt", "hi",
                  words=["looks like an unfinished run", "checkpoints/step-N", "--resume auto"])
    assert "--tokenizer" not in err  # generate has no such option


def test_remote_code_names_the_flag(tmp_path, capsys):
    model = tmp_path / "custom"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "my_own_lm", "auto_map": {
        "AutoConfig": "configuration_mine.MyConfig", "AutoModelForCausalLM": "modeling_mine.MyModel"}}))
    err = refused(capsys, "train", "--model", str(model), "--tokenizer", "bundled:gpt2", "--dataset",
                  str(QUICKSTART_DATA), "--output-dir", str(tmp_path / "o"), words=["--trust-remote-code"])
    assert "trust_remote_code=True" not in err


def test_integer_text_cells_are_text(small_model_dir, tmp_path, capsys):
    data = tmp_path / "numbers.jsonl"
    data.write_text("".join(json.dumps({"text": 10**9 + i}) + "\n" for i in range(40)))
    code, out, err = run_main(capsys, "data", "--model", str(small_model_dir), "--dataset", str(data),
                              "--min-tokens", "0", "--json")
    assert code == 0, err
    train_split = json.loads(out)["splits"]["train"]
    assert train_split["dropped"]["empty"] == 0 and train_split["kept"] == train_split["rows"]


def test_mixed_formats_name_the_mix(small_model_dir, tmp_path, capsys):
    data = tmp_path / "mixed.jsonl"
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    pair = {"prompt": "Q: 2+2?", "completion": " 4"}
    data.write_text("".join(json.dumps(r) + "\n" for r in [chat, chat, pair, chat] * 5))
    refused(capsys, *train(small_model_dir, tmp_path / "o", dataset=data),
            words=["the data mixes formats", "prompt/completion", "read as chat", "--format"])


def test_a_csv_quote_never_closed_is_an_error_not_merged_rows(small_model_dir, tmp_path, capsys):
    data = tmp_path / "reviews.csv"
    data.write_text('text\n"a warm film, well made\nthe plot drags\na fine cast\n' * 10)
    refused(capsys, *train(small_model_dir, tmp_path / "o", dataset=data),
            words=[f"{data}:", "never closed", "--dataset"])


def test_metrics_are_not_touched_by_a_refused_resume(small_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_main(capsys, *train(small_model_dir, out, "--max-steps", "2", "--save-every", "1"))
    assert code == 0, err
    before = read_jsonl(out / "metrics.jsonl")
    refused(capsys, *train(small_model_dir, out, "--max-steps", "2", "--save-every", "1", "--resume", "auto",
                           "--lr", "1"), words=["training settings differ"])
    assert read_jsonl(out / "metrics.jsonl") == before
