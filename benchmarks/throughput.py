"""Throughput of sftune's training path against the seed's loop, measured side by side in one run.

    python benchmarks/throughput.py --quick            # a few minutes
    python benchmarks/throughput.py                    # longer windows, steadier figures
    python benchmarks/throughput.py --quality          # also: val loss after the same tokens (small GPT-2)
    python benchmarks/throughput.py --json out.json    # also write the figures
    python benchmarks/throughput.py --device cuda --json benchmarks/results/<card>-<yyyy-mm-dd>.json
                                                       # on a GPU: + sftune packed, MFU, peak GPU memory
    python benchmarks/throughput.py --device cuda --whole-job   # + the whole seed job, process start to exit

Both runs train GPT-2 small (the config in ../shared/models/gpt2, random weights from a fixed seed:
throughput does not depend on weight values) on SST-2 from ../shared/data/sst2 with the seed's filter.
Each runs in its own subprocess, so peak memory (RSS) is its own. Throughput counts real (non-pad)
tokens per second over the steps after a warm-up.

  seed:   the seed's loop as written: DataCollatorForLanguageModeling(mlm=False) with pad = EOS,
          batch 32, AdamW 5e-5, fp32.
  sftune: `sftune.train` with its default settings (validation cut to 64 rows so the benchmark
          spends its time training): batch 32, lr 5e-5, length-grouped batches; on a GPU its default
          step (`--compile auto`: CUDA graphs), whose capture time is kept out of the measured window.
          A log line every 10 steps, as a user's run writes them, where the window's ends fall on them (the GPU
          runs); else every step (the H100 figures of 2026-11-27 were taken with a line every step).
  packed: (--device cuda) sftune with --packing: 32 rows of 1,024 tokens a step.
  sftune-varlen, packed-varlen: (--device cuda --varlen) sftune and packed under --attention varlen (no mask
          from transformers: SDPA's causal kernel for rows, torch's variable-length flash attention for packed
          rows, there with --model-config-overrides attn_pdrop=0: that kernel has no dropout). Since try 125
          `sftune` itself takes that function for its rows under CUDA graphs (`--attention auto`), so the two
          rows run the same attention.
  packed-flex: (--device cuda --flex) packed under --attention flex (compiled flex attention under a block mask
          made on the host; attn_pdrop=0 too).

--whole-job times two processes from start to exit, each with empty caches: the notebook (the seed's pipeline,
val loss before training, one epoch of its loop, val loss after, `save_pretrained`) and
`sftune train --config configs/gpt2-sst2.yaml` on the local GPT-2 config (random init) and SST-2 copy; the JSON
keeps each one's log lines with the seconds since its start (`timeline`): where the time goes.

MFU (GPU only) = real tok/s x FLOPs per token / the card's dense bf16 peak, FLOPs per token = 6N + 12 x layers x
context x width (PaLM, appendix B; nanoGPT's estimate): N = the parameters of every matrix product, the tied
output head included; context = 1,024 for packed rows, the mean row length otherwise. Peaks: vendor data sheets
(`sftune.runtime.PEAK_BF16_FLOPS`: H100/H200 SXM 989 TFLOP/s, A100 312). The seed's loop runs fp32 but is put
against the same bf16 peak, so that the column compares runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GPT2 = SHARED / "models" / "gpt2"
SST2 = SHARED / "data" / "sst2"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def gpt2_small(layers: int | None = None, width: int | None = None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(GPT2)
    if layers:
        config.n_layer, config.n_embd, config.n_head = layers, width, max(1, width // 64)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def seed_data(train_files: str, val_files: str | None = None):
    """The seed's pipeline: batched map (512, columns removed), keep > 5 tokens, torch format."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(GPT2)
    files = {"train": train_files} if val_files is None else {"train": train_files, "validation": val_files}
    ds = load_dataset("parquet" if train_files.endswith(".parquet") else "json", data_files=files)
    out = {}
    for split in ds:
        tokenized = ds[split].map(lambda b: tokenizer(list(b["sentence"])), batched=True, batch_size=512,
                                  remove_columns=ds[split].column_names)
        tokenized = tokenized.filter(lambda x: len(x["input_ids"]) > 5)
        tokenized.set_format(type="torch")
        out[split] = tokenized
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, out


