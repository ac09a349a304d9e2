"""What CI (on a CPU) cannot check: sftune's GPU step computes what the eager step computes. Run on a CUDA GPU.

    python3 benchmarks/gpu_check.py --json $OUT/gpu-check.json          # about 3-4 minutes on an H100/H200
    python3 benchmarks/gpu_check.py --quick                             # the unit checks only (under a minute)
    python3 benchmarks/gpu_check.py --device cpu --model M --dataset D --steps 4   # a dry run of 2-4 on a CPU
    python3 benchmarks/gpu_check.py --runs-only --only-runs lora,blocks           # some groups of whole runs only

1. graphs: a CUDA graph replay (`StepGraphs.run`) against the same micro-batch run eagerly, for GPT-2 small (random
   init): the summed loss and every gradient, fp32 (TF32 off) and bf16, with dropout off and on (the same seed
   before each: graph-safe RNG should draw what the eager step draws), over two batches of one shape (the second
   refills the graph's input buffers) and a third of another shape, then two steps of two micro-batches each (the
   same shape twice, and two shapes: their gradients summed); each with graphs that assign their own gradients
   (the default for a model this small) and with graphs that add into one set; in bf16 also assigning with the
   matrix products' weights cast in one pass (`casts.py`, the graphs' default in bf16 since try 88), and each mode's time
   for a replay of the seed recipe's 32 x 48 micro-batch. Relative errors: |a - b| / |b| for the loss, max over
   tensors of ||a - b|| / ||b|| for the gradients.
2. runs: whole `sftune train` runs (GPT-2 small, random init, SST-2, 30 steps of the seed's recipe) with
   --compile off and graphs in fp32, and off, graphs and torch (inductor) in bf16: the largest difference of the
   per-step losses from the eager run's.
   Then LoRA r16 in bf16, eager against the default GPU step (graphs).
3. resume: --compile graphs, bf16, dropout on: SIGTERM after step 12 of 24, then --resume auto; the final weights
   against an uninterrupted run's (bitwise equal is the goal); and the uninterrupted run against one with
   --memory-check off (the check, on by default on a GPU, must change nothing).
4. guard: a NaN loss at step 3 under graphs (SFTUNE_FAULT_NAN_STEPS) is skipped, and the run finishes. Then a
   real out-of-memory step (micro-batches of a million tokens): exit 2 with sftune's message, no traceback.
5. varlen (`--attention varlen`, also under --quick): torch's variable-length flash kernel against the per-sequence
   SDPA reference (output and the gradients of q, k, v; bf16 and fp16; 12 heads, and 8 query heads over 2 key/value
   heads; static batches' trailing empty sequences included); GPT-2 small packed rows, varlen against
   transformers' block mask (loss and gradients, bf16), eagerly and as a CUDA graph; and the attention alone,
   forward + backward, ms: varlen against SDPA with the block mask, on 32 packed rows of 1,024. Then
   `--attention flex` (compiled flex attention under the host-made block tables): the packed loss and gradients
   against the mask's, as a CUDA graph against eager, and its time beside the others'.
6. chunk math (also under --quick; alone with --loss-only): the fused loss over 32,768 rows of GPT-2 small's head
   in bf16 (the aligned cast), eager against its softmax compiled (`fused_loss.ChunkMath`, inductor): loss and
   gradients, the compile's seconds, and ms per call of each way with chunks of 1,024 rows and of `chunk_rows`.
7. moe (with 2): a tiny Mixtral with its routers' load-balancing loss, bf16, graphs against eager (token and
   router losses).
8. syncs (also under --quick): host-device syncs in an eager micro-batch (torch's sync debug mode), with and
   without transformers' padding check, which GPT-2's forward runs when its config names a pad token.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GPT2 = SHARED / "models" / "gpt2"
SST2 = SHARED / "data" / "sst2"


def rel(a, b) -> float:
    import torch

    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / max(float(torch.linalg.vector_norm(b)), 1e-30))


def eager_loss_and_grads(loss_model, batch: dict, seed: int, device, precision: str) -> tuple:
    """One eager micro-batch from a fresh seed: its loss and every gradient (of the loss over the batch's targets)."""
    import torch

    from sftune.batching import count_targets, to_device
    from sftune.runtime import autocast

    loss_model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with autocast(device, precision):
        loss = loss_model(to_device(batch, device))
    (loss * (1 / count_targets(batch))).backward()
    return loss.detach().clone(), [p.grad.clone() for p in loss_model.parameters()]


def graph_vs_eager(precision: str, dropout: bool) -> dict:
    """One precision and dropout setting: eager and graphed micro-batches from the same weights and seeds."""
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from sftune.batching import Padding, best_fit_decreasing, collate, collate_packed, count_targets, to_device
    from sftune.casts import MatmulCasts
    from sftune.data import Examples
    from sftune.graphs import StepGraphs
    from sftune.loss import CausalLMLoss
    from sftune.runtime import autocast

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")
    config = GPT2Config.from_pretrained(GPT2)
    if not dropout:
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    torch.manual_seed(0)
    loss_model = CausalLMLoss(GPT2LMHeadModel(config).to(device)).train()
    rng = np.random.default_rng(0)
    padding = Padding(16, 32, 1024, static=True)
    batches = []
    for low, high in ((10, 40), (10, 40), (50, 70)):  # two of one shape (32 x 48), one of another (32 x 80)
        ex = Examples.from_lists([rng.integers(0, 50257, int(n)).tolist() for n in rng.integers(low, high, 32)])
        batches.append(collate(ex, list(range(32)), 50256, padding))
    # packed rows (position ids restart per example: transformers builds the block-diagonal mask inside the graph)
    ex = Examples.from_lists([rng.integers(0, 50257, int(n)).tolist() for n in rng.integers(6, 60, 400)])
    rows = best_fit_decreasing(ex.lengths, 256)
    batches.append(collate_packed(ex, rows[:8], 50256, Padding(256, 8, 256, static=True)))

    def eager(batch, seed):
        return eager_loss_and_grads(loss_model, batch, seed, device, precision)

    def eager_step(pair, seed):  # two micro-batches of one step, their gradients summed (grad accumulation)
        loss_model.zero_grad(set_to_none=True)
        total = 0
        for j, batch in enumerate(pair):
            torch.manual_seed(seed + j)
            with autocast(device, precision):
                loss = loss_model(to_device(batch, device))
            (loss * (1 / 1000)).backward()
            total = total + loss.detach()
        return total, [p.grad.clone() for p in loss_model.parameters()]

    want = [eager(b, 100 + i) for i, b in enumerate(batches)]
    pairs = [(batches[0], batches[1]), (batches[0], batches[2])]  # (the same shape twice; two shapes)
    want += [eager_step(pair, 200 + 10 * i) for i, pair in enumerate(pairs)]
    report = {"precision": precision, "dropout": dropout, "modes": []}
    # each graph's own gradients, assigned, or one set, added into; in bf16 also with the matrix products' weights
    # cast in one pass (`casts.py`: the same numbers as autocast's own casts, bitwise on a CPU)
    for assign, cast in ((True, False), (False, False)) + (((True, True),) if precision == "bf16" else ()):
        loss_model.zero_grad(set_to_none=True)
        casts = MatmulCasts.for_model(loss_model, torch.bfloat16) if cast else None
        graphs = StepGraphs(loss_model, device, precision, required=True, assign=assign, casts=casts)
        got = []
        for i, b in enumerate(batches):
            loss_model.zero_grad(set_to_none=assign)
            torch.manual_seed(100 + i)
            loss = graphs.run(b, 1 / count_targets(b)).clone()
            got.append((loss, [p.grad.clone() for p in loss_model.parameters()]))
        for i, pair in enumerate(pairs):
            loss_model.zero_grad(set_to_none=assign)
            total = 0
            for j, batch in enumerate(pair):
                torch.manual_seed(200 + 10 * i + j)
                total = total + graphs.run(batch, 1 / 1000, first=j == 0).clone()
            got.append((total, [p.grad.clone() for p in loss_model.parameters()]))
        torch.cuda.synchronize()
        rows = []
        for i, ((gl, gg), (wl, wg)) in enumerate(zip(got, want)):
            shape = (list(batches[i]["input_ids"].shape) if i < len(batches)
                     else [list(b["input_ids"].shape) for b in pairs[i - len(batches)]])
            rows.append({"batch": i, "shape": shape, "loss_rel": rel(gl, wl),
                         "grad_rel_max": max(rel(a, b) for a, b in zip(gg, wg)),
                         "bitwise": bool(torch.equal(gl, wl) and all(torch.equal(a, b) for a, b in zip(gg, wg)))})
        # the replay's own time (the seed recipe's micro-batch, 32 x 48): what the one-pass casts save, if anything
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(50):
            loss_model.zero_grad(set_to_none=assign)
            graphs.run(batches[0], 1 / count_targets(batches[0]))
        torch.cuda.synchronize()
        replay_ms = (time.perf_counter() - started) / 50 * 1e3
        report["modes"].append({"assign": assign, "casts": graphs.casts is not None, "graphs": len(graphs.graphs),
                                "replay_ms": replay_ms, "batches": rows})
    return report


def blocks_check() -> dict:
    """`--compile-blocks` on the GPU (GPT-2 small, bf16, dropout off, inductor): the blocks' first compile in
    seconds; their eager micro-batch against the plain blocks' (inductor's fused kernels round otherwise: close,
    not bitwise); a CUDA graph of the compiled step against its own eager step (bitwise expected, as for plain
    graphs); and a replay of the seed recipe's micro-batch (32 x 48) and of 8 packed rows of 1,024, with and
    without the compiled blocks (what the fusion saves inside the graphs). (Dropout in compiled blocks inside
    graphs: the `runs` phase's whole run.)"""
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from sftune.batching import Padding, best_fit_decreasing, collate, collate_packed, count_targets
    from sftune.graphs import StepGraphs
    from sftune.data import Examples
    from sftune.attention import NAME, register
    from sftune.loss import CausalLMLoss
    from sftune.blocks import compile_blocks, fuse_activations

    device = torch.device("cuda")
    config = GPT2Config.from_pretrained(GPT2)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    torch.manual_seed(0)
    register()  # (as training runs these rows under graphs: SDPA with no mask, in the capture too; try 125)
    plain = GPT2LMHeadModel(config)
    fuse_activations(plain)
    compiled = GPT2LMHeadModel(config)
    fuse_activations(compiled)
    for model in (plain, compiled):
        model.set_attn_implementation(NAME)
    compiled.load_state_dict(plain.state_dict())
    models = {"plain": CausalLMLoss(plain.to(device)).train(), "blocks": CausalLMLoss(compiled.to(device)).train()}
    rng = np.random.default_rng(0)
    ex = Examples.from_lists([rng.integers(0, 50257, int(n)).tolist() for n in rng.integers(10, 40, 32)])
    batches = {"32 x 48": collate(ex, list(range(32)), 50256, Padding(16, 32, 1024, static=True))}
    ex = Examples.from_lists([rng.integers(0, 50257, int(n)).tolist() for n in rng.integers(6, 60, 1200)])
    rows = best_fit_decreasing(ex.lengths, 1024)
    batches["8 x 1024 packed"] = collate_packed(ex, rows[:8], 50256, Padding(1024, 8, 1024, static=True))

    def eager(loss_model, batch, seed):
        return eager_loss_and_grads(loss_model, batch, seed, device, "bf16")

    report = {"compile_s": {}, "batches": {}}
    compile_blocks(compiled, "inductor", 64)
    for name, batch in batches.items():
        started = time.perf_counter()
        eager(models["blocks"], batch, 0)  # (compiles this shape)
        torch.cuda.synchronize()
        report["compile_s"][name] = time.perf_counter() - started
    for name, batch in batches.items():
        (wl, wg), (gl, gg) = (eager(models[k], batch, 1) for k in ("plain", "blocks"))
        row = {"vs_plain_loss_rel": rel(gl, wl), "vs_plain_grad_rel_max": max(rel(a, b) for a, b in zip(gg, wg))}
        for kind, loss_model in models.items():
            loss_model.zero_grad(set_to_none=True)
            graphs = StepGraphs(loss_model, device, "bf16", required=True, assign=True)
            torch.manual_seed(1)
            loss = graphs.run(batch, 1 / count_targets(batch)).clone()
            grads = [p.grad.clone() for p in loss_model.parameters()]
            want = (wl, wg) if kind == "plain" else (gl, gg)
            row[f"{kind}_graph_bitwise"] = bool(torch.equal(loss, want[0])
                                                and all(torch.equal(a, b) for a, b in zip(grads, want[1])))
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(30):
                loss_model.zero_grad(set_to_none=True)
                graphs.run(batch, 1 / count_targets(batch))
            torch.cuda.synchronize()
            row[f"{kind}_replay_ms"] = (time.perf_counter() - started) / 30 * 1e3
            del graphs
        report["batches"][name] = row
    return report


def sync_check() -> dict:
    """Host-device syncs in an eager micro-batch (forward and backward of the loss module, bf16, GPT-2 small whose
    config names a pad token, as a model sftune saved does), counted by torch's sync debug mode: with the loss
    module's `skip_padding_check`, and with transformers' padding check put back (a sync each forward)."""
    import warnings

    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from sftune.batching import collate, to_device
    from sftune.data import Examples
    from sftune.loss import CausalLMLoss
    from sftune.runtime import autocast

    device = torch.device("cuda")
    config = GPT2Config.from_pretrained(GPT2)
    config.pad_token_id = 50256
    rng = np.random.default_rng(0)
    ex = Examples.from_lists([rng.integers(0, 50257, int(n)).tolist() for n in rng.integers(10, 40, 32)])
    batch = to_device(collate(ex, list(range(32)), 50256), device)
    report = {}
    for fused in (True, False):
        loss_model = CausalLMLoss(GPT2LMHeadModel(config).to(device), fused=fused).train()
        for check in ("skipped", "transformers'"):
            if check != "skipped":
                for module in loss_model.modules():
                    module.__dict__.pop("warn_if_padding_and_no_attention_mask", None)
            for warm in (True, False):  # (the first pass allocates and caches: not counted)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode(0 if warm else 1)
                    try:
                        with autocast(device, "bf16"):
                            loss = loss_model(batch)
                        loss.backward()
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
            syncs = [str(w.message).splitlines()[0][:160] for w in caught if "synchroniz" in str(w.message)]
            report[f"{'fused' if fused else 'plain'} loss, padding check {check}"] = {"syncs": len(syncs),
                                                                                     "first": syncs[:3]}
    return report


def varlen_check() -> dict:
    """`--attention varlen` on the GPU: the kernel, the packed loss, a graph of it, and the attention's time; then
    `--attention flex` the same way (its packed loss against the mask's, a graph of it, its time)."""
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from torch.nn.attention.flex_attention import flex_attention

    from sftune.attention import FLEX_NAME, NAME, block_tables, flex_inputs, register, register_flex, \
        sequence_starts, varlen_kernel, varlen_reference
    from sftune.batching import Padding, best_fit_decreasing, collate_packed, count_targets, to_device
    from sftune.data import Examples
    from sftune.graphs import StepGraphs
    from sftune.loss import CausalLMLoss
    from sftune.runtime import autocast

    register()
    device = torch.device("cuda")
    rng = np.random.default_rng(0)
    report: dict = {"torch": torch.__version__, "kernel": []}

    def packed_lengths(rows: int, width: int) -> list[list[int]]:
        out = []
        for _ in range(rows):
            row, room = [], width - int(rng.integers(0, 40))
            while (n := int(rng.integers(6, 70))) <= room:
                row.append(n)
                room -= n
            out.append(row)
        return out

    for dtype, heads, kv_heads in ((torch.bfloat16, 12, 12), (torch.float16, 12, 12), (torch.bfloat16, 8, 2)):
        rows, width = 8, 256
        cu, longest = sequence_starts(packed_lengths(rows - 1, width), width, rows, static=True)  # + an empty row
        cu = torch.from_numpy(cu).to(device)
        leaves = [torch.randn(rows * width, h, 64, device=device, dtype=dtype, requires_grad=True)
                  for h in (heads, kv_heads, kv_heads)]
        grad_out = torch.randn(rows * width, heads, 64, device=device, dtype=dtype)
        results = []
        for kernel in (varlen_kernel, varlen_reference):
            out = kernel(*leaves, cu, longest, 0.125)
            grads = torch.autograd.grad(out, leaves, grad_out)
            results.append((out, grads))
        (out, grads), (ref, ref_grads) = results
        report["kernel"].append({"dtype": str(dtype), "heads": heads, "kv_heads": kv_heads, "sequences": len(cu) - 1,
                                 "out_rel": rel(out, ref), "grad_rel_max": max(rel(a, b) for a, b in zip(grads, ref_grads))})

    config = GPT2Config.from_pretrained(GPT2)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    torch.manual_seed(0)
    loss_model = CausalLMLoss(GPT2LMHeadModel(config).to(device)).train()
    ex = Examples.from_lists([rng.integers(0, 50257, int(n)).tolist() for n in rng.integers(6, 60, 800)])
    rows = best_fit_decreasing(ex.lengths, 1024)
    batch = collate_packed(ex, rows[:4], 50256, Padding(16, 4, 1024, static=True))

    def step(model, graphs=None):
        model.zero_grad(set_to_none=graphs is None)
        if graphs is not None:
            loss = graphs.run(batch, 1 / count_targets(batch)).clone()
        else:
            with autocast(device, "bf16"):
                loss = model(to_device(batch, device))
            (loss * (1 / count_targets(batch))).backward()
        return loss.detach().clone(), [p.grad.clone() for p in model.parameters()]

    mask_loss, mask_grads = step(loss_model)
    loss_model.model.set_attn_implementation(NAME)
    varlen_model = CausalLMLoss(loss_model.model).train()
    var_loss, var_grads = step(varlen_model)
    report["packed"] = {"loss_rel": rel(var_loss, mask_loss),
                        "grad_rel_max": max(rel(a, b) for a, b in zip(var_grads, mask_grads))}
    try:
        graph_loss, graph_grads = step(varlen_model, StepGraphs(varlen_model, device, "bf16", required=True))
        report["graph"] = {"loss_rel": rel(graph_loss, var_loss),
                           "grad_rel_max": max(rel(a, b) for a, b in zip(graph_grads, var_grads))}
    except Exception as e:  # noqa: BLE001
        report["graph"] = {"error": repr(e)[:2000]}
    try:  # --attention flex: flex attention (compiled) under the block tables, eagerly and as a CUDA graph
        register_flex()
        loss_model.model.set_attn_implementation(FLEX_NAME)
        flex_model = CausalLMLoss(loss_model.model).train()
        started = time.perf_counter()
        flex_loss, flex_grads = step(flex_model)
        report["flex_packed"] = {"loss_rel": rel(flex_loss, mask_loss), "first_step_s": time.perf_counter() - started,
                                 "grad_rel_max": max(rel(a, b) for a, b in zip(flex_grads, mask_grads))}
        graph_loss, graph_grads = step(flex_model, StepGraphs(flex_model, device, "bf16", required=True))
        report["flex_graph"] = {"loss_rel": rel(graph_loss, flex_loss),
                                "grad_rel_max": max(rel(a, b) for a, b in zip(graph_grads, flex_grads))}
    except Exception as e:  # noqa: BLE001
        report["flex_error"] = repr(e)[:2000]
    try:  # Gemma 2's capped attention scores under flex (a score_mod, try 143) against its own eager attention
        from transformers import Gemma2Config, Gemma2ForCausalLM

        torch.manual_seed(0)
        gemma = Gemma2Config(vocab_size=50257, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=64, attn_logit_softcapping=50.0,
                             final_logit_softcapping=30.0, sliding_window=4096, max_position_embeddings=1024)
        gemma_model = CausalLMLoss(Gemma2ForCausalLM(gemma).to(device)).train()
        with torch.no_grad():  # (scores that reach the cap: at the usual initialisation they stay far below it)
            for name, p in gemma_model.named_parameters():
                if "q_proj" in name or "k_proj" in name:
                    p.mul_(40)
        eager_loss, eager_grads = step(gemma_model)
        gemma_model.model.set_attn_implementation(FLEX_NAME)
        capped_loss, capped_grads = step(CausalLMLoss(gemma_model.model).train())
        report["flex_gemma2"] = {"loss_rel": rel(capped_loss, eager_loss), "loss": float(eager_loss),
                                 "grad_rel_max": max(rel(a, b) for a, b in zip(capped_grads, eager_grads))}
    except Exception as e:  # noqa: BLE001
        report["flex_gemma2_error"] = repr(e)[:2000]

    # the attention alone: 32 packed rows of 1,024, 12 heads of 64, forward + backward
    rows, width, heads = 32, 1024, 12
    lengths = packed_lengths(rows, width)
    cu, longest = sequence_starts(lengths, width, rows, static=False)
    cu = torch.from_numpy(cu).to(device)
    q, k, v = (torch.randn(rows * width, heads, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    seq = torch.repeat_interleave(torch.arange(len(cu) - 1, device=device), cu.diff().long()).view(rows, width)
    mask = (seq[:, :, None] == seq[:, None, :]) & torch.ones(width, width, dtype=torch.bool, device=device).tril()

    def sdpa_mask():
        qs, ks, vs = (t.view(rows, width, heads, 64).transpose(1, 2) for t in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask[:, None], scale=0.125)

    def timed(fn) -> float:
        for _ in range(3):
            fn().sum().backward()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(20):
            fn().sum().backward()
        torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - started) / 20

    report["attention_ms"] = {"varlen": timed(lambda: varlen_kernel(q, k, v, cu, longest, 0.125)),
                              "sdpa_block_mask": timed(sdpa_mask), "sequences": len(cu) - 1, "longest": longest}
    try:
        tables = {k: torch.from_numpy(a).to(device) for k, a in block_tables(lengths, width, rows).items()}
        block_mask = flex_inputs(tables)["sftune_block_mask"]
        flex = torch.compile(flex_attention, dynamic=False)

        def flex_blocks():
            qs, ks, vs = (t.view(rows, width, heads, 64).transpose(1, 2) for t in (q, k, v))
            return flex(qs, ks, vs, block_mask=block_mask, scale=0.125)

        report["attention_ms"]["flex"] = timed(flex_blocks)
        report["attention_ms"]["flex_rel"] = rel(flex_blocks().float(), sdpa_mask().float())
    except Exception as e:  # noqa: BLE001
        report["attention_ms"]["flex_error"] = repr(e)[:2000]
    return report


def chunk_math_check() -> dict:
    """The fused loss on a packed step's worth of rows (32 x 1,024, GPT-2 small's head, bf16 products on the
    aligned cast as training makes it): its softmax compiled against eager (loss and gradients), and ms per forward
    + backward for each way: eager or compiled, chunks of 1,024 rows (a CPU's) or `chunk_rows` (a GPU's)."""
    import torch

    from sftune.batching import IGNORE_INDEX
    from sftune.fused_loss import CE_CHUNK_ROWS, ChunkMath, LinearCrossEntropySum, aligned_cast, chunk_rows

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(32 * 1024, 768, device=device, generator=gen, requires_grad=True)
    weight = (0.02 * torch.randn(50257, 768, device=device, generator=gen)).requires_grad_(True)
    targets = torch.randint(0, 50257, (32 * 1024,), device=device, generator=gen)
    targets[::9] = IGNORE_INDEX
    gpu_rows = chunk_rows(device, weight.shape[0])

    def call(chunk_math, rows=CE_CHUNK_ROWS):
        w = aligned_cast(weight, torch.bfloat16)
        loss = LinearCrossEntropySum.apply(hidden, weight, targets, w, None, chunk_math, 1.0, None, None, None, rows)
        return loss, torch.autograd.grad(loss, (hidden, weight))

    def timed(chunk_math, rows) -> float:
        call(chunk_math, rows)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(10):
            call(chunk_math, rows)
        torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - started) / 10

    want_loss, want_grads = call(None)
    chunk_math = ChunkMath()
    started = time.perf_counter()
    got_loss, got_grads = call(chunk_math)
    torch.cuda.synchronize()
    first_call_s = time.perf_counter() - started
    big_loss, big_grads = call(None, gpu_rows)
    report = {"failed": chunk_math.failed, "first_call_s": first_call_s, "loss_rel": rel(got_loss, want_loss),
              "grad_rel_max": max(rel(a, b) for a, b in zip(got_grads, want_grads)), "gpu_chunk_rows": gpu_rows,
              "gpu_chunks_loss_rel": rel(big_loss, want_loss),
              "gpu_chunks_grad_rel_max": max(rel(a, b) for a, b in zip(big_grads, want_grads))}
    for name, math in (("eager", None), ("compiled", chunk_math)):
        for rows in (CE_CHUNK_ROWS, gpu_rows):
            report[f"ms_{name}_{rows}"] = timed(math, rows)
    for rows in (2 * gpu_rows, 4 * gpu_rows):  # (larger chunks than `chunk_rows` gives: fewer passes over the head's
        # gradient, more memory; 1,024 -> 5,120 took 18% off in try 146)
        report[f"ms_compiled_{rows}"] = timed(chunk_math, rows)
    return report


OPTIONS = {"model": str(GPT2), "tokenizer": None, "dataset": str(SST2), "device": "cuda", "steps": 30}  # (set by main)


def sftune_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sftune", "train", "--model", OPTIONS["model"], "--init", "random", "--dataset",
            OPTIONS["dataset"], "--device", OPTIONS["device"], "--log-every", "1",
            *(["--tokenizer", OPTIONS["tokenizer"]] if OPTIONS["tokenizer"] else []), "--eval-every", "100000", "--report-to", "none",
            "--cache-dir", str(out.parent / "cache"), "--output-dir", str(out), "--overwrite", *extra]


