"""Tier 1-2: the CLI's options and messages, in-process (`cli.main` with capsys)."""

import json
import subprocess
import sys

import pytest

from conftest import QUICKSTART_DATA, ROOT, assert_resumes_bitwise, read_jsonl, run_main
from sftune import __version__


def test_version(capsys):
    code, out, _ = run_main(capsys, "--version")
    assert code == 0 and out.strip() == f"sftune {__version__}"


@pytest.mark.parametrize("flag, suggestion", [("--lerning-rate", None), ("--bach-size", "--batch-size"),
                                              ("--max-step", "--max-steps"), ("--epoch", "--epochs")])
def test_a_misspelt_flag_suggests_the_right_one(capsys, flag, suggestion):
    code, _, err = run_main(capsys, "train", flag, "3")
    assert code == 2
    assert f"unknown option {flag}" in err and "sftune train --help" in err
    if suggestion:
        assert f"did you mean {suggestion}?" in err


@pytest.mark.parametrize("argv, says", [
    (["train", "--sample-prompts"], "sftune train: error: argument --sample-prompts: expected at least one argument "
                                    '(give "" for an empty list) (sftune train --help lists the options)'),
    (["eval", "--max-length"], "sftune eval: error: argument --max-length: expected one argument"),
    (["bogus"], "sftune: error: argument COMMAND: invalid choice: 'bogus'"),
    ([], "sftune: error: the following arguments are required: COMMAND (sftune --help lists the commands)"),
    # a yes/no flag given a value, each way it can be written
    (["train", "--packing=yes"], "sftune train: error: unexpected value 'yes': --packing takes no value (--packing to "
                                 "turn it on, --no-packing to turn it off)"),
    (["train", "--no-packing", "yes"], "unexpected value 'yes': --no-packing takes no value (--packing to turn it on, "
                                       "--no-packing to turn it off)"),
])
def test_a_flag_mistake_is_one_line_not_the_whole_usage(capsys, argv, says):
    code, out, err = run_main(capsys, *argv)
    assert code == 2 and says in err
    assert "usage:" not in err + out and len(err.strip().splitlines()) == 1, err