def seed_loop(model, tokenizer, train, lr: float, warmup: int, steps: int, seconds: float, epochs: int = 1,
              device: str = "cpu"):
    """The seed's training loop, as written (on `device`). Returns measured (real tokens, padded tokens, seconds,
    steps). The tokens are counted on the host copy of each batch: the count adds no sync to the loop."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForLanguageModeling

    torch.manual_seed(0)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    loader = DataLoader(train, batch_size=32, shuffle=True, collate_fn=collator)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    real = padded = done = 0
    start = None
    for _ in range(epochs):
        for i, batch in enumerate(loader):
            if done == warmup:
                sync(device)
                start, real, padded = time.perf_counter(), 0, 0
            real += int(batch["attention_mask"].sum())
            padded += batch["input_ids"].numel()
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            done += 1
            if start is not None and (done - warmup >= steps or time.perf_counter() - start > seconds):
                sync(device)
                return real, padded, time.perf_counter() - start, done - warmup
    sync(device)
    return real, padded, time.perf_counter() - (start or time.perf_counter()), max(done - warmup, 0)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def peak_gpu_mb(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def worker_seed(args) -> dict:
    t0 = time.perf_counter()
    tokenizer, data = seed_data(str(SST2 / "data" / "train-00000-of-00001.parquet"))
    prep_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    seed_data(str(SST2 / "data" / "train-00000-of-00001.parquet"))  # datasets' own cache now
    prep_cached = time.perf_counter() - t0
    model = gpt2_small()
    real, padded, secs, steps = seed_loop(model, tokenizer, data["train"], 5e-5, args.warmup, args.steps, args.seconds,
                                          device=args.device)
    return {"real_tok_s": real / secs, "padded_tok_s": padded / secs, "steps": steps, "seconds": secs,
            "ms_per_step": 1000 * secs / max(steps, 1), "mean_row_tokens": real / max(steps * 32, 1),
            "prep_first_s": prep_first, "prep_cached_s": prep_cached, "peak_rss_mb": peak_rss_mb(),
            "peak_gpu_mb": peak_gpu_mb(args.device)}


def small_val_dir(tmp: Path, val_rows: int) -> Path:
    """SST-2 train as is, validation cut to `val_rows` rows."""
    import pyarrow.parquet as pq

    d = tmp / "sst2-bench" / "data"
    d.mkdir(parents=True)
    os.symlink(SST2 / "data" / "train-00000-of-00001.parquet", d / "train-00000-of-00001.parquet")
    val = pq.read_table(SST2 / "data" / "validation-00000-of-00001.parquet").slice(0, val_rows)
    pq.write_table(val, d / "validation-00000-of-00001.parquet")
    return d.parent


def worker_sftune(args) -> dict:
    import sftune
    from sftune.data import DataOptions, prepare_data

    packed = args.worker.startswith("packed")
    attention = next((a for a in ("varlen", "flex") if args.worker.endswith(f"-{a}")), "auto")
    # a log line every 10 steps, as a user's run writes them (each costs the GPU its run-ahead: the loss is read),
    # when the window's ends fall on them; else every step
    log_every = 10 if args.warmup % 10 == 0 and args.steps % 10 == 0 else 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset = small_val_dir(tmp, 64)
        tokenizer = sftune.load_tokenizer(str(GPT2))
        t0 = time.perf_counter()
        prepare_data(DataOptions(str(SST2), 1024, cache_dir=tmp / "cache"), tokenizer)
        prep_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        prepare_data(DataOptions(str(SST2), 1024, cache_dir=tmp / "cache"), tokenizer)
        prep_cached = time.perf_counter() - t0

        model_dir = tmp / "gpt2-small"
        gpt2_small().save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        options = {"model": str(model_dir), "dataset": str(dataset), "max_steps": args.warmup + args.steps,
                   "log_every": log_every, "output_dir": str(tmp / "run"), "cache_dir": str(tmp / "cache"),
                   "device": args.device, "report_to": "none", "compile": args.compile,
                   "attention": attention, "compile_mode": args.compile_mode, "compile_blocks": args.compile_blocks}
        if packed:  # (varlen and flex: no attention dropout)
            options.update(packing=True, max_length=1024, compile=args.packed_compile or args.compile,
                           model_config_overrides={"attn_pdrop": 0.0} if attention != "auto" else {})
        result = sftune.train(sftune.resolve_config(options))
        rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if r["type"] == "train"]
        first = next(r for r in steps if r["step"] == args.warmup)  # measure from the end of warm-up to the end
        last = steps[-1]
        # a shape first seen in the window: its step left out, time and tokens (its time is the capture or compile)
        apart = {k: last.get(k, 0) - first.get(k, 0) for k in ("compile_s", "compile_steps", "compile_tokens",
                                                                "compile_padded_tokens")}
        compile_s = apart["compile_s"]
        secs = last["elapsed_s"] - first["elapsed_s"] - compile_s
        real = last["tokens"] - first["tokens"] - apart["compile_tokens"]
        padded = last["padded_tokens"] - first["padded_tokens"] - apart["compile_padded_tokens"]
        n = last["step"] - first["step"] - apart["compile_steps"]
        return {"real_tok_s": real / secs, "padded_tok_s": padded / secs, "steps": n, "seconds": secs,
                "ms_per_step": 1000 * secs / max(n, 1), "mean_row_tokens": real / max(n * 32, 1),
                "compile_s": last.get("compile_s", 0.0), "compile_s_in_window": compile_s,
                "prep_first_s": prep_first, "prep_cached_s": prep_cached, "peak_rss_mb": peak_rss_mb(),
                "peak_gpu_mb": peak_gpu_mb(args.device), "train_steps": result.steps,
                "mfu_logged": last.get("mfu")}


# --- the whole job, process start to exit ------------------------------------------------


def worker_seed_job(args) -> dict:
    """The notebook from start to end: data, val loss before, one epoch, val loss after, the saved model."""
    import torch

    def note(what: str) -> None:  # (a line in the whole job's timeline)
        print(what, file=sys.stderr, flush=True)

    note("seed job: started")
    tokenizer, data = seed_data(str(SST2 / "data" / "train-00000-of-00001.parquet"),
                                str(SST2 / "data" / "validation-00000-of-00001.parquet"))
    note("seed job: data ready")
    model = gpt2_small().to(args.device)
    note("seed job: model ready")

    def val_loss() -> float:  # the seed's way: the mean of per-batch mean losses, padding ignored by the collator
        from torch.utils.data import DataLoader
        from transformers import DataCollatorForLanguageModeling

        loader = DataLoader(data["validation"], batch_size=32, collate_fn=DataCollatorForLanguageModeling(tokenizer, mlm=False))
        model.eval()
        with torch.no_grad():
            losses = [model(**{k: v.to(args.device) for k, v in b.items()}).loss.item() for b in loader]
        model.train()
        return sum(losses) / len(losses)

    before = val_loss()
    note("seed job: val loss before training")
    real, _, secs, steps = seed_loop(model, tokenizer, data["train"], 5e-5, 0, 10**9, 10**9, device=args.device)
    note("seed job: trained one epoch")
    after = val_loss()
    note("seed job: val loss after training")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
    note("seed job: model saved")
    return {"val_before": before, "val_after": after, "train_seconds": secs, "steps": steps}


def timed_process(cmd: list[str], env: dict) -> tuple[int, str, list[str], float]:
    """Run `cmd` from the project root: (exit code, stdout, its stderr lines each with the seconds since the start,
    wall seconds)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    timeline: list[str] = []

    def read_log() -> None:
        for line in proc.stderr:
            timeline.append(f"{time.perf_counter() - started:7.2f} {line.rstrip()[:200]}")

    reader = threading.Thread(target=read_log)
    reader.start()
    stdout = proc.stdout.read()
    code = proc.wait()
    reader.join()
    return code, stdout, timeline, time.perf_counter() - started