def run(cmd: list[str], env: dict | None = None, stop_after: str | None = None) -> tuple[int, str]:
    """Run a CLI process; with `stop_after`, SIGTERM it when a stdout line starts so."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if stop_after and line.startswith(stop_after):
            proc.send_signal(signal.SIGTERM)
            stop_after = None
    return proc.wait(), "".join(lines)


def losses(out: Path, key: str = "loss") -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if r["type"] == "train"]


def compared_run(out: Path, precision: str, mode: str, base: dict | None, *extra: str) -> tuple[dict, dict]:
    """One whole run; its row (exit, seconds, last loss, and the largest difference from `base`, the eager run's
    losses; the first step's gradient norm over the eager run's, which a loss alone hides: a compiled step that
    drops its gradients, as torch.compile before 2.13 did to the fused loss, logs the eager losses and learns
    nothing) and its losses and gradient norms."""
    started = time.perf_counter()
    # (the eager run pads its widths as a graphed or compiled step does, to multiples of 16: dropout's masks and
    # NEFTune's noise are drawn over the padded shape, so other widths draw other numbers. Try 89: without it the
    # fp32 graphed run's losses were up to 0.21 from the eager run's)
    padded = ["--pad-to-multiple-of", "16"] if mode == "off" else []
    code, text = run(sftune_cmd(out, "--max-steps", str(OPTIONS["steps"]), "--precision", precision, "--compile", mode,
                                *padded, *extra))
    label = (" (LoRA r16, 2 added tokens)" if "--add-tokens" in extra else " (LoRA r16)" if "--lora-r" in extra
             else " (NEFTune 5)" if "--neftune-alpha" in extra else "")
    row = {"precision": precision, "compile": mode + label, "exit": code,
           "seconds": time.perf_counter() - started}
    row["step_log"] = [line for line in text.splitlines() if line.startswith(("step:", "warning", "CUDA graph"))][:6]
    if code != 0:
        row["log_tail"] = text[-3000:]
        return row, {}
    got = {"loss": losses(out), "grad_norm": losses(out, "grad_norm")}
    row["last_loss"] = got["loss"][-1]
    if base:
        row["max_loss_diff"] = max(abs(a - b) for a, b in zip(got["loss"], base["loss"]))
        row["max_loss_rel"] = max(abs(a - b) / abs(b) for a, b in zip(got["loss"], base["loss"]))
        row["first_grad_norm_ratio"] = got["grad_norm"][0] / base["grad_norm"][0]
    return row, got


def whole_runs(tmp: Path):
    """Each --compile mode in fp32 and bf16 against the eager run's losses. Yields each row as its run ends."""
    modes = ("off", "graphs", "torch") if OPTIONS["device"] == "cuda" else ("off", "torch")
    for precision in ("fp32", "bf16"):
        base = None
        for mode in modes if precision == "bf16" else modes[:-1]:  # (one inductor compile: about a minute)
            row, got = compared_run(tmp / f"run-{precision}-{mode}", precision, mode, base)
            base = got if mode == "off" else base
            yield row