def test_a_flag_mistake_under_torchrun_is_said_by_the_nodes_first_rank(capsys, monkeypatch):
    """Every rank parses the same command line: local rank 0 says the mistake, the others exit 2 in silence (each
    rank printed it)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, said in (("1", False), ("0", True)):
        monkeypatch.setenv("LOCAL_RANK", rank)
        monkeypatch.setenv("RANK", rank)
        code, _, err = run_main(capsys, "eval", "--strategy", "fsdp")
        assert code == 2 and ("sftune eval: error: unknown option --strategy" in err) == said and bool(err) == said


def test_eval_help_lists_only_what_eval_uses(capsys):
    code, out, _ = run_main(capsys, "eval", "--help")
    assert code == 0
    for used in ("--model", "--dataset", "--precision", "--eval-batch-size", "--max-length"):
        assert used in out
    for unused in ("--lr", "--save-every", "--warmup-steps", "--packing", "--sample-prompts", "--resume"):
        assert unused not in out


def test_every_generate_option_has_help_with_its_default(capsys):
    from sftune.cli import build_parser

    parser = build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]
    for action in generate._actions:
        if action.option_strings and action.dest not in ("help", "model", "prompt", "chat"):
            assert action.help and "default" in action.help, action.dest


def test_the_config_is_summarised_in_a_few_lines():
    from sftune.commands import summarize_config
    from sftune.config import resolve_config

    text = summarize_config(resolve_config({"batch_size": 8, "lr": 1e-3, "packing": True}))
    assert len(text.splitlines()) <= 4
    assert "batch 8 x 1" in text and "lr 0.001" in text and "packing=True" in text and "--verbose" in text


def test_a_question_answer_pair_suggests_columns(tmp_path, small_model_dir, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"what is {i}?", "answer": f"it is {i}"}) + "\n"
                            for i in range(40)))
    code, _, err = run_main(capsys, "data", "--model", str(small_model_dir), "--dataset", str(data))
    assert code == 2
    assert "--columns prompt=question,completion=answer" in err and "Traceback" not in err


def test_a_sample_prompt_too_long_for_the_context_is_said_before_training(tmp_path, small_model_dir, capsys):
    """A --sample-prompts prompt that fills the model's context (128 tokens here) stopped the run at its first
    evaluation, with a message that named no flag; now it is refused before the model is loaded and anything is
    written to the output directory, naming --sample-prompts. One that leaves less room than --sample-max-new-tokens is warned about once (before: once per
    sample, at every evaluation), and its samples fill the context."""
    out = tmp_path / "run"
    flags = ("train", "--model", str(small_model_dir), "--dataset", str(QUICKSTART_DATA), "--batch-size", "50",
             "--max-steps", "3", "--eval-every", "1", "--no-run-report", "--report-to", "none", "--output-dir", str(out))
    code, _, err = run_main(capsys, *flags, "--sample-prompts", ("the film " * 100).strip())
    assert code == 2 and "--sample-prompts: prompt 1 ('the film the film" in err and "200 tokens" in err, err
    assert "context of 128: nothing can be generated after it" in err and not out.exists()
    code, _, err = run_main(capsys, *flags, "--sample-prompts", "a film", ("the film " * 60).strip(),
                            "--sample-max-new-tokens", "16")
    assert code == 0, err
    assert err.count("warning") == 1 and "after prompt 2 (120 tokens) only 8 of --sample-max-new-tokens 16" in err
    samples = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "sample" and r["index"] == 1]
    assert len(samples) == 4  # steps 0-3, each sample cut to the context without a word


@pytest.mark.slow
def test_max_steps_beyond_an_epoch_runs_them_and_a_long_warmup_is_warned(tmp_path, small_model_dir, capsys):
    """400 rows at batch 100 are 4 steps an epoch; --max-steps 6 runs 6 (into the second epoch), as the HF
    Trainer does, and a warm-up of 10 steps is longer than the run. (--strategy without torchrun: warned too.)"""
    out = tmp_path / "run"
    code, stdout, err = run_main(capsys, "train", "--model", str(small_model_dir), "--dataset", str(QUICKSTART_DATA),
                                 "--batch-size", "100", "--max-steps", "6", "--warmup-steps", "10",
                                 "--precision", "fp32", "--log-every", "1", "--output-dir", str(out),
                                 "--strategy", "fsdp")
    assert code == 0, err
    assert "warmup_steps 10 is longer than the run (6 steps)" in err
    assert "warning: --strategy fsdp spreads a run over the processes torchrun starts; this is one process" in err
    assert "6 optimizer steps (4 per epoch, 1.50 epochs)" in err
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r["type"] == "eval"] == [0, 4, 6]  # the epoch's end, and the run's
    assert "done: 6 steps" in stdout


def test_warmup_ratio_and_adams_settings(tmp_path, small_model_dir, capsys):
    """--warmup-ratio 0.3 of 6 steps is ceil(1.8) = 2 warm-up steps: the same run as --warmup-steps 2; the betas and
    epsilon reach AdamW (its state in the checkpoint) and change the training."""
    import torch

    def run(name, *flags):
        out = tmp_path / name
        code, _, err = run_main(capsys, "train", "--model", str(small_model_dir), "--dataset", str(QUICKSTART_DATA),
                                "--batch-size", "16", "--max-steps", "6", "--lr", "1e-2", "--precision", "fp32",
                                "--log-every", "1", "--save-every", "6", "--no-run-report", "--report-to", "none",
                                "--output-dir", str(out), *flags)
        assert code == 0, err
        return [(r["loss"], r["lr"]) for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "train"], err

    by_ratio, err = run("ratio", "--warmup-ratio", "0.3")
    assert "2 warm-up = ceil(0.3 x 6)" in err
    assert by_ratio == run("steps", "--warmup-steps", "2")[0]
    assert by_ratio[0][1] == pytest.approx(5e-3)  # (step 1 of 2)
    betas, _ = run("betas", "--warmup-ratio", "0.3", "--adam-beta2", "0.95", "--adam-epsilon", "1e-6")
    assert betas != by_ratio
    state = torch.load(tmp_path / "betas" / "checkpoints" / "step-6" / "training_state.pt", weights_only=True)
    group = state["optimizer"]["param_groups"][0]
    assert tuple(group["betas"]) == (0.9, 0.95) and group["eps"] == 1e-6


def test_lr_schedules_decay_to_min_lr_ratio():
    """Each step's learning rate: linear and cosine end at min_lr_ratio x lr (0: as transformers' own linear and
    cosine); wsd holds lr after warm-up, then decays over the last decay_ratio of the steps."""
    import math

    import torch
    from transformers import get_scheduler

    from sftune.update import build_scheduler
    from sftune.config import resolve_config

    def walk(make, total):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
        scheduler, seen = make(optimizer), []
        for _ in range(total + 1):
            seen.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return seen

    def lrs(total=10, warmup=2, **keys):
        return walk(lambda opt: build_scheduler(resolve_config({"lr": 1e-2, **keys}), opt, warmup, total), total)

    def theirs(name, total=10, warmup=2):
        return walk(lambda opt: get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total), total)

    assert lrs(lr_schedule="linear") == theirs("linear") and lrs(lr_schedule="cosine") == theirs("cosine")
    linear = lrs(lr_schedule="linear", min_lr_ratio=0.1)
    assert linear[:3] == pytest.approx([0, 5e-3, 1e-2]) and linear[-1] == pytest.approx(1e-3)
    assert linear[6] == pytest.approx(1e-3 + 9e-3 * 4 / 8)  # a straight line from lr to the floor
    cosine = lrs(lr_schedule="cosine", min_lr_ratio=0.1)
    assert cosine[-1] == pytest.approx(1e-3) and cosine[6] == pytest.approx(1e-3 + 9e-3 * 0.5)
    wsd = lrs(total=20, lr_schedule="wsd", decay_ratio=0.2, min_lr_ratio=0.1)  # decay: the last 4 steps
    assert wsd[2:17] == pytest.approx([1e-2] * 15) and wsd[-1] == pytest.approx(1e-3)
    assert wsd[18] == pytest.approx(1e-3 + 9e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 4)))
    assert lrs(total=20, lr_schedule="wsd")[-1] == 0  # (min_lr_ratio 0: down to 0)


def test_each_steps_lr_is_transformers_own_to_the_bit_and_resumes_across_them():
    """sftune's schedules (update.lr_factor) give every step the learning rate transformers' get_scheduler gives it,
    float for float, for each schedule and floor, with and without warm-up; a scheduler's state saved by either
    loads into the other (a checkpoint from before the change resumes exactly)."""
    import torch
    from transformers import get_scheduler

    from sftune.update import build_scheduler
    from sftune.config import resolve_config

    def optimizer():
        return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)

    def walk(scheduler, steps):
        seen = []
        for _ in range(steps):
            seen.append(scheduler.get_last_lr()[0])
            scheduler.optimizer.step()
            scheduler.step()
        return seen

    theirs_name = {("constant", 0): ("constant_with_warmup", {}), ("linear", 0): ("linear", {}),
                   ("cosine", 0): ("cosine", {}), ("linear", 0.1): ("polynomial", {"lr_end": 0.1 * 3e-4, "power": 1.0}),
                   ("cosine", 0.1): ("cosine_with_min_lr", {"min_lr_rate": 0.1})}
    for total, warmup in ((13, 0), (13, 3), (40, 7), (5, 4)):
        for (schedule, floor), (name, extra) in theirs_name.items():
            keys = {"lr": 3e-4, "lr_schedule": schedule, "min_lr_ratio": floor}
            ours = walk(build_scheduler(resolve_config(keys), optimizer(), warmup, total), total + 3)
            theirs = walk(get_scheduler(name, optimizer(), num_warmup_steps=warmup, num_training_steps=total,
                                        scheduler_specific_kwargs=extra), total + 3)
            assert ours == theirs, (schedule, floor, total, warmup)
        for floor in (0, 0.1):
            decay = -(-total // 5)
            if warmup + decay > total:
                continue
            keys = {"lr": 3e-4, "lr_schedule": "wsd", "min_lr_ratio": floor, "decay_ratio": 0.2}
            ours = walk(build_scheduler(resolve_config(keys), optimizer(), warmup, total), total + 3)
            theirs = walk(get_scheduler("warmup_stable_decay", optimizer(), num_warmup_steps=warmup,
                                        num_training_steps=total, scheduler_specific_kwargs={
                                            "num_decay_steps": decay, "min_lr_ratio": floor}), total + 3)
            assert ours == theirs, ("wsd", floor, total, warmup)
    # a checkpoint's scheduler state from transformers' own scheduler, 6 steps in, continues here to the bit
    keys = {"lr": 3e-4, "lr_schedule": "cosine", "min_lr_ratio": 0.1}
    theirs = get_scheduler("cosine_with_min_lr", optimizer(), num_warmup_steps=3, num_training_steps=20,
                           scheduler_specific_kwargs={"min_lr_rate": 0.1})
    walk(theirs, 6)
    ours = build_scheduler(resolve_config(keys), optimizer(), 3, 20)
    ours.load_state_dict(theirs.state_dict())
    assert walk(ours, 10) == walk(theirs, 10)


def test_warm_up_over_the_whole_run_with_a_floor_trains(tmp_path, small_model_dir, capsys):
    """--warmup-steps = --max-steps with --min-lr-ratio (transformers' polynomial decay divided by its 0 steps of
    decay: a ZeroDivisionError traceback after the last step, nothing saved): the run trains and saves, each step's lr
    a quarter more of the full one."""
    out = tmp_path / "run"
    code, _, err = run_main(capsys, "train", "--model", str(small_model_dir), "--dataset", str(QUICKSTART_DATA),
                            "--batch-size", "16", "--max-steps", "4", "--warmup-steps", "4", "--lr", "1e-3",
                            "--lr-schedule", "linear", "--min-lr-ratio", "0.1", "--log-every", "1", "--no-run-report",
                            "--report-to", "none", "--output-dir", str(out))
    assert code == 0, err
    assert [r["lr"] for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "train"] == pytest.approx(
        [2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert (out / "model.safetensors").is_file()


def test_a_full_fine_tunes_start_imports_neither_peft_nor_accelerate():
    """The lr schedule no longer comes from transformers.optimization, which imports its Trainer's utilities and
    through them peft and accelerate (283 modules, 1.35 s on a 2-core CPU): a full fine-tune's build imports
    neither."""
    code = ("import sys, torch; from sftune.update import build_scheduler; from sftune.config import resolve_config; "
            "opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]); "
            "build_scheduler(resolve_config({'lr_schedule': 'cosine'}), opt, 2, 10); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'peft', 'accelerate'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_adafactor_trains_keeps_factored_state_and_resumes_exactly(tmp_path, small_model_dir, capsys):
    """--optimizer adafactor: torch's Adafactor gets the parameter groups (no decay on 1-D ones), keeps a row and a
    column of second moments per matrix in the checkpoint, and a resumed run ends bitwise as the straight one."""
    import shutil

    import torch

    out = tmp_path / "run"
    flags = ("train", "--model", str(small_model_dir), "--dataset", str(QUICKSTART_DATA), "--batch-size", "16",
             "--max-steps", "6", "--save-every", "3", "--optimizer", "adafactor", "--lr", "1e-2", "--weight-decay",
             "0.1", "--precision", "fp32", "--no-run-report", "--report-to", "none", "--sample-prompts", "",
             "--output-dir", str(out))
    code, _, err = run_main(capsys, *flags)
    assert code == 0, err
    evals = [r["val_loss"] for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "eval"]
    assert evals[-1] < evals[0]
    state = torch.load(out / "checkpoints" / "step-3" / "training_state.pt", weights_only=True)["optimizer"]
    assert [g["weight_decay"] for g in state["param_groups"]] == [0.1, 0.0]
    kinds = {tuple(sorted(k for k in s if k != "step")) for s in state["state"].values()}
    assert kinds == {("col_var", "row_var"), ("variance",)}  # (matrices factored; vectors kept whole)
    shutil.rmtree(out / "checkpoints" / "step-6")
    assert_resumes_bitwise(capsys, out, "step-3")


def test_schedule_mistakes_are_named(tmp_path, small_model_dir, capsys):
    out = tmp_path / "run"
    base = ("train", "--model", str(small_model_dir), "--dataset", str(QUICKSTART_DATA), "--output-dir", str(out))
    for flags, message in (
            (("--min-lr-ratio", "0.1"), "min_lr_ratio = 0.1: is 0.1, but lr_schedule constant does not decay; choose "
                                        "--lr-schedule linear, cosine or wsd"),
            (("--lr-schedule", "wsd", "--decay-ratio", "0"), "decay_ratio = 0.0: must be above 0 and at most 1"),
            (("--lr-schedule", "cosine", "--min-lr-ratio", "1"), "min_lr_ratio = 1.0: must be at least 0 and below 1"),
            (("--optimizer", "adafactor", "--adam-epsilon", "1e-6"), "adam_epsilon = 1e-06: is an AdamW setting, but "
                                                                     "optimizer is adafactor; leave it out, or use "
                                                                     "--optimizer adamw"),
            (("--optimizer", "adafactor", "--strategy", "fsdp"), "optimizer = 'adafactor': adafactor does not run on "
                                                                  "FSDP's sharded parameters"),
            (("--lr-schedule", "wsd", "--max-steps", "10", "--warmup-steps", "9", "--decay-ratio", "0.2"),
             "lr_schedule wsd: 9 warm-up and 2 decay steps (decay_ratio 0.2) do not fit the run's 10 steps; lower "
             "--warmup-steps or --decay-ratio")):
        code, _, err = run_main(capsys, *base, *flags)
        assert code == 2 and "Traceback" not in err, err
        assert message in err, err
        assert not (out / "checkpoints").exists() and not (out / "model.safetensors").exists()


def test_eval_and_data_stream_without_max_steps(small_model_dir, capsys):
    """--streaming needs --max-steps to train (the schedule's end), not to evaluate or report."""
    from conftest import QUICKSTART_DATA

    code, out, err = run_main(capsys, "eval", "--model", str(small_model_dir), "--dataset", str(QUICKSTART_DATA),
                              "--streaming", "--json")
    assert code == 0, err
    assert json.loads(out)["examples"] > 0
    code, out, err = run_main(capsys, "data", "--model", str(small_model_dir), "--dataset", str(QUICKSTART_DATA),
                              "--streaming", "--json")
    assert code == 0, err


def test_eval_evaluates_the_split_it_is_given(small_model_dir, capsys):
    """`sftune eval --val-split train` (or `--split train`: eval trains nothing) evaluates the training rows, and
    reads no other split; without either, the validation split. It was refused ("must name another split than the
    training split"), and --split was silently ignored."""
    base = ("eval", "--model", str(small_model_dir), "--dataset", str(QUICKSTART_DATA), "--json")
    reports = {}
    for flags in ([], ["--val-split", "train"], ["--split", "train"], ["--split", "train[:40]"]):
        code, out, err = run_main(capsys, *base, *flags)
        assert code == 0, err
        reports[" ".join(flags)] = json.loads(out)
    assert (reports[""]["split"], reports[""]["examples"]) == ("validation", 60)
    assert (reports["--val-split train"]["split"], reports["--val-split train"]["examples"]) == ("train", 400)
    assert reports["--split train"] == reports["--val-split train"]
    assert reports["--split train[:40]"]["examples"] == 40
    assert "data: 400 examples of train to evaluate" in run_main(capsys, *base, "--split", "train")[2]
    code, _, err = run_main(capsys, *base, "--split", "train", "--val-split", "validation")
    assert code == 2 and "sftune eval evaluates one split" in err and "give --val-split alone" in err
    code, _, err = run_main(capsys, *base, "--split", "nope")  # said before the model is loaded (its GELU line)
    assert code == 2 and "has no 'nope' split" in err and "activation:" not in err


def test_an_empty_string_empties_a_list_flag():
    """`--sample-prompts ""` (a flag needs a value) turns the config file's prompts off; `--lora-targets ""` is then
    the config error an empty list is."""
    from sftune.cli import build_parser
    from sftune.commands import config_from_args
    from sftune.errors import SftuneError

    config = str(ROOT / "configs" / "quickstart.yaml")
    for empty in ("", "[]"):  # ([] as YAML writes it)
        args = build_parser().parse_args(["train", "--config", config, "--sample-prompts", empty])
        assert config_from_args(args).sample_prompts == []
    with pytest.raises(SftuneError, match="lora_targets"):
        config_from_args(build_parser().parse_args(["train", "--config", config, "--lora-r", "8", "--lora-targets", ""]))


def test_profile_steps_write_a_trace_and_a_summary(tmp_path, small_model_dir, capfd):
    """--profile-steps 2-3: torch.profiler over those optimizer steps; a Chrome trace and a summary with the wall time
    a step and the operators that took the most time (on a GPU also its busy time), named in the log; kineto's own
    "USDT: ... profiler_start" lines (written to the process's stderr by C++) kept out of it."""
    capsys = capfd  # (the descriptors' output: kineto writes past Python's sys.stderr)
    import gzip

    out = tmp_path / "run"
    code, _, err = run_main(capsys, "train", "--no-run-report", "--model", str(small_model_dir), "--dataset",
                            str(QUICKSTART_DATA), "--max-steps", "4", "--batch-size", "4", "--report-to", "none",
                            "--profile-steps", "2-3", "--output-dir", str(out))
    assert code == 0, err
    summary = (out / "profile" / "summary.txt").read_text()
    assert summary.startswith("steps 2-3 (2 optimizer steps)") and "ms a step" in summary
    assert "by CPU time (self):" in summary and "aten::" in summary
    trace = json.loads(gzip.open(out / "profile" / "trace.json.gz").read())
    assert any(event.get("name", "").startswith("aten::") for event in trace["traceEvents"])
    assert f"profile of steps 2-3: {out / 'profile'}" in err and "USDT" not in err and "profiler_st" not in err
    for bad in ("5", "3-2", "0-4", "a-b"):
        code, _, err = run_main(capsys, "train", "--model", str(small_model_dir), "--dataset", str(QUICKSTART_DATA),
                                "--profile-steps", bad, "--output-dir", str(tmp_path / "bad"))
        assert code == 2 and "Traceback" not in err, err
        assert f"profile_steps = '{bad}': must be two step numbers A-B with 1 <= A <= B, e.g. 20-30" in err, err


def test_the_quick_exit_ends_like_a_normal_exit_with_a_thread_pool_alive(tmp_path):
    """`cli.quick_exit` (how `python -m sftune` ends) in a real process that holds what a run can leave behind: an
    idle thread pool (inductor compiles in one: a `--compile torch` run hung at its exit waiting for its workers),
    a thread that is not a daemon and still working, and an atexit handler. It exits at once with its code, after
    the thread's work and the handler, as the interpreter's own exit does."""
    import subprocess
    import sys

    script = f"""
import atexit, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from sftune.cli import quick_exit

pool = ThreadPoolExecutor(2)
pool.submit(print, "pooled work", flush=True).result()
threading.Thread(target=lambda: (time.sleep(0.5), Path({str(tmp_path / "thread")!r}).write_text("done"))).start()
atexit.register(print, "atexit handler")
quick_exit(7)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout.splitlines() == ["pooled work", "atexit handler"]
    assert (tmp_path / "thread").read_text() == "done"


def test_the_model_is_saved_in_the_dtype_its_config_declares(tmp_path, tiny_model_dir, capsys):
    """A bf16 checkpoint (as most on the Hub are) fine-tuned gives a bf16 model of the same size (fp32 would double
    it), its weights the trained fp32 ones rounded once; the checkpoints keep fp32 (exact resume). --save-dtype
    fp32 writes the trained weights as they are, and `sftune export --save-dtype bf16` of that model the bf16 one."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import FIXTURES

    base = tmp_path / "bf16-base"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(FIXTURES / "tiny-llama")).to(
        torch.bfloat16).save_pretrained(base)
    common = ["train", "--model", str(base), "--tokenizer", str(tiny_model_dir), "--dataset", str(QUICKSTART_DATA),
              "--max-steps", "2", "--save-every", "2", "--sample-prompts", "", "--no-run-report"]
    code, _, err = run_main(capsys, *common, "--output-dir", str(tmp_path / "run"))
    assert code == 0, err
    assert "output: the model is saved in bf16, the dtype its config declares" in err
    saved, trained = load_file(tmp_path / "run" / "model.safetensors"), \
        load_file(tmp_path / "run" / "checkpoints" / "step-2" / "model.safetensors")
    assert saved.keys() == trained.keys() and {t.dtype for t in trained.values()} == {torch.float32}
    assert all(saved[k].dtype == torch.bfloat16 and torch.equal(saved[k], trained[k].to(torch.bfloat16))
               for k in saved)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run").dtype == torch.bfloat16

    code, _, err = run_main(capsys, *common, "--save-dtype", "fp32", "--output-dir", str(tmp_path / "fp32"))
    assert code == 0 and "output:" not in err, err
    assert all(torch.equal(t, trained[k]) for k, t in load_file(tmp_path / "fp32" / "model.safetensors").items())
    # `sftune export` of a full model with --save-dtype: a copy in that dtype, rounded as the run's own save rounds
    code, stdout, err = run_main(capsys, "export", str(tmp_path / "fp32"), "--output-dir", str(tmp_path / "as-bf16"),
                                 "--save-dtype", "bf16")
    assert code == 0 and f"the model in bf16 written to {tmp_path / 'as-bf16'}" in stdout, err
    exported = load_file(tmp_path / "as-bf16" / "model.safetensors")
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "as-bf16").dtype == torch.bfloat16


