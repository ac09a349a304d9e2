"""The sample prompts' completions at each evaluation: one at a time (`complete`, as before) against one batch
(`complete_greedily`, what a training run does now), on a model built from a config with random weights.

    python benchmarks/samples.py                                        # GPT-2 small, the seed job's 2 prompts
    python benchmarks/samples.py --model-config examples/quickstart/model --prompts "the film is" "a clever ," "the script"
    python benchmarks/samples.py --device cuda --dtype bf16

Prints each way's seconds (the best of --repeats, after one call each to warm up) and whether the completions are
the same text.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-config", default=str(ROOT.parent / "shared" / "models" / "gpt2"))
    parser.add_argument("--tokenizer", default="bundled:gpt2")
    parser.add_argument("--prompts", nargs="+", default=["the movie is", "a gripping"])  # configs/gpt2-sst2.yaml's
    parser.add_argument("--max-new-tokens", type=int, default=24)  # (sample_max_new_tokens' default)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM

    from sftune.generate import complete, complete_greedily
    from sftune.modeling import load_tokenizer

    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model_config), dtype=dtype)
    model.to(args.device)
    tokenizer = load_tokenizer(args.tokenizer)
    prompts = [(p, False) for p in args.prompts]
    ways = {
        "one at a time": lambda: [complete(model, tokenizer, p, args.max_new_tokens, temperature=0.0, quiet=True)[0]
                                  for p, _ in prompts],
        "one batch": lambda: complete_greedily(model, tokenizer, prompts, args.max_new_tokens),
    }
    seconds, texts = {}, {}
    for name, way in ways.items():
        texts[name] = way()  # (warm-up)
        times = []
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
            way()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        seconds[name] = min(times)
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"{len(prompts)} prompts, {args.max_new_tokens} new tokens, {args.model_config}, {args.dtype}, {name}")
    print("| way | seconds |\n| --- | ---: |")
    for way, s in seconds.items():
        print(f"| {way} | {s:.3f} |")
    print(f"ratio {seconds['one at a time'] / seconds['one batch']:.2f}x; the same completions: "
          f"{texts['one at a time'] == texts['one batch']}")


if __name__ == "__main__":
    main()