def blocks_runs(tmp: Path):
    """`--compile-blocks` (inductor) under graphs in bf16 with dropout (GPT-2's 0.1) against the eager run: the
    compiled blocks' own dropout draws, inside the captured step, and their fused kernels' rounding: close to the
    eager losses, not equal (each capture is also checked against its own eager step: a warning in `step_log`
    if one differed)."""
    base = None
    for mode, extra in (("off", []), ("graphs" if OPTIONS["device"] == "cuda" else "off", ["--compile-blocks"])):
        row, got = compared_run(tmp / f"run-blocks-{mode}{'-blocks' if extra else ''}", "bf16", mode, base, *extra)
        row["compile"] += " + blocks" if extra else ""
        base = base or got
        yield row


def neftune_runs(tmp: Path):
    """NEFTune (alpha 5) in bf16, eager against graphs: its noise is drawn inside the captured step from the
    generator CUDA graphs replay (as dropout's is). The eager run pads its widths as the graphed one does, so the
    noise is drawn over the same shapes (before try 89 it was not). On a CPU under --compile torch inductor draws
    noise of its own: losses within 1.9e-2, first gradient norm within 0.6% (try 90's dry run)."""
    base = None
    for mode in ("off", "graphs" if OPTIONS["device"] == "cuda" else "torch"):
        row, got = compared_run(tmp / f"run-neftune-{mode}", "bf16", mode, base, "--neftune-alpha", "5")
        base = got if mode == "off" else base
        yield row


