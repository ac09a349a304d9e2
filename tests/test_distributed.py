"""Tier 2: several processes through torchrun (DDP and FSDP, gloo on CPU) equal one process, and stop together.

`torchrun --nproc-per-node 2` at batch 16 per rank trains on the same rows in each optimizer step as one
process at batch 32 (the global step plan is the same; each rank takes every other row), with the loss
token-weighted over both ranks' targets, so the weights agree within float rounding. The data mixes
sentences of 5 and of 40-55 words in a shuffled order, so the two ranks hold very different lengths.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICKSTART_DATA, ROOT, read_jsonl, run_captured, run_main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory):
    rng = random.Random(0)
    words = "the film is a warm funny sad long dull bright story of love and loss in a small town".split()
    d = tmp_path_factory.mktemp("uneven")
    for split, n in (("train", 96), ("validation", 20)):
        rows = [" ".join(rng.choice(words) for _ in range(rng.choice([6, 7, 40, 55]))) for _ in range(n)]
        (d / f"{split}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return d


@pytest.fixture(scope="module")
def many_rows(tmp_path_factory):
    """More rows than one streamed chunk of 16 x 64 (so the chunks of 2 ranks at 16 and of 1 process at 32 differ
    unless they count global rows)."""
    rng = random.Random(1)
    words = "a an the film story plot cast score slow quick warm cold long short".split()
    d = tmp_path_factory.mktemp("many")
    for split, n in (("train", 1200), ("validation", 20)):
        rows = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 30))) for _ in range(n)]
        (d / f"{split}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return d


def args(model_dir, data, out, batch, *extra):
    return ["train", "--model", str(model_dir), "--dataset", str(data), "--batch-size", str(batch), "--max-steps", "3",
            "--no-group-by-length", "--precision", "fp32", "--lr", "1e-4", "--log-every", "1", "--no-run-report",
            "--output-dir", str(out), *extra]


def torchrun(*argv, ranks=2, env=(), flags=(), **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *flags,
           "-m", "sftune", *argv]
    return subprocess.Popen(cmd, cwd=ROOT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **dict(env)}, **popen)


def sftune_ranks(*argv, ranks=2, env=(), **popen):
    """`sftune ARGV --nproc-per-node RANKS`: sftune starting the ranks itself (as torchrun --standalone does)."""
    cmd = [sys.executable, "-m", "sftune", *argv, "--nproc-per-node", str(ranks)]
    return subprocess.Popen(cmd, cwd=ROOT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **dict(env)},
                            **popen)


def metrics(out):
    rows = read_jsonl(out / "metrics.jsonl")
    return ([(r["step"], r["loss"], r["tokens"], r["grad_norm"]) for r in rows if r["type"] == "train"],
            [(r["step"], r["val_loss"]) for r in rows if r["type"] == "eval"])


def test_the_two_ranks_hold_rows_of_very_different_lengths(uneven_data, gpt2_tokenizer):
    from conftest import prepare
    from sftune.batching import epoch_steps

    data = prepare(uneven_data, gpt2_tokenizer, 128, cache_dir=uneven_data / "cache")
    lengths = data.train.lengths
    first = epoch_steps(lengths, 32, 1, 42, 0, group_by_length=False)[0][0]
    per_rank = [int(lengths[first[r::2]].sum()) for r in (0, 1)]
    assert sorted(lengths.tolist())[0] < 12 and sorted(lengths.tolist())[-1] > 40
    assert abs(per_rank[0] - per_rank[1]) > 0.1 * max(per_rank)  # the ranks' shares differ in tokens


def launch(runs: list, tmp_path, ranks: int = 2) -> str:
    """One torchrun launch, in `tmp_path`, that runs each `sftune` argument list in turn (tests/distributed_runs.py)."""
    spec = tmp_path / f"spec-{len(list(tmp_path.glob('spec-*')))}.json"
    spec.write_text(json.dumps(runs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           str(ROOT / "tests" / "distributed_runs.py"), str(spec)]
    proc = subprocess.run(cmd, cwd=tmp_path, text=True, capture_output=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def assert_same_training(single, double):
    weights = "adapter_model.safetensors" if (single / "adapter_model.safetensors").is_file() else "model.safetensors"
    a, b = load_file(single / weights), load_file(double / weights)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    (train_a, evals_a), (train_b, evals_b) = metrics(single), metrics(double)
    assert [(s, t) for s, _, t, _ in train_a] == [(s, t) for s, _, t, _ in train_b]  # same steps, same tokens
    np.testing.assert_allclose([l for _, l, _, _ in train_b], [l for _, l, _, _ in train_a], rtol=1e-5)
    # the gradient itself, before clipping: Adam's update hides a wrong gradient scale, the norm does not. (FSDP
    # sums the norm's squares shard by shard: 2.4e-5 relative off on the Llama-shaped model; a scale bug is 2x.)
    np.testing.assert_allclose([g for *_, g in train_b], [g for *_, g in train_a], rtol=1e-4)
    assert [s for s, _ in evals_a] == [s for s, _ in evals_b]
    np.testing.assert_allclose([v for _, v in evals_b], [v for _, v in evals_a], rtol=1e-6)  # sum over sum


CASES = {  # name: (model, extra flags, single process (batch, accum), per rank (batch, accum), strategy)
    "ddp": ("gpt2", [], (32, 1), (16, 1), "ddp"),
    # (--save-minutes: a checkpoint after every step, the ranks agreeing on when; removed at the end)
    "ddp-accum": ("gpt2", ["--save-minutes", "0.00006"], (16, 2), (8, 2), "ddp"),
    "fsdp-accum": ("gpt2", ["--save-every", "2", "--sample-prompts", "the film is", "a"], (16, 2), (8, 2), "fsdp"),
    "fsdp-llama": ("llama", [], (32, 1), (16, 1), "fsdp"),
    "ddp-lora-llama": ("llama", ["--lora-r", "4", "--lora-modules-to-save", "lm_head", "--lora-use-dora",
                                 "--lr", "1e-2", "--gradient-checkpointing"], (16, 2), (8, 2), "ddp"),
    "ddp-compiled": ("gpt2", ["--compile", "torch", "--compile-backend", "aot_eager"], (32, 1), (16, 1), "ddp"),
    "fsdp-lora": ("gpt2", ["--lora-r", "4", "--lora-modules-to-save", "wte", "--lr", "1e-3", "--merge",
                           "--save-every", "2"], (16, 2), (8, 2), "fsdp"),
    # --add-tokens: the embedding and the untied head grown (on rank 1 without weights, from rank 0's), and under
    # LoRA their new rows trained as peft trainable tokens, sharded
    "fsdp-tokens-llama": ("llama", ["--add-tokens", "<|a|>", "<|b|>"], (32, 1), (16, 1), "fsdp"),
    # (lr 1e-3: at 1e-2, Adam's steps on lora_A's near-zero first gradients (B starts at 0) carry the ranks' other
    # summation order past 1e-5 for some initial draws: 1.06e-5 on one element of 256 for one)
    "fsdp-lora-tokens-llama": ("llama", ["--add-tokens", "<|a|>", "--lora-r", "4", "--lr", "1e-3"], (16, 2), (8, 2),
                               "fsdp"),
    "ddp-lora-tokens": ("gpt2", ["--add-tokens", "<|a|>", "<|b|>", "--lora-r", "4", "--lr", "1e-2"], (32, 1), (16, 1),
                        "ddp"),  # (GPT-2: one trained-rows tensor serves the tied embedding and head)
}
LONGER = ("--max-steps", "6", "--save-every", "4")  # the fault test's run
# lr 0.1: the val loss is best after step 1 (4.32), then 6.69 and 6.82, so the final model is step 1's
BEST = ("--lr", "1e-1", "--eval-every", "1", "--save-best", "--final-model", "best")


@pytest.fixture(scope="module")
def launched(uneven_data, many_rows, small_model_dir, tiny_model_dir, tmp_path_factory):
    """Each case in one process (in this one) and on 2 ranks, all in one torchrun launch (start-up paid once),
    with the uninterrupted 2-rank run the fault test compares against. The models have a 512-token vocabulary
    (`small_model_dir`'s tokenizer): the ranks' arithmetic is what is compared, not GPT-2's ids."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from test_families import FIXTURES

    root = tmp_path_factory.mktemp("dist")
    config = AutoConfig.from_pretrained(FIXTURES / "tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(small_model_dir)
    config.vocab_size, config.bos_token_id, config.eos_token_id = len(tokenizer), tokenizer.eos_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "tiny-llama")
    tokenizer.save_pretrained(root / "tiny-llama")
    models = {"gpt2": small_model_dir, "llama": root / "tiny-llama"}
    runs = []
    for name, (model, extra, one, per_rank, strategy) in CASES.items():
        code, _, err = run_captured(*args(models[model], uneven_data, root / f"{name}-one", one[0], "--grad-accum",
                                          str(one[1]), *extra))
        assert code == 0, err
        runs.append(args(models[model], uneven_data, root / f"{name}-two", per_rank[0], "--grad-accum",
                         str(per_rank[1]), "--strategy", strategy, *extra))
    # the FSDP run's sharded checkpoint of step 2, resumed into another directory
    runs.append(args(small_model_dir, uneven_data, root / "fsdp-resumed", 8, "--grad-accum", "2", "--strategy", "fsdp",
                     "--save-every", "2", "--resume", str(root / "fsdp-accum-two" / "checkpoints" / "step-2")))
    # ... and under DDP (DCP loads the shards as whole tensors)
    runs.append(args(small_model_dir, uneven_data, root / "fsdp-as-ddp", 8, "--grad-accum", "2", "--strategy", "ddp",
                     *CASES["fsdp-accum"][1], "--resume", str(root / "fsdp-accum-two" / "checkpoints" / "step-2")))
    lora = [*CASES["fsdp-lora"][1], "--strategy", "fsdp", "--grad-accum", "2"]
    # a LoRA checkpoint written without FSDP (the whole adapter, its optimizer state by index), under FSDP
    runs.append(args(small_model_dir, uneven_data, root / "lora-as-fsdp", 8, *lora,
                     "--resume", str(root / "fsdp-lora-one" / "checkpoints" / "step-2")))
    runs.append(args(small_model_dir, uneven_data, root / "fsdp-lora-resumed", 8, *lora,
                     "--resume", str(root / "fsdp-lora-two" / "checkpoints" / "step-2")))
    # the final model is step 1's (in bf16: the weights are gathered in bf16 for the evaluations, and the final model
    # must still be the fp32 shards)
    runs.append(args(small_model_dir, uneven_data, root / "fsdp-best", 16, "--strategy", "fsdp", *BEST,
                     "--precision", "bf16"))
    # bf16 under FSDP (weights gathered in bf16, gradients reduced in fp32) against one process in bf16 (autocast);
    # LoRA, with the tied embedding/head trained in full: the adapter is gathered after the last evaluation, which
    # leaves the root's weights unsharded (views of the bf16 all-gather)
    bf16 = ["--precision", "bf16", "--lr", "3e-3", "--lora-r", "4", "--lora-modules-to-save", "wte"]
    code, _, err = run_captured(*args(small_model_dir, uneven_data, root / "bf16-one", 32, *bf16))
    assert code == 0, err
    runs.append(args(small_model_dir, uneven_data, root / "bf16-fsdp", 16, "--strategy", "fsdp", *bf16))
    # LoRA's frozen base kept in bf16 (the default above) or fp16 under FSDP, against the base's fp32 shards
    runs.append(args(small_model_dir, uneven_data, root / "bf16-fsdp-fp32-base", 16, "--strategy", "fsdp", *bf16,
                     "--lora-base-dtype", "fp32"))
    fp16_lora = ["--strategy", "fsdp", "--precision", "fp16", "--lr", "3e-3", "--lora-r", "4"]
    runs.append(args(small_model_dir, uneven_data, root / "fp16-lora-fsdp", 16, *fp16_lora))
    runs.append(args(small_model_dir, uneven_data, root / "fp16-lora-fsdp-fp32-base", 16, *fp16_lora,
                     "--lora-base-dtype", "fp32"))
    # fp16 (what auto takes on a T4 or V100: a pair of T4s is a common free setup) under FSDP: the loss scaler
    # unscales DTensor shards of the gradients
    fp16 = ["--precision", "fp16", "--lr", "3e-3"]
    code, _, err = run_captured(*args(small_model_dir, uneven_data, root / "fp16-one", 32, *fp16))
    assert code == 0, err
    runs.append(args(small_model_dir, uneven_data, root / "fp16-fsdp", 16, "--strategy", "fsdp", *fp16))
    runs.append(args(small_model_dir, uneven_data, root / "fault-full", 16, *LONGER))
    # a whole model's checkpoint (one process) resumed under FSDP, with --final-model best: the best is that checkpoint
    code, _, err = run_captured(*args(small_model_dir, uneven_data, root / "best-one", 32, *BEST))
    assert code == 0, err
    runs.append(args(small_model_dir, uneven_data, root / "best-as-fsdp", 16, *BEST, "--strategy", "fsdp",
                     "--resume", str(root / "best-one" / "checkpoints" / "step-1")))
    # a checkpoint in the middle of a log window (step 2 of 3), resumed: the step-3 log line is the same
    window = ["--log-every", "3", "--save-every", "2", "--keep-last", "2"]
    runs.append(args(small_model_dir, uneven_data, root / "window", 16, *window))
    runs.append(args(small_model_dir, uneven_data, root / "window-resumed", 16, *window,
                     "--resume", str(root / "window" / "checkpoints" / "step-2")))
    # streaming: the same steps as one process (chunks and shuffle buffer of global rows)
    code, _, err = run_captured(*args(small_model_dir, many_rows, root / "stream-one", 32, "--streaming"))
    assert code == 0, err
    runs.append(args(small_model_dir, many_rows, root / "stream-two", 16, "--streaming"))
    # no --output-dir: runs/<time> (here in `root`, the launch's directory), where rank 1 starts 1.5 s after rank 0
    runs.append({"argv": args(small_model_dir, uneven_data, "unused", 16)[:-2], "late": [1, 1.5]})
    # checkpoints for safety (one after every step) on a disk of 30 MB, where the 13 MB model fits and a checkpoint
    # (model and optimizer) does not, under DDP and FSDP (each on a tmpfs of its own; left out where none can be made)
    disks = [d for d in (root / "disk-ddp", root / "disk-fsdp") if mount_tmpfs(d, "30M")]
    for disk in disks:
        runs.append(["train", "--no-run-report", "--model", str(tiny_model_dir), "--dataset", str(QUICKSTART_DATA),
                     "--batch-size", "8", "--lr", "3e-3", "--precision", "fp32", "--log-every", "1", "--max-steps",
                     "3", "--save-minutes", "0.00006", "--sample-prompts", "", "--strategy", disk.name[5:],
                     "--output-dir", str(disk / "run")])
    # a resume with another learning rate: refused by every rank alike, said once (last: the ranks leave the run)
    runs.append({"argv": args(small_model_dir, uneven_data, root / "refused", 8, "--grad-accum", "2", "--strategy",
                              "fsdp", *CASES["fsdp-accum"][1], "--lr", "1e-3",
                              "--resume", str(root / "fsdp-accum-two" / "checkpoints" / "step-2")), "exit": 2})
    yield root, launch(runs, root)
    for disk in disks:  # (a run that left a file open in its directory would make this fail)
        done = subprocess.run(["umount", str(disk)], capture_output=True, text=True)
        assert done.returncode == 0, f"a file in the run's directory is still open after the run: {done.stderr}"


def mount_tmpfs(path, size: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_ddp_and_fsdp_on_two_ranks_equal_one_process_and_fsdp_resumes_exactly(launched):
    """2 ranks at batch 16 = 1 process at batch 32, and at 8 x accum 2 = 16 x accum 2: DDP and FSDP (GPT-2 with
    its tied head, and a Llama-shaped model), and LoRA under DDP (DoRA's adapter and a fully trained head, with
    activation checkpointing), and DDP around a compiled step (static batch shapes: each rank's rows padded to its
    own fixed shape). The FSDP run's sharded (DCP) checkpoint then resumes bitwise, and its final model is a whole
    Hugging Face model that loads in one process."""
    root, output = launched
    assert "(DistributedDataParallel)" in output and "(FSDPCausalLMLoss)" in output and "per rank x 2 ranks" in output
    # only rank 0 prints (+15: the FSDP resumes (2 under FSDP, 1 under DDP, a LoRA adapter from one process), best and
    # a whole model's best under FSDP, bf16, LoRA's base in bf16 and fp16 against fp32 (3), fp16, the log-window run
    # and its resume, streaming, runs/<time>)
    disks = sum((root / d).is_mount() for d in ("disk-ddp", "disk-fsdp"))  # (2 runs on small disks, where allowed)
    assert output.count("done: 3 steps") == len(CASES) + 15 + disks
    assert output.count("config: model ") == output.count("done: ") + 1  # the config summary too, once a run (+1: a
    # refused resume's)
    assert "will be ignored" not in output  # (torch.compile around DDP: a warning from dynamo on every rank)
    assert "LoRA: r 4" in output and "DoRA: r 4" in output
    for name in CASES:
        try:
            assert_same_training(root / f"{name}-one", root / f"{name}-two")
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None

    assert_same_training(root / "stream-one", root / "stream-two")  # streamed: the same steps too
    assert "checkpoints: the 1 kept for safety (--save-minutes) removed" in output
    assert not (root / "ddp-accum-two" / "checkpoints").exists()
    grown = load_file(root / "fsdp-tokens-llama-two" / "model.safetensors")  # (512 tokens + 2 added)
    assert grown["model.embed_tokens.weight"].shape[0] == grown["lm_head.weight"].shape[0] == 514
    rows = [k for k in load_file(root / "fsdp-lora-tokens-llama-two" / "adapter_model.safetensors") if "token" in k]
    assert len(rows) == 2, rows  # the new row of the embedding and of the head

    # samples at each evaluation under FSDP (every rank generates in step, the prompts in one left-padded batch)
    # change nothing of the training above, and are the one process's
    samples = {name: [(r["step"], r["prompt"], r["completion"]) for r in read_jsonl(root / name / "metrics.jsonl")
                      if r["type"] == "sample"] for name in ("fsdp-accum-one", "fsdp-accum-two")}
    assert [s[:2] for s in samples["fsdp-accum-two"]] == [(0, "the film is"), (0, "a"), (3, "the film is"), (3, "a")]
    assert samples["fsdp-accum-two"] == samples["fsdp-accum-one"]

    # the sharded checkpoint: model and optimizer shards in DCP, no full model; resume from step 2 is exact
    full = root / "fsdp-accum-two"
    ckpt = full / "checkpoints" / "step-2"
    assert (ckpt / "dcp" / ".metadata").is_file() and not (ckpt / "model.safetensors").exists()
    resumed = root / "fsdp-resumed"
    assert f"resumed from {ckpt}" in output
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(full) is not None


def close_weights(a_dir, b_dir, name="model.safetensors"):
    a, b = load_file(a_dir / name), load_file(b_dir / name)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_an_fsdp_checkpoint_resumes_in_one_process_and_under_ddp(launched, small_model_dir, uneven_data, tmp_path,
                                                                 capsys):
    """DCP loads FSDP's shards into whole tensors, so a sharded checkpoint (2 ranks x 8 x accum 2) resumes where FSDP
    is not used: in one process at 16 x accum 2 and under DDP at 8 x accum 2 per rank, each ending within 1e-5 of
    the uninterrupted FSDP run (weights and the step-3 loss); LoRA's too (the adapter file, the optimizer's shards).
    The best model of a run resumed from such a checkpoint is read from its shards. The other way round, a LoRA
    adapter written in one process resumes under FSDP (the adapter sharded as it loads, its optimizer state by name)
    and ends where the one-process run did."""
    root, output = launched
    full, lora = root / "fsdp-accum-two", root / "fsdp-lora-two"
    one_lora, lora_as_fsdp = root / "fsdp-lora-one", root / "lora-as-fsdp"
    assert f"{one_lora / 'checkpoints' / 'step-2'} holds whole tensors: sharded over 2 ranks" in output
    close_weights(one_lora, lora_as_fsdp, "adapter_model.safetensors")
    assert metrics(lora_as_fsdp)[0][-1][1] == pytest.approx(metrics(one_lora)[0][-1][1], rel=1e-5)  # the step-3 loss
    close_weights(one_lora / "merged", lora_as_fsdp / "merged")  # the merged models (--merge) too
    assert f"resumed from {full / 'checkpoints' / 'step-2'}" in output
    close_weights(full, root / "fsdp-as-ddp")
    for name, run in (("fsdp-accum", full), ("fsdp-lora", lora)):
        out = tmp_path / name
        code, _, err = run_main(capsys, *args(small_model_dir, uneven_data, out, 16, "--grad-accum", "2",
                                              *CASES[name][1], "--resume", str(run / "checkpoints" / "step-2")))
        assert code == 0 and "as 1 process(es) x batch 16 x accum 2" in err, err
        close_weights(run, out, "adapter_model.safetensors" if name == "fsdp-lora" else "model.safetensors")
        assert metrics(out)[0][-1][1] == pytest.approx(metrics(run)[0][-1][1], rel=1e-5)  # the step-3 loss
        assert [r["type"] for r in read_jsonl(out / "metrics.jsonl")][0] == "resume"

    # --final-model best whose best checkpoint holds shards, in a run resumed in one process from it (lr 0.1: the
    # steps after step 1 only make it worse): the final model is the shards of step 1, bitwise
    best = root / "fsdp-best" / "checkpoints" / "step-1"
    out = tmp_path / "best"
    code, _, err = run_main(capsys, *args(small_model_dir, uneven_data, out, 32, *BEST, "--precision", "bf16",
                                          "--resume", str(best)))
    assert code == 0 and "final model: the best evaluation's, step 1" in err, err
    shards = dcp_model(best, tmp_path)
    final = load_file(out / "model.safetensors")
    assert final.keys() <= shards.keys() and all(torch.equal(final[k], shards[k]) for k in final)


def test_an_fsdp_checkpoint_is_a_model_to_evaluate_generate_and_export(launched, uneven_data, tmp_path, capsys):
    """`sftune eval`, `generate` and `export --merge` read an FSDP checkpoint (no whole model in it) in one process:
    the architecture from its run's --model, the weights from the shards. The export equals the shards bitwise."""
    root, _ = launched
    ckpt = root / "fsdp-accum-two" / "checkpoints" / "step-2"
    out = tmp_path / "step-2"
    code, stdout, err = run_main(capsys, "export", str(ckpt), "--merge", str(out))
    assert code == 0 and f"AutoModelForCausalLM.from_pretrained('{out}')" in stdout, err
    shards, whole = dcp_model(ckpt, tmp_path), load_file(out / "model.safetensors")
    assert whole.keys() <= shards.keys() and all(torch.equal(whole[k], shards[k]) for k in whole)
    losses = []
    for model in (ckpt, out):
        code, stdout, err = run_main(capsys, "eval", "--model", str(model), "--dataset", str(uneven_data), "--json",
                                     "--precision", "fp32")
        assert code == 0, err
        losses.append(json.loads(stdout)["val_loss"])
    assert losses[0] == losses[1]
    code, stdout, err = run_main(capsys, "generate", "--model", str(ckpt), "--prompt", "the film", "--temperature",
                                 "0", "--max-new-tokens", "4")
    assert code == 0 and stdout.startswith("[0] the film"), err
    # a damaged shard: one line, no traceback (torch's was a page of it)
    damaged = tmp_path / "damaged"
    shutil.copytree(ckpt, damaged)
    shard = sorted((damaged / "dcp").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    code, _, err = run_main(capsys, "eval", "--model", str(damaged), "--dataset", str(uneven_data))
    assert code == 2 and f"could not read the shards of checkpoint {damaged} (" in err and "Traceback" not in err


def test_a_whole_model_checkpoint_resumes_under_fsdp(launched):
    """The other way: one process's checkpoint (a Hugging Face model; the optimizer state by parameter index) resumed
    by 2 FSDP ranks, which shard the weights (rank 0 reads them) and the optimizer state (indexed by name): the
    steps after it equal the one-process run's; with --final-model best, whose checkpoint is that whole model, every
    rank loads its shards of it, and the final model equals it bitwise."""
    root, output = launched
    one, fsdp = root / "best-one", root / "best-as-fsdp"
    assert f"resumed from {one / 'checkpoints' / 'step-1'}" in output
    (train_one, evals_one), (train_fsdp, evals_fsdp) = metrics(one), metrics(fsdp)
    assert [s for s, *_ in train_fsdp] == [2, 3]
    np.testing.assert_allclose([l for _, l, _, _ in train_fsdp], [l for _, l, _, _ in train_one[1:]], rtol=1e-5)
    np.testing.assert_allclose([v for _, v in evals_fsdp], [v for _, v in evals_one[2:]], rtol=1e-5)
    a, b = load_file(one / "checkpoints" / "step-1" / "model.safetensors"), load_file(fsdp / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def dcp_model(checkpoint, tmp_path) -> dict:
    """A sharded checkpoint's model tensors, whole, by their Hugging Face names."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint / "dcp", tmp_path / "shards.pt")
    return {k.removeprefix("model."): v for k, v in torch.load(tmp_path / "shards.pt")["model"].items()}


def test_fsdp_in_bf16_gathers_bf16_reduces_fp32_and_keeps_fp32_weights(launched):
    """bf16 under FSDP: the fp32 shards are all-gathered as bf16 and the gradients reduce-scattered in fp32
    (FSDP2's MixedPrecisionPolicy). A LoRA run matches one process in bf16 autocast to bf16's rounding (the layer
    norms' weights are bf16 too), and the saved adapter is the fp32 master weights."""
    root, output = launched
    assert "(FSDPCausalLMLoss: weights gathered in bf16, gradients reduced in fp32)" in output
    assert_rounding_apart(root / "bf16-one", root / "bf16-fsdp", 2e-3, 1e-2, "adapter_model.safetensors")


def test_loras_frozen_base_kept_in_half_precision_under_fsdp_trains_what_its_fp32_shards_train(launched):
    """LoRA under FSDP keeps the frozen base's shards in the compute precision (half each rank's share of the base):
    in bf16 FSDP all-gathered them as bf16 already, rounded as the cast is; in fp16 (nothing cast by FSDP) the one
    all-gather holds fp16 and fp32 shards, and autocast read fp32 weights as fp16. Either way every loss, gradient
    norm, evaluation and the adapter equal the fp32 shards' run bitwise."""
    root, output = launched
    assert "kept in bf16, 0.2 MiB less memory across the ranks' shards" in output
    assert "kept in fp16, 0.2 MiB less memory across the ranks' shards" in output
    for run in ("bf16-fsdp", "fp16-lora-fsdp"):
        half, full = root / run, root / f"{run}-fp32-base"
        assert metrics(half) == metrics(full), run
        a, b = load_file(half / "adapter_model.safetensors"), load_file(full / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), run


def assert_rounding_apart(one, two, rtol: float, grad_rtol: float, weights: str) -> None:
    """Runs in half precision, one process against FSDP: the same steps and tokens, losses and evaluations within
    `rtol`, gradient norms within `grad_rtol` (a scale bug is 2x), and fp32 weights saved. (Weights are not compared
    element by element: Adam moves a weight whose gradient is near 0 by +-lr whatever its size, so the rounding
    flips some of those moves.)"""
    (train_a, evals_a), (train_b, evals_b) = metrics(one), metrics(two)
    assert [(s, t) for s, _, t, _ in train_a] == [(s, t) for s, _, t, _ in train_b]
    np.testing.assert_allclose([l for _, l, _, _ in train_b], [l for _, l, _, _ in train_a], rtol=rtol)
    np.testing.assert_allclose([v for _, v in evals_b], [v for _, v in evals_a], rtol=rtol)
    np.testing.assert_allclose([g for *_, g in train_b], [g for *_, g in train_a], rtol=grad_rtol)
    a, b = load_file(one / weights), load_file(two / weights)
    assert a.keys() == b.keys() and all(b[k].dtype == torch.float32 for k in b)


def test_fsdp_in_fp16_scales_the_loss_of_every_rank_alike(launched):
    """fp16 under FSDP, the loss scaler unscaling the ranks' gradient shards (DTensors; torch reduces the overflow
    flag over the ranks, so every rank skips alike): the one process's losses, evaluations and gradient norms to
    fp16's rounding, the fp32 weights saved whole."""
    root, output = launched
    assert "device: cpu, precision: fp16" in output
    assert_rounding_apart(root / "fp16-one", root / "fp16-fsdp", 1e-4, 1e-3, "model.safetensors")


def test_fsdp_final_model_best_is_the_best_checkpoints_weights(launched, tmp_path):
    """--final-model best under FSDP: every rank loads its shards of the best checkpoint, then they are gathered
    into the final model, which equals that checkpoint's shards bitwise."""
    root, output = launched
    run = root / "fsdp-best"
    assert "final model: the best evaluation's, step 1" in output
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1"]  # --save-best: the new bests only
    shards = dcp_model(run / "checkpoints" / "step-1", tmp_path)
    final = load_file(run / "model.safetensors")
    assert final.keys() <= shards.keys() and all(torch.equal(final[k], shards[k]) for k in final)


def test_lora_under_fsdp_checkpoints_the_adapter_only_and_resumes_exactly(launched):
    """LoRA under FSDP (GPT-2's tied embedding/head trained in full beside the adapters): the adapter and the merged
    model equal one process's (`test_ddp_and_fsdp_...` compares the adapters; here the merge too); a checkpoint holds
    the trained tensors' shards and the adapter gathered whole, no base tensor; a resume from it is bitwise exact."""
    from torch.distributed.checkpoint import FileSystemReader

    root, output = launched
    one, two, resumed = root / "fsdp-lora-one", root / "fsdp-lora-two", root / "fsdp-lora-resumed"
    a, b = load_file(one / "merged" / "model.safetensors"), load_file(two / "merged" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)
    ckpt = two / "checkpoints" / "step-2"
    shards = FileSystemReader(str(ckpt / "dcp")).read_metadata().state_dict_metadata
    weights = [k for k in shards if k.startswith("model.")]
    assert weights and all(".lora_" in k or ".modules_to_save." in k for k in weights), weights
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    assert f"resumed from {ckpt}" in output
    for name in ("adapter_model.safetensors", "merged/model.safetensors"):
        a, b = load_file(two / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_resume_in_the_middle_of_a_log_window_logs_what_the_run_would_have(launched):
    """The log window's sums (loss, argmax hits) are per rank: a checkpoint keeps their sum over the ranks and the
    resumed run gives it to rank 0 alone (each rank restoring rank 0's partial sum logged a loss of 6.37 for 6.16)."""
    root, _ = launched
    logged = [[{k: r[k] for k in ("step", "loss", "token_accuracy", "tokens", "grad_norm")}
               for r in read_jsonl(root / run / "metrics.jsonl") if r["type"] == "train"]
              for run in ("window", "window-resumed")]
    assert [r["step"] for r in logged[0]] == [3] and len(logged[1]) == 1, logged
    (full,), (resumed,) = logged
    assert resumed.pop("loss") == pytest.approx(full.pop("loss"), rel=1e-6)  # (sums in another order: 6e-8 off)
    assert resumed == full


def test_sigterm_to_the_launcher_and_kill_9_of_a_rank_then_resume_is_exact(launched, uneven_data, small_model_dir,
                                                                             tmp_path, capsys):
    """SIGTERM to torchrun: both ranks stop at one step and save once (torchrun itself exits 1 with its own
    message; each rank exits 143). Then, the ranks started by `sftune train --nproc-per-node 2`, kill -9 of one
    rank: the run dies (the other rank says so, and the launch names the killed rank and exits 137, no traceback).
    Each time --resume auto continues (the last resume under --nproc-per-node too), and the end result is an
    uninterrupted 2-rank torchrun's, bitwise."""
    longer, full = LONGER, launched[0] / "fault-full"
    out = tmp_path / "run"
    proc = torchrun(*args(small_model_dir, uneven_data, out, 16, *longer), stderr=subprocess.PIPE,
                    stdout=subprocess.DEVNULL)
    for line in proc.stderr:
        if line.startswith("step      3/"):
            proc.send_signal(signal.SIGTERM)  # to torchrun, which passes it on to both ranks
            break
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert "stopped by SIGTERM" in err, err
    saved = sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*"))
    assert saved and saved[-1] >= 3  # one checkpoint, written once, at the step both ranks agreed on

    # kill -9 of one rank mid-run: torchrun ends the other, the run dies; then it resumes from its last checkpoint
    proc = sftune_ranks(*args(small_model_dir, uneven_data, out, 16, *longer, "--resume", "auto"),
                        env={"SFTUNE_FAULT_SLOW_SAVE": "1.5"},  # (a slow save, which a 600 s grace does not say)
                        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    before = []
    for line in proc.stderr:
        before.append(line)
        if line.startswith("step      5/"):  # past the checkpoint of step 4
            ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            environ = Path(f"/proc/{ranks[-1]}/environ").read_bytes().split(b"\0")
            os.kill(int(ranks[-1]), signal.SIGKILL)
            break
    err = proc.stderr.read()
    saving = "".join(before)
    assert b"TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600" in environ  # (the grace sftune's launch gives: its agent's too)
    assert proc.wait(timeout=120) == 128 + signal.SIGKILL, err
    assert not (out / "model.safetensors").exists()
    # the rank left behind says what happened and what to do, and the launch which rank was killed, no traceback
    assert "sftune train [rank 0]: error: a collective operation with the other ranks failed" in err, err
    assert f"sftune train: rank 1 (pid {ranks[-1]}) was killed by SIGKILL" in err
    assert "continue with --resume auto" in err and "Traceback" not in err and "elastic" not in err
    assert "checkpoint: " in saving and "warning: this checkpoint took" not in saving + err

    # the newest checkpoint: step 4's, or step 6's (the run's last) when the ranks got there before the kill did
    # (this process reads their log lines late on a loaded machine)
    newest = max(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*"))
    assert newest in (4, 6)
    proc = sftune_ranks(*args(small_model_dir, uneven_data, out, 16, *longer, "--resume", "auto"),
                        env={"SFTUNE_FAULT_SLOW_SAVE": "1.5"},  # (a slow save, which a 600 s grace does not say)
                        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"resumed from {out / 'checkpoints' / f'step-{newest}'}" in err
    a, b = load_file(full / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise: same world size, same steps
    assert metrics(out) == metrics(full)

    # on another number of processes: refused where the steps would hold other rows (batch_size is per process)...
    code, _, err = run_main(capsys, *args(small_model_dir, uneven_data, out, 16, *longer, "--resume", "auto"))
    assert code == 2 and "written by a run of 2 process(es) x batch 16 x accum 1 (32 rows a step)" in err, err
    assert "--nproc-per-node 2" in err and "--batch-size 32 --grad-accum 1" in err
    # ... and continued where they hold the same rows: one process at 32 rows ends where the 2 ranks did
    step_4, other = out / "checkpoints" / "step-4", tmp_path / "one-process"
    code, _, err = run_main(capsys, *args(small_model_dir, uneven_data, other, 32, *longer, "--resume", str(step_4)))
    assert code == 0 and "resuming a run of 2 process(es) x batch 16 x accum 1 as 1 process(es) x batch 32 x accum 1" in err, err
    a, b = load_file(full / "model.safetensors"), load_file(other / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)
    (train_a, _), (train_b, _) = metrics(full), metrics(other)
    np.testing.assert_allclose([l for *_, l, _, _ in train_b], [l for *_, l, _, _ in train_a[-2:]], rtol=1e-5)


def test_a_rank_out_of_memory_says_so_names_the_newest_checkpoint_and_the_run_continues(
        launched, uneven_data, small_model_dir, tmp_path, capsys):
    """Under torchrun a rank that runs out of memory cannot undo its step and save (the other ranks wait for it in a
    collective): it says so once, without a traceback, naming the newest checkpoint and the changes that keep the
    steps, and exits 2; the other rank says a collective failed. The named checkpoint continues (here in one process
    at the same 32 rows a step; a 2-rank resume after a fault is bitwise: the test above) to where an uninterrupted
    run ends. (Test hook: rank 1's step 6 raises torch's out-of-memory error after its backward.)"""
    full, out = launched[0] / "fault-full", tmp_path / "run"
    proc = torchrun(*args(small_model_dir, uneven_data, out, 16, *LONGER), env={"SFTUNE_FAULT_OOM": "step 6 rank 1"},
                    stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "exitcode  : 2" in err, err
    said = [line for line in err.splitlines() if "out of memory" in line]
    assert len(said) == 1 and said[0].startswith("sftune train [rank 1]: error: out of memory in step 6 on rank 1 "), err
    assert f"the newest checkpoint is {out / 'checkpoints' / 'step-4'} (--resume auto trains the 1 step(s)" in said[0]
    assert "--batch-size 8 --grad-accum 2 (the same rows in each step)" in said[0]
    assert "sftune train [rank 0]: error: a collective operation with the other ranks failed" in err
    assert "[rank1]: Traceback" not in err and "[rank0]: Traceback" not in err  # (torchrun prints its own)
    assert not (out / "model.safetensors").exists()

    other = tmp_path / "one-process"
    code, _, err = run_main(capsys, *args(small_model_dir, uneven_data, other, 32, *LONGER,
                                          "--resume", str(out / "checkpoints" / "step-4")))
    assert code == 0, err
    close_weights(full, other)
    (train_a, _), (train_b, _) = metrics(full), metrics(other)
    np.testing.assert_allclose([l for _, l, _, _ in train_b], [l for _, l, _, _ in train_a[-2:]], rtol=1e-5)


def test_a_refused_resume_is_said_once(launched):
    """A resume with another learning rate is refused by every rank alike; rank 0 says it."""
    _, output = launched
    assert output.count("training settings differ (lr: 0.0001 -> 0.001)") == 1, output


def test_without_an_output_dir_the_ranks_write_one_run_named_by_rank_0(launched):
    """The default output directory is runs/<time>, and each rank gets there at its own time (here rank 1 starts 1.5
    s after rank 0): every rank uses rank 0's (each took its own, and a launch whose ranks crossed a second failed,
    its ranks in two directories: 1 launch in 3 by hand)."""
    root, _ = launched
    runs = list((root / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "model.safetensors").is_file(), runs


def test_under_torchrun_a_checkpoint_for_safety_that_does_not_fit_does_not_stop_the_run(launched):
    """On 2 ranks: rank 0 writes a DDP checkpoint and every rank learns that it failed (each went on while rank 0
    stopped with exit 2 and the others with 'a collective operation failed'); under FSDP every rank writes its shards,
    and all learn the same (DCP's error escaped as a traceback). Each run ends with its model, one warning a
    checkpoint (test_reliability.py: the same in one process)."""
    root, output = launched
    if not (root / "disk-ddp").is_mount():
        pytest.skip("cannot mount a tmpfs here (needs root)")
    assert output.count("warning: no checkpoint for safety at step") == 6, output
    assert output.count("(the disk is full: ") == 6 and "Traceback" not in output
    for strategy in ("ddp", "fsdp"):
        out = root / f"disk-{strategy}" / "run"
        steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "train"]
        assert (out / "model.safetensors").is_file() and steps == [1, 2, 3]


def test_a_config_mistake_is_said_once_per_node(small_model_dir, uneven_data, tmp_path):
    """A mistake found before the ranks meet (here a config value) is the same on every rank of a node: its first
    rank says it, the others exit with the same status in silence. One found after they met (ranks started by
    `--nproc-per-node 2`): said once, and the launch exits with the rank's status, 2, without a traceback (torchrun
    adds its own and exits 1)."""
    proc = torchrun(*args(small_model_dir, uneven_data, tmp_path / "o", 16, "--seed", "-5"), stderr=subprocess.PIPE,
                    stdout=subprocess.DEVNULL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and err.count("seed = -5: must be from 0 to 2**64 - 1") == 1, err
    assert not (tmp_path / "o").exists()
    # one found after they met, that every rank finds alike in the same data: rank 0 says it
    proc = sftune_ranks(*args(small_model_dir, uneven_data, tmp_path / "o", 10_000), stderr=subprocess.PIPE,
                        stdout=subprocess.DEVNULL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.count("fewer than one optimizer step of 10000 x 1 x 2 ranks") == 1, err
    assert "sftune train: 2 processes on this node" in err and "Traceback" not in err and "elastic" not in err


@pytest.mark.parametrize("value, env, said", [
    ("0", {}, "--nproc-per-node 0: must be a number of processes, 1 or more, or auto (one per GPU)"),
    ("two", {}, "--nproc-per-node two: must be a number of processes"),
    ("2", {"WORLD_SIZE": "2"}, "--nproc-per-node 2: this process is already one of torchrun's ranks (WORLD_SIZE=2); "
                               "leave out --nproc-per-node"),
    ("auto", {}, "seed = -5: must be from 0")])  # (auto without a GPU: one process, this one, which reads the config)
def test_nproc_per_node_mistakes_are_said(value, env, said, monkeypatch, capsys, tmp_path):
    for name, v in env.items():
        monkeypatch.setenv(name, v)
    code, _, err = run_main(capsys, "train", "--nproc-per-node", value, "--seed", "-5", "--output-dir",
                            str(tmp_path / "o"))
    assert code == 2 and said in err and not (tmp_path / "o").exists(), err
    assert "processes on this node" not in err


@pytest.mark.slow
def test_a_checkpoint_slower_than_torchruns_grace_for_a_stop_is_said_once(uneven_data, small_model_dir, tmp_path):
    """torchrun kills the ranks its --shutdown-timeout (30 s unless told) after it passes on a stop signal, so a stop
    whose save takes longer is cut short in it, and the steps since the last checkpoint are lost (tried by hand,
    benchmarks/NOTES.md try 147). A checkpoint that took over half that time is said once, with the fix. (sftune's
    own launch gives its ranks 600 s: the kill -9 test finds it in a rank's environment.)"""
    slow = {"SFTUNE_FAULT_SLOW_SAVE": "1.5"}  # (a checkpoint of 1.5 s and more)
    saves = ("--max-steps", "2", "--save-every", "1")
    proc = torchrun(*args(small_model_dir, uneven_data, tmp_path / "torchrun", 16, *saves), env=slow,
                    flags=("--shutdown-timeout", "2"), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 0, err
    assert err.count("warning: this checkpoint took") == 1, err
    assert "torchrun kills the ranks 2 s after it passes on a stop signal" in err
    assert "start torchrun with --shutdown-timeout 600" in err


def test_the_time_torchrun_gives_a_stop_is_read_as_torchrun_reads_it():
    """`dist.stop_grace_s`: the agent's --shutdown-timeout first, then its environment (which the ranks inherit),
    else 30 s; 30 s on a torch without the setting; nothing outside torchrun. `launch.grace_environment`: sftune's
    own launch sets 600 s unless the user set a time."""
    from sftune.dist import stop_grace_s
    from sftune.launch import grace_environment
    from sftune.saves import grace_notice

    rank = {"TORCHELASTIC_RUN_ID": "x"}
    agent = ["python", "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "sftune", "train"]
    assert stop_grace_s({}, agent, True) is None
    assert stop_grace_s(rank, agent, True) == 30
    assert stop_grace_s({**rank, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120"}, agent, True) == 120
    assert stop_grace_s({**rank, "PET_SHUTDOWN_TIMEOUT": "90", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120"}, agent,
                        True) == 90
    for flags in (["--shutdown-timeout", "300"], ["--shutdown_timeout=300"]):
        env = {**rank, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120"}
        assert stop_grace_s(env, agent[:3] + flags + agent[3:], True) == 300
    assert stop_grace_s({**rank, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120"}, agent, False) == 30
    assert stop_grace_s({**rank, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "soon"}, agent, True) is None
    assert grace_environment({}, True) == {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "600"}
    assert grace_environment({"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "45"}, True) == {}
    assert grace_environment({"PET_SHUTDOWN_TIMEOUT": "45"}, True) == {} == grace_environment({}, False)
    assert grace_notice(14, 30, True) is None and grace_notice(1, None, True) is None  # (this test is no rank)
    said = grace_notice(200, 300, True)
    assert "took 200.0 s" in said and "kills the ranks 300 s after" in said and "--shutdown-timeout 840" in said
    assert "torch 2.12 or later" in grace_notice(16, 30, False)


def two_nodes(runs: list, tmp_path, cwds, caches) -> list[tuple[int, str]]:
    """Two torchrun launches of one process each that meet through torchrun's c10d rendezvous on this machine, as
    two nodes do (the README's two-node command), each node with its own working directory and data cache, running
    `runs` in turn (tests/distributed_runs.py). Returns each node's (exit status, stderr)."""
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps(runs))
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, logs = [], []
    for node, cwd in enumerate(cwds):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
               str(ROOT / "tests" / "distributed_runs.py"), str(spec)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SFTUNE_CACHE": str(caches[node])}
        logs.append(open(tmp_path / f"node-{node}.log", "w+"))  # (files, not pipes: a full pipe would stall a rank)
        procs.append(subprocess.Popen(cmd, cwd=cwd, text=True, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
    results = []
    for proc, log in zip(procs, logs):
        code = proc.wait(timeout=300)
        log.seek(0)
        results.append((code, log.read()))
        log.close()
    return results


def test_two_nodes_train_as_two_ranks_of_one_node_do_and_must_share_the_output_directory(
        launched, uneven_data, small_model_dir, tmp_path):
    """The README's two-node launch (c10d rendezvous), here two launchers on one machine, each in its own working
    directory: the run equals one process at the same global batch, and each node prepares the data once into its
    own cache (node-local disks). Then a relative --output-dir, which names another directory on each node (checkpoint
    shards scattered, a resume finding other checkpoints on each node): every rank learns it before anything is
    written, the message names the ranks and hosts and the fix, and the run stops (exit 2 on both nodes)."""
    from sftune.outputs import LOCK_FILE

    root, _ = launched
    cwds, caches = (tmp_path / "a", tmp_path / "b"), (tmp_path / "cache-a", tmp_path / "cache-b")
    for cwd in cwds:  # a lock file left by an earlier run on each node's own disk (the directory counts as empty)
        (cwd / "o").mkdir(parents=True)
        (cwd / "o" / LOCK_FILE).write_text("123 on another-host\n")
    runs = [args(small_model_dir, uneven_data, tmp_path / "out", 16),
            {"argv": args(small_model_dir, uneven_data, "o", 16), "exit": 2}]
    (code_a, log_a), (code_b, log_b) = two_nodes(runs, tmp_path, cwds, caches)
    assert code_a == code_b == 0, log_a + log_b
    assert_same_training(root / "ddp-one", tmp_path / "out")
    assert all(any(cache.rglob("stats.json")) for cache in caches)  # each node's first rank tokenized once
    said = log_a + log_b
    assert "output directory o is not the same directory on every node: rank 1 (on " in said, said
    assert "every node mounts at the same path" in said and "src/sftune" not in said and "Traceback" not in said
    assert [sorted(p.name for p in (cwd / "o").iterdir()) for cwd in cwds] == [[LOCK_FILE]] * 2  # nothing written


def prepare_in_order(log: str) -> None:
    """A rank of `test_each_nodes_first_rank_prepares...`: writes when it enters and leaves `main_first`."""
    import time

    import torch.distributed

    from sftune.dist import Dist

    torch.distributed.init_process_group("gloo")
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    with Dist(rank, local, 4).main_first():
        with open(log, "a") as f:
            f.write(f"in {rank}\n")
        time.sleep(0.3)
        with open(log, "a") as f:
            f.write(f"out {rank}\n")
    torch.distributed.destroy_process_group()


def test_each_nodes_first_rank_prepares_after_rank_0_and_before_its_node(tmp_path):
    """`Dist.main_first` on 2 nodes of 2 ranks (gloo, ranks started by hand): rank 0 prepares the data first, then
    node 2's first rank (rank 2: its cache may be its own disk), then the others, who find a cache written."""
    from procs import start_ranks

    log = tmp_path / "order.txt"
    procs = start_ranks("test_distributed:prepare_in_order", 4, [str(log)], per_node=2)
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * 4
    events = log.read_text().split("\n")[:-1]
    assert events[:4] == ["in 0", "out 0", "in 2", "out 2"], events
    assert sorted(events[4:]) == ["in 1", "in 3", "out 1", "out 3"]


def wait_for_rank_0(said: str) -> int:
    """A rank of `test_a_rank_that_waits_past_dist_timeout...`: rank 0 prepares for 30 s, the others wait 1 s."""
    import time

    from sftune.dist import init_dist
    from sftune.errors import SftuneError

    dist = init_dist("cpu", 1)
    try:
        with dist.main_first():
            time.sleep(30 if dist.rank == 0 else 0)
    except SftuneError as e:
        with open(said, "w") as f:
            f.write(str(e))
        return 2
    return 0


def test_a_rank_that_waits_past_dist_timeout_says_so(tmp_path):
    """Rank 0 prepares the data while the others wait at a barrier; a wait past --dist-timeout (here 1 s) is one
    clear message naming the flag, not torch's traceback."""
    from procs import start_ranks

    said = tmp_path / "said.txt"
    procs = start_ranks("test_distributed:wait_for_rank_0", 2, [str(said)])
    procs[1].join(timeout=120)
    procs[0].kill()  # (still preparing)
    procs[0].join(timeout=120)
    assert procs[1].exitcode == 2
    waiting = said.read_text()
    assert waiting.startswith("rank 1 waited more than 1 s for the other ranks") and "--dist-timeout" in waiting


def test_a_launch_with_restarts_through_torchruns_shared_store_is_warned_about():
    """torchrun --max-restarts N shares its store with the ranks unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (then
    TORCHELASTIC_USE_AGENT_STORE is False): 1 restart in 4 hung here that way, 10 of 10 resumed with it (README).
    The ranks see torchrun's environment, so sftune says it at the start (tried by hand under torchrun: once)."""
    from sftune.dist import restart_warning

    shared = {"TORCHELASTIC_MAX_RESTARTS": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in restart_warning(shared)
    assert "--max-restarts 2" in restart_warning(shared)
    assert restart_warning({**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    assert restart_warning({**shared, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None
    assert restart_warning({}) is None


def test_the_launch_names_the_failure_that_ended_it_whatever_order_the_agent_saw_them_in():
    """Seen in CI on a loaded machine: rank 1 killed by SIGKILL, rank 0 failing in its next collective (exit 1),
    and the agent timing rank 0's failure first: the launch exited 1 without naming the killed rank. The cause is
    chosen by the kind of each failure, not by the agent's order."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from sftune.launch import root_failure

    def failure(rank, code):
        return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file="<N/A>")

    collective, killed = failure(0, 1), failure(1, -signal.SIGKILL)
    assert root_failure({0: collective, 1: killed}) == (1, killed)
    # ... and the agent records the ranks it stopped itself (SIGTERM) beside the one that said its mistake (also
    # seen in CI: the launch then named rank 1 "killed by SIGTERM" and exited 143 instead of the mistake's 2)
    said, stopped = failure(0, 2), failure(1, -signal.SIGTERM)
    assert root_failure({0: said, 1: stopped}) == (0, said)
    crashed = failure(1, 1)  # (a traceback: said by the rank itself)
    assert root_failure({0: failure(0, -signal.SIGTERM), 1: crashed}) == (1, crashed)
    assert root_failure({0: failure(0, -signal.SIGTERM), 1: failure(1, -signal.SIGSEGV)})[0] == 1
