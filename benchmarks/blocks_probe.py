"""Why a CUDA graph of a step with `--compile-blocks` fails, and what the step does after (GPU only).

    python benchmarks/blocks_probe.py              # each case in its own process (dropout, attention function):
                                                   # (0.1, varlen) as training now runs these rows, (0.1, sdpa)

Per case (GPT-2 small, random init, bf16, inductor, the seed recipe's 32 x 48 micro-batch): the compiled blocks'
first eager step (its compile time); `StepGraphs` as the training loop uses it (captured, or given up with its
reason) and one eager step after it (a capture that raised must leave the CUDA generator usable: try 125); then
the same capture by hand, with the whole traceback of what it raised; and, when graphs capture, their replay time
with and without the compiled blocks. Attention "sdpa" is transformers' own (which builds a causal mask while a
stream captures: the compiled blocks recompiled inside the capture and failed, try 125); "varlen" sftune's
(`attention.NAME`: rows that are not packed take SDPA with no mask, captured or not), what `auto` takes here now.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

GPT2 = Path(__file__).resolve().parents[2] / "shared" / "models" / "gpt2"


def case(dropout: float, attention: str) -> dict:
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from sftune.batching import Padding, collate, count_targets, to_device
    from sftune.data import Examples
    from sftune.graphs import StepGraphs
    from sftune.loss import CausalLMLoss
    from sftune.blocks import compile_blocks, fuse_activations
    from sftune.runtime import autocast

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    config = GPT2Config.from_pretrained(GPT2)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = dropout
    torch.manual_seed(0)
    from sftune.attention import NAME, register

    register()

    def built():
        made = GPT2LMHeadModel(config)
        fuse_activations(made)
        if attention == "varlen":
            made.set_attn_implementation(NAME)
        return made

    model = built()
    rng = np.random.default_rng(0)
    ex = Examples.from_lists([rng.integers(0, 50257, int(n)).tolist() for n in rng.integers(10, 40, 32)])
    batch = collate(ex, list(range(32)), 50256, Padding(16, 32, 1024, static=True))
    scale = 1 / count_targets(batch)
    report: dict = {"dropout": dropout, "attention": attention, "torch": torch.__version__}

    def eager(loss_model):
        loss_model.zero_grad(set_to_none=True)
        with autocast(device, "bf16"):
            loss = loss_model(to_device(batch, device))
        (loss * scale).backward()
        return float(loss)

    def replay_ms(loss_model, graphs) -> float:
        """ms a replay of the captured step (30 of them)."""
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(30):
            loss_model.zero_grad(set_to_none=True)
            graphs.run(batch, scale)
        torch.cuda.synchronize()
        return (time.perf_counter() - started) / 30 * 1e3

    plain = CausalLMLoss(built().to(device)).train()
    graphs = StepGraphs(plain, device, "bf16", required=False, assign=True)
    report["plain_replay_ms"] = replay_ms(plain, graphs) if graphs.run(batch, scale) is not None else None
    del graphs
    del plain
    loss_model = CausalLMLoss(model.to(device)).train()
    compile_blocks(model, "inductor", 8)
    started = time.perf_counter()
    report["first_eager_loss"] = eager(loss_model)
    torch.cuda.synchronize()
    report["compile_s"] = time.perf_counter() - started
    graphs = StepGraphs(loss_model, device, "bf16", required=False, assign=True)
    got = graphs.run(batch, scale)
    report["step_graphs"] = "captured" if got is not None else f"gave up: {graphs.failed}"
    try:
        report["eager_after"] = eager(loss_model)
    except Exception as e:  # noqa: BLE001
        report["eager_after"] = f"ERROR {e!r}"[:500]
    if got is not None:
        report["blocks_replay_ms"] = replay_ms(loss_model, graphs)
        return report
    # by hand, for the whole traceback
    inputs = to_device(batch, device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            loss_model.zero_grad(set_to_none=True)
            with autocast(device, "bf16", cache=False):
                (loss_model(inputs) * scale).backward()
    torch.cuda.current_stream().wait_stream(side)
    loss_model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            with autocast(device, "bf16", cache=False):
                (loss_model(inputs) * scale).backward()
        report["by_hand"] = "captured"
    except Exception:  # noqa: BLE001
        report["by_hand"] = traceback.format_exc()[-6000:]
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", nargs=2, metavar=("DROPOUT", "ATTENTION"),
                   help="one case in this process (ATTENTION: varlen or sdpa), its report as a JSON line")
    args = p.parse_args()
    if args.case:
        print(json.dumps(case(float(args.case[0]), args.case[1])))
        return
    for dropout, attention in (("0.1", "varlen"), ("0.1", "sdpa")):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--case", dropout, attention], capture_output=True,
                              text=True, timeout=150)
        lines = done.stdout.strip().splitlines()
        try:
            report = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            report = {"dropout": dropout, "exit": done.returncode, "stderr": done.stderr[-4000:]}
        report["wall_s"] = time.perf_counter() - started
        by_hand = report.pop("by_hand", None)
        print(json.dumps(report, indent=1), flush=True)
        if by_hand:
            print(f"capture by hand (dropout {dropout}):\n{by_hand}", flush=True)


if __name__ == "__main__":
    main()