def lora_runs(tmp: Path, *tokens: str):
    """LoRA r16 in bf16, eager against the default GPU step (graphs), with `tokens` (e.g. two added tokens: their
    rows trained as peft trainable tokens, the fused loss computing their gradient alone; peft builds an index
    tensor from a list in each forward, a host-to-device copy a capture may refuse, and sftune then trains eagerly,
    which each row's `step_log` shows)."""
    base = None
    for mode in ("off", "graphs" if OPTIONS["device"] == "cuda" else "torch"):
        out = tmp / f"run-lora{'-tokens' if tokens else ''}-{mode}"
        row, got = compared_run(out, "bf16", mode, base, "--lora-r", "16", "--lr", "1e-3", *tokens)
        base = got if mode == "off" else base
        yield row


def fp16_runs(tmp: Path):
    """fp16 (what `--precision auto` takes on a GPU without bf16 tensor cores: a T4, a V100), eager (its loss scaler
    decides on the host, so no graphs) against fp32 eager: the loss scaler's path on a GPU, where it had never run;
    close to fp32, not equal (fp16's rounding)."""
    base = None
    for precision in ("fp32", "fp16"):
        row, got = compared_run(tmp / f"run-{precision}-scaled", precision, "off", base)
        row["compile"] += " (loss-scaled)" if precision == "fp16" else ""
        base = base or got
        yield row