def whole_job(name: str, args) -> dict:
    """Wall time of one process, start to exit, with empty caches."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}  # (each job's own default)
        env.update(HF_DATASETS_CACHE=f"{tmp}/hf", SFTUNE_CACHE=f"{tmp}/sftune")
        if name == "seed":
            cmd = [sys.executable, __file__, "--worker", "seed-job", "--device", args.device]
        else:
            cmd = [sys.executable, "-m", "sftune", "train", "--config", str(ROOT / "configs" / "gpt2-sst2.yaml"),
                   "--model", str(GPT2), "--init", "random", "--dataset", str(SST2), "--device", args.device,
                   "--compile", args.compile, "--output-dir", f"{tmp}/run"]
        print(f"running the whole {name} job ...", file=sys.stderr, flush=True)
        code, stdout, timeline, seconds = timed_process(cmd, env)
        if code != 0:
            tail = "\n".join(timeline[-40:])
            print(f"the whole {name} job failed (the other runs go on):\n{tail}", file=sys.stderr)
            return {"error": tail}
        result = {"wall_s": seconds, "timeline": timeline}
        if name == "seed":
            result.update(json.loads(stdout.strip().splitlines()[-1]))
        else:
            evals = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()
                     if '"eval"' in line]
            result.update(val_before=evals[0]["val_loss"], val_after=evals[-1]["val_loss"])
        return result


# --- quality: the same tokens, the same lr, a smaller GPT-2 ------------------------

QUALITY = {"rows": 10_000, "lr": 5e-4, "layers": 2, "width": 128}


def quality_files(tmp: Path) -> tuple[Path, Path]:
    """A 10,000-row subset of SST-2 train (fixed seed) and the whole validation split, as jsonl."""
    import pyarrow.parquet as pq
    import numpy as np

    train = pq.read_table(SST2 / "data" / "train-00000-of-00001.parquet")
    pick = np.random.default_rng(0).permutation(train.num_rows)[: QUALITY["rows"]]
    d = tmp / "quality"
    d.mkdir(exist_ok=True)
    for name, table in (("train", train.take(pick)), ("validation", pq.read_table(SST2 / "data" / "validation-00000-of-00001.parquet"))):
        with open(d / f"{name}.jsonl", "w") as f:
            for row in table.to_pylist():
                f.write(json.dumps({"sentence": row["sentence"]}) + "\n")
    return d / "train.jsonl", d / "validation.jsonl"


def text_only_val_loss(model, val_ids, device: str = "cpu") -> float:
    """Token-weighted loss on the validation sentences without EOS: the same yardstick for both models."""
    import torch

    from sftune.data import Examples
    from sftune.evaluate import evaluate

    examples = Examples.from_lists([list(map(int, x)) for x in val_ids])
    return evaluate(model.to(device), examples, 64, 50256, torch.device(device), "fp32").loss


def quality_lr(args) -> float:
    """The seed's 5e-5 on a GPU (GPT-2 small); 5e-4 for the 2 x 128 model on a CPU, which learns little at 5e-5."""
    return 5e-5 if args.device == "cuda" else QUALITY["lr"]


