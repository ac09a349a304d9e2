"""The fast paths of the training step (`--compile`): static batch shapes, torch.compile, CUDA graphs.

On a CPU: padding a batch to a static shape changes no loss and no gradient; the whole step (model, fused loss,
packed masks) traces as one graph, so it holds no host sync (what a CUDA graph capture needs); a compiled run
equals the eager run; the CLI chooses, logs and refuses as documented. The CUDA graphs themselves need a GPU:
`benchmarks/gpu_check.py` checks them there.
"""

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from conftest import FIXTURES, QUICKSTART_DATA, ROOT, SST2_DIR, needs_sst2, read_jsonl, run_main
from sftune.batching import EAGER, IGNORE_INDEX, Padding, collate, collate_packed, count_targets
from sftune.data import Examples
from sftune.loss import CausalLMLoss

VOCAB = 512
STATIC = Padding(multiple=16, rows=6, max_width=64, static=True)


def tiny(family: str, dtype=torch.float32):
    torch.manual_seed(0)
    if family == "gpt2":
        config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=VOCAB, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(config).to(dtype)
    config = AutoConfig.from_pretrained(FIXTURES / family)
    config.vocab_size, config.num_hidden_layers, config.bos_token_id, config.eos_token_id = VOCAB, 1, 0, 0
    return AutoModelForCausalLM.from_config(config).to(dtype)