def moe_runs(tmp: Path):
    """A tiny Mixtral (tests/fixtures/tiny-mixtral, random init) with its routers' load-balancing loss, bf16: the
    default GPU step (graphs) against eager, the token losses and the logged router losses (the loss takes the
    routers' logits and the batch's real-token mask inside the captured step). Yields each row as its run ends."""
    model = {"model": str(ROOT / "tests" / "fixtures" / "tiny-mixtral"), "tokenizer": OPTIONS["tokenizer"] or str(GPT2)}
    saved = {k: OPTIONS[k] for k in model}
    OPTIONS.update(model)
    try:
        base = None
        for mode in ("off", "graphs" if OPTIONS["device"] == "cuda" else "torch"):
            row, got = compared_run(tmp / f"run-moe-{mode}", "bf16", mode, base)
            row["compile"] += " (Mixtral, router loss)"
            if got:
                got["router_loss"] = losses(tmp / f"run-moe-{mode}", "router_loss")
                if base:
                    row["max_router_loss_diff"] = max(abs(a - b) for a, b in zip(got["router_loss"],
                                                                                  base["router_loss"]))
            base = got if mode == "off" else base
            yield row
    finally:
        OPTIONS.update(saved)


def resume_check(tmp: Path) -> dict:
    from safetensors.torch import load_file

    mode = "graphs" if OPTIONS["device"] == "cuda" else "off"
    common = ("--max-steps", "24", "--save-every", "6", "--precision", "bf16", "--compile", mode)
    whole, cut = tmp / "resume-whole", tmp / "resume-cut"
    code_whole, _ = run(sftune_cmd(whole, *common))
    code_cut, _ = run(sftune_cmd(cut, *common), stop_after="step     12/")
    code_resume, text = run(sftune_cmd(cut, *common, "--resume", "auto"))
    result = {"exit_whole": code_whole, "exit_sigterm": code_cut, "exit_resume": code_resume}
    if code_whole == 0 and code_resume == 0:
        a, b = load_file(whole / "model.safetensors"), load_file(cut / "model.safetensors")
        result["bitwise"] = all(__import__("torch").equal(a[k], b[k]) for k in a)
        result["max_rel"] = max(rel(b[k], a[k]) for k in a)
        result["losses_equal"] = losses(whole)[12:] == losses(cut)[-12:]
        # --memory-check (on by default on a GPU: after each process's first step, undone) against a run without it:
        # the same losses and weights, its generators set back under graphs too
        unchecked = tmp / "resume-unchecked"
        result["exit_unchecked"], _ = run(sftune_cmd(unchecked, *common, "--memory-check", "off"))
        if result["exit_unchecked"] == 0:
            c = load_file(unchecked / "model.safetensors")
            result["memory_check_bitwise"] = all(__import__("torch").equal(a[k], c[k]) for k in a)
            result["memory_check_losses_equal"] = losses(whole) == losses(unchecked)
    else:
        result["log_tail"] = text[-3000:]
    return result