def worker_quality(args) -> dict:
    """The same rows, lr and epochs for both; on a GPU, GPT-2 small itself (on a CPU, 2 x 128)."""
    import sftune

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_file, val_file = quality_files(tmp)
        tokenizer, data = seed_data(str(train_file), str(val_file))
        model = gpt2_small() if args.device == "cuda" else gpt2_small(QUALITY["layers"], QUALITY["width"])
        if args.worker == "quality-seed":
            t0 = time.perf_counter()
            real, _, _, steps = seed_loop(model, tokenizer, data["train"], quality_lr(args), 0, 10**9, 10**9,
                                          device=args.device)
            secs = time.perf_counter() - t0
        else:
            model_dir = tmp / "model"
            model.save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
            cfg = sftune.resolve_config({"model": str(model_dir), "dataset": str(train_file.parent), "lr": quality_lr(args),
                                         "output_dir": str(tmp / "run"), "cache_dir": str(tmp / "cache"), "log_every": 50,
                                         "device": args.device, "report_to": "none", "compile": args.compile})
            t0 = time.perf_counter()
            result = sftune.train(cfg)
            secs = time.perf_counter() - t0
            real, steps = result.tokens, result.steps
            model = sftune.load_model(str(tmp / "run"))
        val = text_only_val_loss(model, data["validation"]["input_ids"], args.device)
        return {"val_loss": val, "tokens": real, "steps": steps, "seconds": secs}


# --- the parent: run workers, print the table -------------------------------------------