def test_a_tied_head_is_saved_once_in_bf16_and_fp16_overflow_is_refused(tmp_path, small_model_dir, capsys):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from sftune.errors import SftuneError
    from sftune.modeling import cast_weights

    code, _, err = run_main(capsys, "train", "--model", str(small_model_dir), "--dataset", str(QUICKSTART_DATA),
                            "--max-steps", "1", "--sample-prompts", "", "--no-run-report", "--save-dtype", "bf16",
                            "--output-dir", str(tmp_path / "run"))
    assert code == 0 and "output: the model is saved in bf16; " in err, err
    saved = load_file(tmp_path / "run" / "model.safetensors")
    assert "transformer.wte.weight" in saved and "lm_head.weight" not in saved  # (GPT-2's head is the embedding)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert model.dtype == torch.bfloat16 and model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()

    weight = torch.tensor([1.0, 7e4])
    cast = cast_weights({"a.weight": weight, "b.weight": weight, "steps": torch.tensor([3])}, torch.bfloat16)
    assert cast["a.weight"] is cast["b.weight"] and cast["steps"].dtype == torch.int64
    with pytest.raises(SftuneError, match=r"weight a.weight has values beyond float16 .* \(--save-dtype\)"):
        cast_weights({"a.weight": weight}, torch.float16)