def guard_check(tmp: Path) -> dict:
    out = tmp / "guard"
    mode = "graphs" if OPTIONS["device"] == "cuda" else "off"
    code, text = run(sftune_cmd(out, "--max-steps", "8", "--compile", mode), env={"SFTUNE_FAULT_NAN_STEPS": "3"})
    return {"exit": code, "skip_logged": "step 3: non-finite loss or gradient norm, update skipped" in text,
            "log_tail": text[-1500:] if code != 0 else ""}


def oom_check(tmp: Path) -> dict:
    """A real out-of-memory step: GPT-2 small on micro-batches of 1,024 packed rows of 1,024 tokens (about a
    million tokens: far past any card) ends with sftune's one-line error, exit 2, and no traceback."""
    code, text = run(sftune_cmd(tmp / "oom", "--max-steps", "2", "--packing", "--max-length", "1024", "--batch-size",
                                "1024", "--eval-batch-size", "8", "--compile", "off", "--sample-prompts", ""))
    return {"exit": code, "said": "out of memory in step 1 (micro-batches of up to" in text,
            "traceback": "Traceback" in text, "log_tail": text[-1500:]}


def ranks_check(tmp: Path) -> dict:
    """torchrun with one process more than the node's GPUs: the first process without one says so (sftune's line,
    no traceback from it) and the launch fails within seconds."""
    import torch

    gpus = torch.cuda.device_count()
    cmd = sftune_cmd(tmp / "ranks", "--max-steps", "1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus + 1}"]
    started = time.perf_counter()
    code, text = run(launcher + cmd[1:])  # (`python -m sftune ...` becomes `torchrun ... -m sftune ...`)
    return {"exit": code, "seconds": round(time.perf_counter() - started, 1),
            "said": f"LOCAL_RANK {gpus}, and {gpus} GPU(s) are visible" in text,
            "traceback": f"[rank{gpus}]: Traceback" in text, "log_tail": text[-1500:]}


