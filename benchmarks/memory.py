"""Peak memory and step time: full fine-tuning, with --gradient-checkpointing, with --optimizer adafactor, and LoRA
(--lora-r 16, all-linear; `lora-fp32-base`: with --lora-base-dtype fp32), each run in its own process.

    python benchmarks/memory.py                      # GPT-2 small (random init), CPU: peak RSS
    python benchmarks/memory.py --device cuda        # on a GPU: peak allocated GPU memory too
    python benchmarks/memory.py --modes full,adafactor   # some of them
    python benchmarks/memory.py --device cuda --model-config examples/llama-1b --batch-size 8 --words 700
                                                     # the 1.08B Llama-shaped model, rows of ~1,000 tokens

GPT-2 small is built from ../shared/models/gpt2/config.json (random weights) with GPT-2's bundled tokenizer; the
data is 64 rows of `--words` words (120: about 126 tokens each), so every micro-batch is rows x that many tokens.
`--model-config` builds another model the same way (random weights, GPT-2's tokenizer: its vocabulary must hold
GPT-2's 50,257 ids).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPT2_CONFIG = ROOT.parent / "shared" / "models" / "gpt2" / "config.json"


def worker(args) -> dict:
    import torch

    import sftune
    from transformers import AutoConfig, AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = AutoConfig.from_pretrained(args.model_config)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp / "model")
        words = "the film is a warm funny sad long dull bright story of love and loss in a small town".split()
        rows = [" ".join(words[(i + j) % len(words)] for j in range(args.words)) for i in range(64)]
        (tmp / "data").mkdir()
        for split in ("train", "validation"):
            (tmp / "data" / f"{split}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
        cfg = sftune.resolve_config({
            "model": str(tmp / "model"), "tokenizer": "bundled:gpt2", "dataset": str(tmp / "data"),
            "batch_size": args.batch_size, "max_steps": args.steps + 1, "log_every": 1, "eval_batch_size": 4,
            "gradient_checkpointing": args.mode == "checkpointing", "device": args.device,
            "output_dir": str(tmp / "run"), "cache_dir": str(tmp / "cache"),
            **({"lora_r": 16, "lr": 2e-4} if args.mode.startswith("lora") else {}),
            **({"lora_base_dtype": "fp32"} if args.mode == "lora-fp32-base" else {}),
            **({"optimizer": "adafactor", "lr": 1e-3} if args.mode == "adafactor" else {})})
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sftune.train(cfg)
        rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if r["type"] == "train"]
        seconds = (steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]) / (len(steps) - 1)  # after the first step
        tokens = (steps[-1]["tokens"] - steps[0]["tokens"]) / (len(steps) - 1)
        result = {"mode": args.mode, "s_per_step": seconds, "tokens_per_s": tokens / seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        with torch.device("meta"):  # (no memory, no time: just the shapes)
            result["params_m"] = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters()) / 1e6
        if args.device == "cuda":
            result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
            result["gpu"] = torch.cuda.get_device_name()
        return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--modes", default="full,checkpointing,adafactor,lora",
                   help="which of full, checkpointing, adafactor, lora, lora-fp32-base (LoRA with the frozen base's "
                        "matrices kept fp32, not in the compute precision) to run")
    p.add_argument("--model-config", default=str(GPT2_CONFIG.parent),
                   help="directory of the config.json to build the model from (random weights) [default: GPT-2 small]")
    p.add_argument("--words", type=int, default=120, help="words per row (about 1.05 tokens each) [default: 120]")
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--worker", "--device", args.device, "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--mode", mode, "--model-config", args.model_config, "--words", str(args.words)]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results.append({**json.loads(out.strip().splitlines()[-1]), "wall_s": time.perf_counter() - t0})
        print(f"{mode}: {json.dumps(results[-1])}", file=sys.stderr, flush=True)  # (each as it ends: a run cut
        # short by a time limit keeps the modes that finished; the 1B model's four did not fit 120 s, try 125)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"{Path(args.model_config).name} ({results[0]['params_m']:,.0f}M parameters, random weights), batch "
          f"{args.batch_size} x ~{round(args.words * 1.05)} tokens, {args.device}")
    print(f"{'mode':<15}{'s/step':>9}{'tok/s':>9}{'peak RSS MB':>13}" + (f"{'peak GPU MB':>13}" if args.device == "cuda" else ""))
    for r in results:
        gpu = f"{r['peak_gpu_mb']:>13,.0f}" if "peak_gpu_mb" in r else ""
        print(f"{r['mode']:<15}{r['s_per_step']:>9.2f}{r['tokens_per_s']:>9,.0f}{r['peak_rss_mb']:>13,.0f}{gpu}")


if __name__ == "__main__":
    main()