def examples() -> Examples:
    """Rows of different lengths, some with an untrained prompt (prompt/completion masks)."""
    rng = np.random.default_rng(0)
    lengths = [5, 9, 13, 7, 11]
    ids = [rng.integers(1, VOCAB, n).tolist() for n in lengths]
    supervised = [[i >= n // 3 for i in range(n)] if k % 2 else [True] * n for k, n in enumerate(lengths)]
    return Examples.from_lists(ids, supervised)


def batch_of(padding: Padding, packed: bool) -> dict:
    ex = examples()
    if packed:
        return collate_packed(ex, [np.array([0, 1, 2]), np.array([3, 4])], 0, padding)
    return collate(ex, [0, 1, 2, 3, 4], 0, padding)


def loss_and_grads(loss_model, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss_model.zero_grad(set_to_none=True)
    loss = loss_model(batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in loss_model.parameters() if p.requires_grad]


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_static_shapes_change_no_loss_and_no_gradient(packed, fused):
    """Widths rounded up, rows added, a target slot at every position: the same loss and gradients as the batch
    padded as little as possible (fp64, to rounding: only the order of the sums differs)."""
    loss_model = CausalLMLoss(tiny("gpt2", torch.float64), fused=fused)
    eager, static = batch_of(EAGER, packed), batch_of(STATIC, packed)
    assert static["input_ids"].shape == (6, 32 if packed else 16)  # 6 rows; 33 or 13 tokens rounded up
    assert len(static["targets"]) == static["input_ids"].numel()  # a fixed target count for the shape
    assert count_targets(static) == count_targets(eager) == int((eager["targets"] != IGNORE_INDEX).sum())
    loss, grads = loss_and_grads(loss_model, eager)
    static_loss, static_grads = loss_and_grads(loss_model, static)
    torch.testing.assert_close(static_loss, loss, rtol=1e-12, atol=0)
    for got, want in zip(static_grads, grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def test_rounding_stops_at_the_context_and_never_cuts():
    assert Padding(multiple=16, max_width=40).width(33) == 40  # rounded up to 48, capped at the context
    assert Padding(multiple=16, max_width=40).width(7) == 16
    assert Padding(multiple=64, max_width=40).width(40) == 40
    assert Padding().width(13) == 13


@pytest.mark.parametrize("family,packed,lora", [("gpt2", False, False), ("tiny-llama", True, False),
                                                ("tiny-llama", False, True)])
def test_the_training_step_is_one_graph_without_host_syncs(family, packed, lora):
    """torch.compile(fullgraph=True) fails on any graph break, and a host sync in the forward (an .item(), a
    data-dependent branch) is one. transformers skips its host-side checks both under dynamo and during a CUDA
    graph capture (`is_tracing`), so this is the nearest a CPU comes to what a capture meets. The traced step
    computes what the eager one does. Also for LoRA (peft's layers; two token rows trained as peft's trainable
    tokens, whose index sftune keeps on the device: `lora.capture_safe_token_rows`), without dropout."""
    model = tiny(family)
    if lora:
        from sftune.config import resolve_config
        from sftune.lora import add_lora

        add_lora(model, resolve_config({"lora_r": 4, "add_tokens": ["<a>", "<b>"]}), [5, 7], quiet=True)
    loss_model = CausalLMLoss(model)
    batch = batch_of(STATIC, packed)
    loss, grads = loss_and_grads(loss_model, batch)
    loss_model.cache_cast = False  # (as under graphs and compile)
    loss_model.correct_counter()
    traced = torch.compile(loss_model, backend="aot_eager", fullgraph=True, dynamic=False)
    traced_loss, traced_grads = loss_and_grads(traced, batch)
    torch.testing.assert_close(traced_loss, loss, rtol=1e-6, atol=0)
    for got, want in zip(traced_grads, grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_compile_graphs_without_a_gpu_is_refused_before_anything_is_written(capsys, tmp_path, small_model_dir):
    out = tmp_path / "run"
    code, _, err = run_main(capsys, "train", "--no-run-report", "--model", str(small_model_dir), "--dataset", str(QUICKSTART_DATA),
                            "--max-steps", "2", "--device", "cpu", "--compile", "graphs", "--output-dir", str(out))
    assert code == 2
    assert "--compile graphs" in err and "need a CUDA GPU" in err and "--compile off or torch" in err
    assert "Traceback" not in err and not out.exists()
    code, _, err = run_main(capsys, "train", "--no-run-report", "--model", str(small_model_dir), "--dataset", str(QUICKSTART_DATA),
                            "--pad-to-multiple-of", "0", "--output-dir", str(out))
    assert code == 2 and "pad_to_multiple_of = 0" in err and not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--lora-r", "4", "--lora-dropout", "0.1"], ["mixtral"]],
                         ids=["full", "lora", "moe"])
def test_a_compiled_run_trains_what_the_eager_run_trains(extra, capsys, tmp_path, small_model_dir):
    """`--compile torch` on a CPU, fp32: per-step losses and final weights within 1e-5 of `--compile off`, through
    the whole command (static shapes, the compiled step, eager evaluation). The backend is aot_eager: dynamo's
    graph and AOTAutograd's functionalised forward and backward, which is where sftune's own code (the fused loss
    with its in-place softmax) meets the compiler. inductor's code generation for a CPU would add 20 s of C++
    builds to the suite on 2 cores; `benchmarks/gpu_check.py` compares inductor with eager (also `--device cpu`).
    LoRA (peft's layers, dropout on: the same masks drawn in both runs) goes through the same compiled step. So
    does a Mixtral with its routers' load-balancing loss, whose logged values match too although the compiled
    step's batches are padded to 64 tokens and the eager ones to their longest row: the padding is left out of the
    routers' statistics."""
    from safetensors.torch import load_file

    model = small_model_dir
    if extra == ["mixtral"]:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from test_families import FIXTURES

        config, extra = AutoConfig.from_pretrained(FIXTURES / "tiny-mixtral"), []
        tokenizer = AutoTokenizer.from_pretrained(small_model_dir)
        config.vocab_size, config.bos_token_id = len(tokenizer), tokenizer.eos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        torch.manual_seed(0)
        model = tmp_path / "mixtral"
        AutoModelForCausalLM.from_config(config).save_pretrained(model)
        tokenizer.save_pretrained(model)
    runs = {}
    weights = "adapter_model.safetensors" if extra else "model.safetensors"
    # (LoRA's dropout draws its masks over the padded shape: the same padding in both runs; the MoE's eager batches
    # are padded to their longest row)
    padded = ["--pad-to-multiple-of", "64"]
    for name, mode in (("off", ["--compile", "off", *(padded if model == small_model_dir else [])]),
                       ("torch", ["--compile", "torch", "--compile-backend", "aot_eager", *padded])):
        out = tmp_path / name
        code, _, err = run_main(capsys, "train", "--no-run-report", "--model", str(model), "--dataset", str(QUICKSTART_DATA),
                                "--max-steps", "3", "--batch-size", "8", "--log-every", "1", "--precision", "fp32",
                                "--lr", "1e-3", "--report-to", "none", "--output-dir",
                                str(out), *mode, *extra)
        assert code == 0, err
        runs[name] = ([(r["loss"], r.get("router_loss", 0.0)) for r in read_jsonl(out / "metrics.jsonl")
                       if r["type"] == "train"], load_file(out / weights))
    assert "step: torch (--compile torch); batches padded to multiples of 64 tokens and 8 rows" in err
    assert "torch.compile (aot_eager)" in err and "(add --compile torch)" not in err
    (eager_losses, eager), (losses, compiled) = runs["off"], runs["torch"]
    assert len(losses) == 3 and all((router > 1.9) == (model != small_model_dir) for _, router in losses)
    np.testing.assert_allclose(losses, eager_losses, rtol=1e-5)  # (token loss, router loss) of each step
    for key, want in eager.items():
        torch.testing.assert_close(compiled[key], want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_run_resumes_under_another_compile_mode(capsys, tmp_path, small_model_dir):
    """--compile (and the attention kernel) may change on resume, as the batch split may: the same steps, other
    kernels (a compile that fails on the resumed machine can be left out). Eager to step 2, then compiled to 3:
    within 1e-5 of the eager run's weights."""
    from safetensors.torch import load_file

    common = ["train", "--no-run-report", "--model", str(small_model_dir), "--dataset", str(QUICKSTART_DATA),
              "--max-steps", "3", "--batch-size", "8", "--precision", "fp32", "--lr", "1e-3", "--report-to", "none",
              "--pad-to-multiple-of", "64", "--save-every", "1", "--sample-prompts", ""]
    eager, resumed = tmp_path / "eager", tmp_path / "resumed"
    code, _, err = run_main(capsys, *common, "--output-dir", str(eager))
    assert code == 0, err
    code, _, err = run_main(capsys, *common, "--output-dir", str(resumed), "--resume",
                            str(eager / "checkpoints" / "step-2"), "--compile", "torch", "--compile-backend",
                            "aot_eager", "--attention", "eager")
    assert code == 0 and "resumed from" in err and "torch.compile (aot_eager)" in err, err
    want, got = load_file(eager / "model.safetensors"), load_file(resumed / "model.safetensors")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)


def test_compile_options_are_checked(capsys, tmp_path, small_model_dir):
    out = tmp_path / "run"
    common = ("train", "--no-run-report", "--model", str(small_model_dir), "--dataset", str(QUICKSTART_DATA), "--output-dir", str(out))
    code, _, err = run_main(capsys, *common, "--compile", "torch", "--compile-backend", "turbo")
    assert code == 2 and "--compile-backend 'turbo' is not a torch.compile backend" in err and "inductor" in err
    code, _, err = run_main(capsys, *common, "--compile", "torch", "--compile-mode", "fastest")
    assert code == 2 and "compile_mode = 'fastest'" in err and "max-autotune" in err
    assert "Traceback" not in err and not out.exists()
    # given, but the step is not compiled (a CPU's auto is eager): said, not silently dropped
    code, _, err = run_main(capsys, *common, "--max-steps", "1", "--sample-prompts", "", "--compile-mode",
                            "max-autotune", "--compile-backend", "aot_eager")
    assert code == 0, err
    assert ("warning: --compile-mode max-autotune and --compile-backend aot_eager apply to --compile torch only; this "
            "run's step is eager") in err and "(add --compile torch)" in err


def test_prefetch_keeps_order_raises_in_place_and_stops_when_closed():
    import threading

    from sftune.batching import prefetch

    assert list(prefetch(iter(range(50)), depth=2, prepare=lambda x: x * 10)) == [x * 10 for x in range(50)]

    def failing():
        yield 1
        yield 2
        raise ValueError("bad row")

    got = []
    with pytest.raises(ValueError, match="bad row"):
        for item in prefetch(failing()):
            got.append(item)
    assert got == [1, 2]  # the items before the error arrive first
    endless = prefetch(iter(range(10**9)))
    assert next(endless) == 0
    endless.close()
    deadline = __import__("time").monotonic() + 5
    while any(t.name == "sftune-prefetch" for t in threading.enumerate()) and __import__("time").monotonic() < deadline:
        __import__("time").sleep(0.05)
    assert not any(t.name == "sftune-prefetch" for t in threading.enumerate())


def test_steps_made_ahead_in_a_thread_are_the_steps_of_the_loop(small_model_dir):
    """The loop moves `state` (epoch, step in epoch) while a prefetching thread makes the next steps, across
    epoch ends: the steps are those of a plain iteration, in order (the source reads the position once, when the
    iteration starts)."""
    from sftune.batching import prefetch
    from sftune.steps import InMemorySteps
    from sftune.checkpoint import TrainState
    from sftune.config import resolve_config
    from sftune.dist import Dist
    from sftune.modeling import load_tokenizer
    from conftest import prepare

    tokenizer = load_tokenizer(str(small_model_dir))
    data = prepare(QUICKSTART_DATA, tokenizer, 64)
    cfg = resolve_config({"model": str(small_model_dir), "dataset": str(QUICKSTART_DATA), "batch_size": 64,
                          "epochs": 3})
    source = InMemorySteps(cfg, data, 64, tokenizer.pad_token_id, Dist())
    source.padding = STATIC  # (as `_build` sets it for graphs and compile)
    direct = [(s.epoch, s.micro_batches[0]["input_ids"]) for s in
              __import__("itertools").islice(source.remaining(TrainState(run_id="x")), source.total_steps)]
    state = TrainState(run_id="x")
    ahead = []
    for step in prefetch(source.remaining(state), depth=3):
        ahead.append((step.epoch, step.micro_batches[0]["input_ids"]))
        state.step_in_epoch += 1  # what the loop does, while the thread is already steps ahead
        if step.last_in_epoch:
            state.epoch, state.step_in_epoch = step.epoch + 1, 0
        if len(ahead) == source.total_steps:
            break
    assert [e for e, _ in ahead] == [e for e, _ in direct] and len({e for e, _ in direct}) == 3
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(ahead, direct))


def test_the_fused_loss_softmax_is_compiled_where_it_pays():
    """Under CUDA graphs the fused loss's per-chunk softmax is compiled (`fused_loss.ChunkMath`) when asked for with
    --compile graphs, and under auto only for runs long enough to repay the compile (CHUNK_MATH_MIN_SLOTS)."""
    from dataclasses import replace
    from types import SimpleNamespace

    from sftune.step_mode import CHUNK_MATH_MIN_SLOTS, wants_chunk_math
    from sftune.config import resolve_config

    cfg = resolve_config({})  # batch 32, --compile auto
    seed_job = SimpleNamespace(total_steps=1544, train=SimpleNamespace(lengths=np.full(100, 13)))
    assert 1544 * 32 * 16 < CHUNK_MATH_MIN_SLOTS and not wants_chunk_math(cfg, "graphs", seed_job, 1024)
    assert wants_chunk_math(replace(cfg, compile="graphs"), "graphs", seed_job, 1024)
    packed, long = replace(cfg, packing=True), SimpleNamespace(total_steps=1000, train=None)
    assert 1000 * 32 * 1024 >= CHUNK_MATH_MIN_SLOTS and wants_chunk_math(packed, "graphs", long, 1024)
    assert not wants_chunk_math(packed, "torch", long, 1024)  # (the whole step is compiled there)
    assert not wants_chunk_math(replace(packed, compile="off"), "off", long, 1024)


# --- the matrix products' weights cast in one pass (`casts.py`, used by the CUDA graphs) -------------------------


@pytest.mark.parametrize("family", ["gpt2", "tiny-llama", "tiny-qwen2", "tiny-mixtral"])
def test_weights_cast_in_one_pass_give_autocasts_loss_and_gradients_bitwise(family):
    """bf16 autocast on a CPU: the loss and every gradient (dropout on, for GPT-2) are the ones autocast's own
    casts give, bit for bit; the tensors cast are the `Linear`/`Conv1D` weights and biases, not the output head nor
    GPT-2's tied embedding. A model with LoRA layers gets none (peft would sum its inputs' gradients in bf16), nor
    does a layer registered twice."""
    from peft import LoraConfig, get_peft_model

    from sftune.casts import MatmulCasts, matmul_parameters
    from sftune.runtime import autocast

    model = tiny(family)
    if family == "gpt2":
        model.config.resid_pdrop = model.config.attn_pdrop = 0.1
        model = GPT2LMHeadModel(model.config)
    loss_model = CausalLMLoss(model).train()
    casts = MatmulCasts.for_model(loss_model, torch.bfloat16)
    linear = {f"model.{name}.{kind}" for name, m in model.named_modules() if m is not model.get_output_embeddings()
              and type(m).__name__ in ("Linear", "Conv1D") for kind in ("weight", "bias") if getattr(m, kind, None)
              is not None}
    assert set(casts.names) == linear and casts.names
    batch = collate(examples(), range(5), 0)
    layer = loss_model.get_submodule(casts.names[0].rsplit(".", 1)[0])
    seen = []  # the dtype of the weight the first cast layer reads: the copy's (bf16), not the parameter (fp32)
    layer.register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
    got = []
    for cast in (False, True):
        loss_model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        with autocast(torch.device("cpu"), "bf16"):
            loss = casts.call(loss_model, batch) if cast else loss_model(batch)
        loss.backward()
        got.append((loss.detach(), {n: p.grad for n, p in loss_model.named_parameters() if p.grad is not None}))
    assert seen == [torch.float32, torch.bfloat16]
    (plain, plain_grads), (cast, cast_grads) = got
    assert torch.equal(plain, cast) and plain_grads.keys() == cast_grads.keys()
    assert all(torch.equal(plain_grads[n], cast_grads[n]) for n in plain_grads)
    get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", fan_in_fan_out=family == "gpt2"))
    assert MatmulCasts.for_model(CausalLMLoss(model), torch.bfloat16) is None
    shared = torch.nn.Module()  # a layer registered twice (shared by two positions): its gradients would be summed
    shared.a = shared.b = torch.nn.Linear(4, 4)  # in bf16 through one copy, so it keeps autocast's casts
    shared.c = torch.nn.Linear(4, 4)
    assert sorted(matmul_parameters(shared, None)) == ["c.bias", "c.weight"]


@pytest.mark.parametrize("family", ["gpt2", "tiny-llama"])
def test_compiled_blocks_share_one_compile_per_shape_and_change_nothing(family):
    """`--compile-blocks`: every transformer block under torch.compile (aot_eager here: dynamo's graph and
    AOTAutograd's functional forward and backward; inductor's kernels are `gpu_check.py`'s to compare). fp32 loss
    and gradients bitwise those of the blocks as they are; one compile per batch shape serves every block (the
    weights are inputs); evaluation (no gradients) runs the blocks as they are, compiling nothing; the state dict's
    names do not change (checkpoints and saved models read as before)."""
    import torch._dynamo

    from sftune.errors import SftuneError
    from sftune.blocks import compile_blocks

    def two_layers():
        model = tiny(family)
        config = model.config
        config.num_hidden_layers = config.n_layer = 2  # (one of the two is the family's own name)
        torch.manual_seed(0)
        return type(model)(config)

    plain, compiled = two_layers(), two_layers()
    compiled.load_state_dict(plain.state_dict())
    names = list(compiled.state_dict())
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    assert compile_blocks(compiled, "aot_eager", STATIC.shapes) == 2
    for padding in (STATIC, Padding(multiple=32, rows=6, max_width=64, static=True), STATIC):  # widths 16, 32, 16
        batch = batch_of(padding, packed=False)
        (want, want_grads), (got, got_grads) = (loss_and_grads(CausalLMLoss(m), batch) for m in (plain, compiled))
        assert torch.equal(got, want) and all(torch.equal(g, w) for g, w in zip(got_grads, want_grads))
    assert counters["stats"]["unique_graphs"] == 2  # two widths, two blocks: two compiles
    compiled.eval()
    with torch.no_grad():
        compiled(input_ids=torch.ones(3, 7, dtype=torch.long))
    assert counters["stats"]["unique_graphs"] == 2 and list(compiled.state_dict()) == names
    with pytest.raises(SftuneError, match="cannot find the transformer blocks of Linear"):
        compile_blocks(torch.nn.Linear(2, 2), "aot_eager", 4)


def test_an_eager_step_beside_graphs_reuses_what_a_capture_compiled():
    """A step whose batch shape has no CUDA graph (its capture failed: `StepGraphs.run` gives None) runs eagerly
    with autocast's cache off, as the capture's warm-up ran it (`graphs._step`): the compiled blocks compiled there
    serve it. dynamo guards on that setting, so with the cache on every block was compiled again for each such
    shape (inductor: seconds to a minute each on a GPU; seen on the H100, try 125). The casts are the same either
    way: loss and gradients equal those of a step with the cache."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    from sftune.blocks import compile_blocks
    from sftune.dist import Dist
    from sftune.runtime import autocast
    from sftune.stepping import forward_backward

    class CapturesFailed:  # what `StepGraphs.run` gives for a shape it could not capture (graphs need a CUDA GPU)
        def run(self, batch, scale, first=True):
            return None

    plain, blocks = CausalLMLoss(tiny("gpt2")), CausalLMLoss(tiny("gpt2"))
    counter = CompileCounter()
    torch._dynamo.reset()
    compile_blocks(blocks.model, counter, STATIC.shapes)
    batch = batch_of(STATIC, packed=False)
    with autocast(torch.device("cpu"), "bf16", cache=False):  # the capture's warm-up
        blocks(batch).backward()
    compiled = counter.frame_count
    assert compiled >= 1
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    results = []
    for loss_model, graphs in ((blocks, CapturesFailed()), (plain, None)):
        loss_model.zero_grad(set_to_none=True)
        loss, _ = forward_backward(loss_model, [batch], Dist(device=torch.device("cpu")), "bf16", scaler, graphs,
                                   loss_model.device_keys)
        results.append((loss, [p.grad for p in loss_model.parameters()]))
    assert counter.frame_count == compiled  # no compile for the eager step
    (got, got_grads), (want, want_grads) = results
    assert torch.equal(got, want) and all(torch.equal(g, w) for g, w in zip(got_grads, want_grads))


def test_a_step_that_compiled_is_left_out_of_the_logged_pace():
    """A step that captured or compiled a new shape: its seconds and its tokens both left out of the log line's
    tok/s and ms/step (not the tokens alone: try 130's 100,000+ tok/s of a 2-layer model on 2 cores); a window of
    such steps alone gives their own pace, their one-off time included."""
    import time

    from sftune.dist import Dist
    from sftune.progress import LogWindow

    loss_model, dist = CausalLMLoss(tiny("gpt2")), Dist(device=torch.device("cpu"))
    window = LogWindow({}, dist, loss_model)
    window.start = time.perf_counter() - 2.0  # the window's two seconds: 1.5 s of a compile, then a step of 0.5 s
    window.add(torch.tensor(20.0), 10, 100, one_off=1.5)
    window.add(torch.tensor(10.0), 10, 300)
    figures = window.close(dist)
    assert figures["loss"] == 1.5  # (the loss is every step's)
    assert figures["tokens_per_s"] == pytest.approx(300 / 0.5, rel=0.05)
    assert figures["ms_per_step"] == pytest.approx(500, rel=0.05)
    window.start = time.perf_counter() - 2.0
    window.add(torch.tensor(20.0), 10, 100, one_off=1.5)
    figures = window.close(dist)
    assert figures["tokens_per_s"] == pytest.approx(100 / 2.0, rel=0.05)
    assert figures["ms_per_step"] == pytest.approx(2000, rel=0.05)


def test_compiled_blocks_through_the_command(capsys, tmp_path, small_model_dir):
    """The CLI with --compile-blocks (aot_eager on a CPU; dropout on: the compiled blocks draw the same masks, as
    both runs pad alike): the losses and saved weights of the same run without it, to 1e-6 (fp32); the log says
    what was compiled. With
    --compile torch (the whole step compiled already) it is a config error, before anything is written."""
    from safetensors.torch import load_file

    common = ["train", "--no-run-report", "--model", str(small_model_dir), "--dataset", str(QUICKSTART_DATA),
              "--max-steps", "3", "--batch-size", "8", "--log-every", "1", "--precision", "fp32", "--lr", "1e-3",
              "--report-to", "none", "--sample-prompts", "", "--pad-to-multiple-of", "16",
              "--model-config-overrides", "resid_pdrop=0.1,attn_pdrop=0.1"]
    runs = {}
    for name, extra in (("plain", []), ("blocks", ["--compile-blocks", "--compile-backend", "aot_eager"])):
        code, _, err = run_main(capsys, *common, "--output-dir", str(tmp_path / name), *extra)
        assert code == 0, err
        steps = [r for r in read_jsonl(tmp_path / name / "metrics.jsonl") if r["type"] == "train"]
        runs[name] = ([r["loss"] for r in steps], load_file(tmp_path / name / "model.safetensors"))
        # (the seconds of steps that compiled a new shape: kept out of the pace, as a graph's capture is; with
        # their tokens, counted for a benchmark's window to leave out too)
        assert ("compile_s" in steps[-1]) == (name == "blocks") and steps[-1].get("compile_s", 1) > 0
        if name == "blocks":
            assert steps[0]["compile_steps"] == 1 and steps[0]["compile_tokens"] == steps[0]["tokens"]
            for before, after in zip(steps, steps[1:]):
                compiled = after["compile_steps"] - before["compile_steps"]
                assert after["compile_tokens"] - before["compile_tokens"] == compiled * (after["tokens"] - before["tokens"])
    assert "transformer blocks compiled (aot_eager: one compile per batch shape" in err
    assert "batches padded to multiples of 16 tokens and 8 rows" in err and "warning" not in err
    np.testing.assert_allclose(runs["blocks"][0], runs["plain"][0], rtol=1e-6)
    for key, want in runs["plain"][1].items():
        torch.testing.assert_close(runs["blocks"][1][key], want, rtol=1e-6, atol=1e-6)
    code, _, err = run_main(capsys, *common, "--output-dir", str(tmp_path / "refused"), "--compile", "torch",
                            "--compile-blocks")
    assert code == 2 and "compile_blocks = True: with --compile torch the whole step is compiled already" in err
    code, _, err = run_main(capsys, *common, "--output-dir", str(tmp_path / "refused"), "--compile-blocks",
                            "--compile-backend", "turbo")
    assert code == 2 and "--compile-backend 'turbo' is not a torch.compile backend" in err
    (tmp_path / "sometimes.yaml").write_text("compile_blocks: sometimes\n")
    code, _, err = run_main(capsys, *common, "--output-dir", str(tmp_path / "refused"), "--config",
                            str(tmp_path / "sometimes.yaml"))
    assert code == 2 and "`compile_blocks` must be true or false or 'auto', got 'sometimes'" in err
    assert "Traceback" not in err and not (tmp_path / "refused").exists()


def test_a_compiler_that_cannot_run_is_said_with_the_way_on(capsys, tmp_path, small_model_dir, monkeypatch):
    """inductor with no working C++ compiler (a CPU; on a GPU, no Triton) fails at the first step of a new shape:
    sftune says so in one line with what to change, exit 2, no traceback (torch's own is pages long); the step is
    undone and the steps before it kept, as for a step that runs out of memory. (--compile-blocks here; --compile
    torch goes through the same handler, its message naming --compile graphs or off instead: tried by hand.)"""
    import torch._inductor.config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    out = tmp_path / "run"
    # a compiler that always fails; no kernels from an earlier test's cache
    with torch._inductor.config.patch({"cpp.cxx": (None, "/bin/false"), "fx_graph_cache": False}):
        code, _, err = run_main(capsys, "train", "--no-run-report", "--model", str(small_model_dir), "--dataset",
                                str(QUICKSTART_DATA), "--max-steps", "2", "--batch-size", "8", "--report-to", "none",
                                "--sample-prompts", "", "--output-dir", str(out), "--compile-blocks")
    assert code == 2 and "Traceback" not in err, err
    assert "error: torch.compile (inductor) failed in step 1: InvalidCxxCompiler: No working C++ compiler" in err
    assert "nothing was trained yet, so nothing was saved" in err
    assert "Run again with --no-compile-blocks and --resume auto" in err


@needs_sst2
def test_auto_compiles_the_blocks_only_where_a_run_repays_them(sst2_prepared, gpt2_tokenizer, monkeypatch):
    """--compile-blocks auto (the default; try 146, H200: 11-12% off a step of GPT-2 small, for 4-8 s of inductor a
    batch shape): the seed job on SST-2 (1,544 steps of 32 short rows in 5 shapes) leaves the blocks as they are;
    a packed run of 733 steps of 32 x 1,024 (24M slots in one shape) compiles them, as does a long enough
    right-padded one. Never on a CPU, in eager steps, with LoRA, for a model type not measured so, with another
    backend or without Triton; --compile-blocks and --no-compile-blocks as given. (The decision alone: this CPU
    cannot train on CUDA, so `has_triton` is set as a GPU machine's would be.)"""
    from dataclasses import replace

    import torch.utils._triton
    from transformers import AutoConfig

    from sftune.config import resolve_config
    from sftune.dist import Dist
    from sftune.step_mode import BLOCKS_MIN_SLOTS, resolve_blocks
    from sftune.steps import InMemorySteps

    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    gpt2, llama = (AutoConfig.from_pretrained(p) for p in (ROOT / "examples" / "quickstart" / "model",
                                                          FIXTURES / "tiny-llama"))
    data = sst2_prepared
    seed = resolve_config({"model": "gpt2", "dataset": str(SST2_DIR)})
    assert seed.compile_blocks == "auto"
    steps = InMemorySteps(seed, data, 1024, gpt2_tokenizer.eos_token_id, Dist())
    assert steps.total_steps == 1_544 and resolve_blocks(seed, "graphs", gpt2, gpu, steps, 1024) == (False, None)
    packed = replace(seed, packing=True, max_steps=-(-BLOCKS_MIN_SLOTS // (32 * 1024)))
    long = InMemorySteps(packed, data, 1024, gpt2_tokenizer.eos_token_id, Dist())
    on, said = resolve_blocks(packed, "graphs", gpt2, gpu, long, 1024)
    assert on and "auto: 24M padded slots in 1 batch shape repay the blocks' compile" in said
    assert resolve_blocks(packed, "graphs", gpt2, gpu, InMemorySteps(
        replace(packed, max_steps=packed.max_steps - 1), data, 1024, 0, Dist()), 1024) == (False, None)
    padded = replace(seed, max_steps=240_000)  # (5 shapes, a mean width of 16: 5 x 24M slots take 234,375 steps)
    assert resolve_blocks(padded, "graphs", gpt2, gpu, InMemorySteps(padded, data, 1024, 0, Dist()), 1024)[0]
    for cfg, mode, model, device in ((packed, "graphs", gpt2, cpu), (packed, "off", gpt2, gpu),
                                     (replace(packed, lora_r=8), "graphs", gpt2, gpu),
                                     (packed, "graphs", llama, gpu),
                                     (replace(packed, compile_backend="aot_eager"), "graphs", gpt2, gpu)):
        assert resolve_blocks(cfg, mode, model, device, long, 1024) == (False, None)
    assert resolve_blocks(replace(seed, compile_blocks=True), "off", llama, cpu, steps, 1024) == (True, None)
    assert resolve_blocks(replace(packed, compile_blocks=False), "graphs", gpt2, gpu, long, 1024) == (False, None)
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    assert resolve_blocks(packed, "graphs", gpt2, gpu, long, 1024) == (False, None)
    # streamed rows of lengths unknown beforehand: every width a shape (64 of them here), not one
    from types import SimpleNamespace

    from sftune.step_mode import planned_slots

    assert planned_slots(seed, SimpleNamespace(total_steps=1_000), 1024) == (1_000 * 32 * 1024, 64)