RUN_GROUPS = {  # (`--only-runs`; all of them by default, in this order: the compiled blocks first, as the newest
    # lever, then the rest in the order of the sessions that added them)
    "blocks": blocks_runs, "whole": whole_runs, "moe": moe_runs, "lora": lora_runs,
    "lora-tokens": lambda tmp: lora_runs(tmp, "--add-tokens", "<|x|>", "<|y|>"), "neftune": neftune_runs,
    "fp16": fp16_runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    p.add_argument("--quick", action="store_true", help="the unit checks only (1, 5 and 6)")
    p.add_argument("--runs-only", action="store_true", help="the whole runs only (2-4: after a --quick call)")
    p.add_argument("--only-runs", metavar="NAMES",
                   help=f"these groups of whole runs only, in this order, without the resume, guard, out-of-memory "
                        f"and ranks checks (comma-separated: {', '.join(RUN_GROUPS)})")
    p.add_argument("--loss-only", action="store_true", help="check 6 only (the fused loss: ways and chunk sizes)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the whole runs")
    p.add_argument("--model", default=str(GPT2), help="the runs' --model (config only: random init)")
    p.add_argument("--tokenizer", help="the runs' --tokenizer (default: the model's)")
    p.add_argument("--dataset", default=str(SST2), help="the runs' --dataset")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of each compared run")
    args = p.parse_args()
    groups = args.only_runs.split(",") if args.only_runs else list(RUN_GROUPS)
    if unknown := [g for g in groups if g not in RUN_GROUPS]:
        p.error(f"--only-runs: no group {', '.join(unknown)}; the groups: {', '.join(RUN_GROUPS)}")
    OPTIONS.update(model=args.model, tokenizer=args.tokenizer, dataset=args.dataset, device=args.device, steps=args.steps)
    import torch

    gpu = args.device == "cuda"
    report: dict = {"card": torch.cuda.get_device_name(0) if gpu else "cpu", "torch": torch.__version__, "graphs": []}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))

    unit = gpu and not args.runs_only
    if args.loss_only:
        report["chunk_math"] = chunk_math_check()
        save()
        print(f"chunk math: {json.dumps(report['chunk_math'])}")
        return
    for precision in ("fp32", "bf16") if unit else ():
        for dropout in (False, True):
            try:
                report["graphs"].append(graph_vs_eager(precision, dropout))
            except Exception as e:  # noqa: BLE001 (report and go on: the other checks still tell something)
                report["graphs"].append({"precision": precision, "dropout": dropout, "error": repr(e)[:2000]})
            save()
    if unit:
        print(f"graphs vs eager on {report['card']}:")
    for r in report["graphs"]:
        if "error" in r:
            print(f"  {r['precision']} dropout={r['dropout']}: ERROR {r['error'][:300]}")
            continue
        for mode in r["modes"]:
            kind = f"{'assign' if mode['assign'] else 'add'}{'+casts' if mode['casts'] else ''}"
            for b in mode["batches"]:
                print(f"  {r['precision']:<5} dropout={str(r['dropout']):<5} {kind:<12} "
                      f"batch {b['batch']} {b['shape']}: loss rel {b['loss_rel']:.2e}, grad rel max "
                      f"{b['grad_rel_max']:.2e}, bitwise {b['bitwise']}")
            print(f"  {r['precision']:<5} dropout={str(r['dropout']):<5} {kind:<12} replay of 32 x 48: "
                  f"{mode['replay_ms']:.3f} ms")
    if unit:  # after the graph checks, varlen last: a kernel fault (sticky in CUDA) leaves the others' figures
        for name, check in (("blocks", blocks_check), ("syncs", sync_check), ("chunk_math", chunk_math_check),
                            ("varlen", varlen_check)):
            try:
                report[name] = check()
            except Exception as e:  # noqa: BLE001
                report[name] = {"error": repr(e)[:2000]}
            save()
            print(f"{name.replace('_', ' ')}: {json.dumps(report[name])}")
    if args.quick:
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # the resume and guard checks first (issue 9 asks for them on the GPU), then the runs, each saved as it
        # ends: a call cut short by the session's device time keeps what finished
        checks = [("resume", "resume after SIGTERM (graphs, bf16, dropout)", resume_check),
                  ("guard", "non-finite guard under graphs", guard_check)]
        if args.only_runs:
            checks = []
        elif gpu:
            checks += [("oom", "out of memory at step 1", oom_check), ("ranks", "more processes than GPUs", ranks_check)]
        for key, what, check in checks:
            report[key] = check(tmp)
            save()
            print(f"  {what}: {report[key]}")
        report["runs"] = []
        # (generators: each run starts only when the one before is reported)
        for r in itertools.chain(*(RUN_GROUPS[name](tmp) for name in groups)):
            report["runs"].append(r)
            save()
            print(f"  run {r['precision']:<5} --compile {r['compile']:<9} exit {r['exit']} {r['seconds']:.0f}s "
                  f"last loss {r.get('last_loss', float('nan')):.4f} max diff vs eager {r.get('max_loss_diff', 0):.2e}"
                  + (f" first grad norm / eager's {r['first_grad_norm_ratio']:.4f}"
                     if "first_grad_norm_ratio" in r else "")
                  + (f" router loss diff {r['max_router_loss_diff']:.2e}" if "max_router_loss_diff" in r else "")
                  + "".join(f"\n    {line}" for line in r.get("step_log", []) if line.startswith("warning"))
                  + (f"\n{r['log_tail']}" if r.get("log_tail") else ""), flush=True)


if __name__ == "__main__":
    main()