def run_worker(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--seconds", str(args.seconds), "--device", args.device, "--compile", args.compile,
           *(["--packed-compile", args.packed_compile] if args.packed_compile else []),
           *(["--compile-mode", args.compile_mode] if args.compile_mode else []),
           *(["--compile-blocks"] if args.compile_blocks else [])]
    env = {**os.environ, "HF_DATASETS_CACHE": tempfile.mkdtemp(prefix="bench-hf-"), "TOKENIZERS_PARALLELISM": "false"}
    print(f"running {name} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        if name in ("seed", "sftune"):  # (no ratio without them)
            sys.exit(f"{name} failed:\n{proc.stderr[-4000:]}")
        print(f"{name} failed (the other runs go on):\n{proc.stderr[-2000:]}", file=sys.stderr)
        return {"error": proc.stderr[-4000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def card_and_peak(device: str) -> tuple[str, float | None]:
    """The GPU's name and its dense bf16 peak (FLOP/s) from sftune's table, or the CPU's core count and None."""
    import torch

    if device != "cuda":
        return f"{os.cpu_count()} CPU cores", None
    from sftune.runtime import peak_flops

    return torch.cuda.get_device_name(0), peak_flops(torch.device("cuda"), "bf16")


def add_mfu(result: dict, peak: float | None, context: float) -> None:
    """MFU = real tok/s x (6N + 12 x layers x context x width) / peak."""
    from sftune.runtime import flops_per_token

    if peak:
        result["flops_per_token"] = flops_per_token(gpt2_small(), context)
        result["mfu"] = result["real_tok_s"] * result["flops_per_token"] / peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short measurement windows (a few minutes in all)")
    p.add_argument("--quality", action="store_true", help="also compare val loss after the same training tokens")
    p.add_argument("--json", metavar="FILE", help="write the figures to FILE")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where every run trains (default cpu)")
    p.add_argument("--compile", default="auto", choices=["auto", "off", "graphs", "torch"],
                   help="sftune's --compile for its runs (default auto)")
    p.add_argument("--packed-compile", choices=["auto", "off", "graphs", "torch"],
                   help="--compile for the packed run only (default: --compile)")
    p.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune",
                                              "max-autotune-no-cudagraphs"],
                   help="sftune's --compile-mode for its runs under --compile torch (default: torch.compile's)")
    p.add_argument("--compile-blocks", action="store_true",
                   help="sftune's runs with --compile-blocks (each transformer block compiled by inductor)")
    p.add_argument("--varlen", action="store_true",
                   help="(GPU) also sftune and packed under --attention varlen (packed: GPT-2 with attention dropout 0)")
    p.add_argument("--flex", action="store_true",
                   help="(GPU) also packed under --attention flex (GPT-2 with attention dropout 0)")
    p.add_argument("--only", metavar="RUN,RUN", help="run only these (seed, sftune, packed, sftune-varlen, "
                   "packed-varlen, packed-flex): no ratio without seed and sftune")
    p.add_argument("--whole-job", action="store_true",
                   help="also time the whole seed job, process start to exit: the notebook vs sftune train")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=None, help="steps not measured")
    p.add_argument("--steps", type=int, default=None, help="steps measured (at most)")
    p.add_argument("--seconds", type=float, default=None, help="seconds measured (at most)")
    args = p.parse_args()
    if args.worker:
        fn = {"seed": worker_seed, "sftune": worker_sftune, "sftune-varlen": worker_sftune, "packed": worker_sftune,
              "packed-varlen": worker_sftune, "packed-flex": worker_sftune, "seed-job": worker_seed_job}.get(args.worker, worker_quality)
        print(json.dumps(fn(args)))
        return
    gpu = args.device == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (20 if gpu else 2)
    args.steps = args.steps if args.steps is not None else (8 if args.quick else 40) * (10 if gpu else 1)
    args.seconds = args.seconds if args.seconds is not None else (60 if args.quick else 300)

    card, peak = card_and_peak(args.device)
    results: dict = {"card": card, "device": args.device, "partial": True}

    def save() -> None:  # after each run, so a run cut short by a time limit still leaves the others' figures
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    varlen = ["sftune-varlen", "packed-varlen"] if args.varlen else []
    flex = ["packed-flex"] if args.flex else []
    names = ("seed", "sftune", "packed", *varlen, *flex) if gpu else ("seed", "sftune")
    if args.only:  # (no ratio without both seed and sftune)
        names = tuple(args.only.split(","))
    # the ratio's two runs first, then the whole job, then the packed runs: a run cut short by a time limit loses
    # the least needed figures (the JSON is saved after each)
    for name in [n for n in names if not n.startswith("packed")]:
        results[name] = run_worker(name, args)
        save()
    if args.whole_job:
        results["whole_job"] = jobs = {}
        for name in ("seed", "sftune"):
            jobs[name] = whole_job(name, args)
            save()
        if not any("error" in job for job in jobs.values()):
            results["whole_job_fraction"] = jobs["sftune"]["wall_s"] / jobs["seed"]["wall_s"]
        save()
    for name in [n for n in names if n.startswith("packed")]:
        results[name] = run_worker(name, args)
        save()
    runs = {name: results[name] for name in names if "error" not in results[name]}
    for name, r in runs.items():
        add_mfu(r, peak, 1024 if name.startswith("packed") else r["mean_row_tokens"])
    both = {"seed", "sftune"} <= set(names)
    ratio = results["sftune"]["real_tok_s"] / results["seed"]["real_tok_s"] if both else None
    results.update(ratio=ratio, compile=args.compile, packed_compile=args.packed_compile or args.compile,
                   date=time.strftime("%Y-%m-%d"), torch=__import__("torch").__version__)
    if "packed" in results:
        results["packed_mfu"] = results["packed"].get("mfu")
    for name in ("packed-varlen", "packed-flex"):
        if name in results:
            results[f"{name.replace('-', '_')}_mfu"] = results[name].get("mfu")
    save()
    print(f"\nGPT-2 small on SST-2, {card}, torch {__import__('torch').__version__}, sftune --compile {args.compile}")
    print(f"{'run':<14}{'real tok/s':>12}{'ms/step':>9}{'MFU':>7}{'padded tok/s':>14}{'steps':>7}{'peak GPU MB':>13}"
          f"{'peak RSS MB':>13}{'compile s':>11}{'prep s':>8}{'cached s':>10}{'x seed':>8}")
    for name, r in runs.items():
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        gpu_mb = f"{r['peak_gpu_mb']:,.0f}" if r.get("peak_gpu_mb") else "-"
        print(f"{name:<14}{r['real_tok_s']:>12,.0f}{r['ms_per_step']:>9.1f}{mfu:>7}{r['padded_tok_s']:>14,.0f}"
              f"{r['steps']:>7}{gpu_mb:>13}{r['peak_rss_mb']:>13,.0f}{r.get('compile_s', 0.0):>11.2f}"
              f"{r['prep_first_s']:>8.2f}{r['prep_cached_s']:>10.3f}"
              + (f"{r['real_tok_s'] / results['seed']['real_tok_s']:>7.2f}x" if "seed" in results else ""))
    if args.quality:
        results["quality"] = q = {}
        for name in ("seed", "sftune"):
            q[name] = run_worker(f"quality-{name}", args)
            save()
        diff = (q["sftune"]["val_loss"] - q["seed"]["val_loss"]) / q["seed"]["val_loss"]
        size = "small" if gpu else f"{QUALITY['layers']} layers x {QUALITY['width']}"
        print(f"\nquality: {QUALITY['rows']:,} SST-2 rows, one epoch, lr {quality_lr(args)}, GPT-2 {size}; "
              f"val loss on the sentences (no EOS), token-weighted")
        for name, r in q.items():
            print(f"{name:<8} val loss {r['val_loss']:.4f} after {r['tokens']:,} tokens, {r['steps']} steps, {r['seconds']:.0f}s")
        print(f"sftune vs seed: {100 * diff:+.2f}% val loss")
        results["quality_diff"] = diff
    if "whole_job_fraction" in results:
        jobs = results["whole_job"]
        print(f"\nthe whole seed job, process start to exit: notebook {jobs['seed']['wall_s']:.1f} s (of which "
              f"{jobs['seed']['train_seconds']:.1f} s training; val {jobs['seed']['val_before']:.3f} -> "
              f"{jobs['seed']['val_after']:.3f}), sftune {jobs['sftune']['wall_s']:.1f} s (val "
              f"{jobs['sftune']['val_before']:.3f} -> {jobs['sftune']['val_after']:.3f}): "
              f"{results['whole_job_fraction']:.2f} of the notebook's time")
    print((f"\nratio sftune/seed (real tokens/s): {ratio:.2f}x" if ratio else "\n")
          + (f"; packed MFU {100 * results['packed_mfu']:.1f}%" if results.get("packed_mfu") else "")
          + (f"; packed varlen MFU {100 * results['packed_varlen_mfu']:.1f}%" if results.get("packed_varlen_mfu")
             else ""))
    results["partial"] = False
    save()


if __name__ == "__main__":
    main()
