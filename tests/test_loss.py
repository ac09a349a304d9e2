"""Tier 1: the loss module. The fused output-projection loss equals the plain one (loss and every gradient),
in fp32 and under bf16 autocast; a frozen head gets no gradient; the head's cast is shared within a step."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_gpt2
from sftune.batching import collate, collate_packed, best_fit_decreasing
from sftune.data import Examples
from sftune.fused_loss import CE_CHUNK_ROWS, ChunkMath, LinearCrossEntropySum, chunk_math_functional
from sftune.loss import CausalLMLoss, sum_token_loss

EOS = 50256


def _batch(packed=False, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 40, 12)
    supervised = [(rng.random(n) > 0.3).tolist() for n in lengths]
    ex = Examples.from_lists([rng.integers(0, 50_000, n).tolist() for n in lengths], supervised)
    if packed:
        return collate_packed(ex, best_fit_decreasing(ex.lengths, 64), EOS)
    return collate(ex, list(range(len(ex))), EOS)


def _loss_and_grads(model, batch, fused, precision):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = CausalLMLoss(model, fused)(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_fused_equals_plain_in_fp32(packed):
    model = make_tiny_gpt2()
    batch = _batch(packed)
    plain, g_plain = _loss_and_grads(model, batch, False, "fp32")
    fused, g_fused = _loss_and_grads(model, batch, True, "fp32")
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-4)
    for name in g_plain:
        torch.testing.assert_close(g_fused[name], g_plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_loss_is_the_reference_sum_over_targets():
    model = make_tiny_gpt2()
    batch = _batch()
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        reference = sum_token_loss(model(**inputs).logits, batch["labels"])
        for fused in (False, True):
            torch.testing.assert_close(CausalLMLoss(model, fused)(batch), reference, rtol=1e-5, atol=1e-4)
    assert len(batch["targets"]) == int((batch["labels"][:, 1:] != -100).sum())


def test_no_padding_check_runs_in_the_loss_forward(monkeypatch):
    """GPT-2's forward checks for padding without a mask when its config names a pad token (any model sftune saved):
    a read back from the GPU at each micro-batch. The loss module passes no mask on purpose and turns the check off
    for its model; the model itself still computes the same loss."""
    from transformers import PreTrainedModel

    calls = []
    monkeypatch.setattr(PreTrainedModel, "warn_if_padding_and_no_attention_mask", lambda *args: calls.append(args))
    model = make_tiny_gpt2()
    model.config.pad_token_id = EOS
    batch = _batch()
    model(input_ids=batch["input_ids"])  # (the check runs in GPT-2's forward: this test can see it)
    assert len(calls) == 1
    with torch.no_grad():
        before = CausalLMLoss(make_tiny_gpt2(), fused=False)(batch)  # (the same seeded weights)
        assert torch.equal(CausalLMLoss(model, fused=False)(batch), before)
    assert len(calls) == 1


def test_fused_equals_plain_under_bf16_autocast():
    """bf16 rounds differently on the two paths (the plain one rounds the logits, the fused one keeps
    them in fp32): the loss agrees to about 1e-3 relative, gradients to a few percent of their scale."""
    model = make_tiny_gpt2()
    batch = _batch()
    plain, g_plain = _loss_and_grads(model, batch, False, "bf16")
    fused, g_fused = _loss_and_grads(model, batch, True, "bf16")
    torch.testing.assert_close(fused, plain, rtol=2e-3, atol=0)
    for name in g_plain:
        a, b = g_fused[name], g_plain[name]
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-6, name
    # and bf16 is close to fp32 (it is the same loss, in lower precision)
    exact, _ = _loss_and_grads(model, batch, True, "fp32")
    torch.testing.assert_close(fused, exact, rtol=1e-2, atol=0)


@pytest.mark.parametrize("fused", [False, True])
def test_a_frozen_head_gets_no_gradient(fused):
    model = make_tiny_gpt2()
    head = model.get_output_embeddings().weight  # tied to the input embeddings in GPT-2
    head.requires_grad_(False)
    batch = _batch()
    CausalLMLoss(model, fused)(batch).backward()
    assert head.grad is None
    assert model.transformer.h[0].attn.c_attn.weight.grad is not None


def test_the_heads_cast_is_made_once_per_update():
    """One bf16 cast of the head per optimizer step, renewed after every step, also by fused AdamW (whose
    in-place update does not bump the weight's version counter)."""
    model = make_tiny_gpt2()
    loss = CausalLMLoss(model)
    w = model.get_output_embeddings().weight
    first = loss.cast_weight(w, torch.bfloat16)
    assert loss.cast_weight(w, torch.bfloat16) is first  # the next micro-batch of the step reuses it
    with torch.no_grad():
        w.add_(1.0)  # an in-place change autograd sees
    second = loss.cast_weight(w, torch.bfloat16)
    assert second is not first
    torch.testing.assert_close(second[: len(w)], w.detach().to(torch.bfloat16))  # (then zero rows: aligned_cast)

    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    optimizer.register_step_post_hook(loss.forget_cast)  # as build.py does
    version = w._version
    CausalLMLoss(model)(_batch()).backward()
    optimizer.step()
    assert w._version == version  # fused AdamW: the version counter did not move ...
    torch.testing.assert_close(loss.cast_weight(w, torch.bfloat16)[: len(w)], w.detach().to(torch.bfloat16))  # recast


def test_token_accuracy_counts_the_argmax_hits_of_training_forwards():
    """The log's token accuracy: targets the argmax predicts, counted inside the loss (fused or not), training only."""
    model = make_tiny_gpt2()
    batch = _batch()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    predicted = logits.reshape(-1, logits.shape[-1]).argmax(-1)[batch["target_positions"]]
    hit = torch.arange(len(predicted)) % 3 == 0
    batch = {**batch, "targets": torch.where(hit, predicted, (predicted + 1) % 50257)}
    for fused in (True, False):
        loss_model = CausalLMLoss(model, fused).train()
        loss_model(batch)
        loss_model(batch)
        assert loss_model.take_correct() == 2 * int(hit.sum()) and loss_model.take_correct() == 0
        loss_model.eval()
        loss_model(batch)
        assert loss_model.take_correct() == 0  # evaluation forwards are not counted


def test_flops_per_token_for_mfu():
    """GPT-2 small: 6 x 124.4M (the tied head counted once, as the head) + 12 x 12 x 768 x T; LoRA: 4 x."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sftune.runtime import flops_per_token, peak_flops

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
    n = sum(p.numel() for p in model.parameters())
    assert n == 124_439_808
    assert flops_per_token(model, 1024) == 6 * n + 12 * 12 * 768 * 1024
    assert flops_per_token(model, 100, frozen_base=True) == 4 * n + 12 * 12 * 768 * 100
    assert peak_flops(torch.device("cpu"), "bf16") is None  # MFU only on GPUs with a known peak


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989), ("NVIDIA B200", 2250),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA L40S", 362), ("NVIDIA L40", 181), ("NVIDIA L4", 121),
    ("Tesla V100-SXM2-16GB", 125), ("Tesla V100-PCIE-32GB", 112), ("Tesla T4", 65), ("NVIDIA GeForce RTX 4090", None)])
def test_the_peak_rate_of_each_card_by_its_name(name, tflops):
    """MFU's denominator, by the name torch gives the card: the first fragment of the table that fits wins, so an
    L40 is not taken for an L4, nor a PCIe H100 or V100 for the SXM one (dense bf16, fp16 where a card has no bf16)."""
    from sftune.runtime import card_peak

    assert card_peak(name) == (tflops * 1e12 if tflops else None)


def test_flops_per_token_of_a_mixture_of_experts_counts_the_experts_a_token_uses():
    """Mixtral-shaped, 8 experts and 2 a token: a quarter of the experts' weights count, the rest in full."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftune.runtime import flops_per_token

    config = AutoConfig.for_model("mixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                  num_local_experts=8, num_experts_per_tok=2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    experts = 2 * 8 * (2 * 128 * 64 + 64 * 128)  # per layer: 8 experts' gate/up (2 x 128 x 64) and down projections
    rest = sum(p.numel() for p in model.parameters()) - experts - 256 * 64  # (the input embedding is a lookup)
    assert flops_per_token(model, 100) == 6 * (rest + experts // 4) + 12 * 2 * 64 * 100


def _head_inputs(rows: int, dtype=torch.float64):
    """Hidden states, a head, and targets with ignored slots (IGNORE_INDEX), over more than one chunk."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, 16, generator=gen, dtype=dtype, requires_grad=True)
    weight = torch.randn(97, 16, generator=gen, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 97, (rows,), generator=gen)
    targets[::7] = -100
    return hidden, weight, targets


def _fused_sum(hidden, weight, targets, chunk_math, scale=1.0, cap=None, w=None, rows_per_chunk=CE_CHUNK_ROWS):
    correct = torch.zeros((), dtype=torch.long)
    w = weight.detach() if w is None else w
    loss = LinearCrossEntropySum.apply(hidden, weight, targets, w, correct, chunk_math, scale, cap, None, None,
                                       rows_per_chunk)
    grads = torch.autograd.grad(loss, (hidden, weight))
    return loss.detach(), grads, int(correct)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("scale, cap, how", [(0.125, None, "in place"), (0.125, None, "functional"),
                                             (1.0, 0.5, "in place"), (1.0, 0.5, "functional"), (1.0, 0.5, "compiled"),
                                             (0.25, 3.0, "in place"), (0.25, 3.0, "functional")])
def test_scaled_and_soft_capped_logits_give_autograds_loss_and_gradients(scale, cap, how, padded):
    """Models whose logits are h @ W.T times a constant (Cohere, Granite) and then soft-capped, cap * tanh(z / cap)
    (Gemma 2 and 3): the fused loss's hand-written gradient (through the cap's 1 - tanh^2 and the scale) equals
    autograd's through the plain formula, as do the loss and the argmax hits (fp64, over two chunks). `padded`: the
    head's cast with zero rows up to a multiple of 64 (97 -> 128 here, GPT-2's 50,257 -> 50,304: aligned rows for
    the GPU's bf16 products), whose extra logits count as -inf: the same loss, hits and gradients (of the real rows
    only)."""
    from sftune.fused_loss import aligned_cast

    hidden, weight, targets = _head_inputs(CE_CHUNK_ROWS + 37)
    w = aligned_cast(weight, torch.float64) if padded else None
    if padded:
        assert w.shape == (128, 16) and torch.equal(w[:97], weight.detach()) and not w[97:].any()
    z = (hidden @ weight.T) * scale
    logits = cap * torch.tanh(z / cap) if cap is not None else z
    trained = targets != -100
    want_loss = F.cross_entropy(logits[trained], targets[trained], reduction="sum")
    want_grads = torch.autograd.grad(want_loss, (hidden, weight))
    want_hits = int((logits.argmax(-1)[trained] == targets[trained]).sum())
    chunk_math = {"in place": None, "functional": chunk_math_functional,
                  "compiled": ChunkMath(backend="aot_eager")}[how]
    got_loss, got_grads, got_hits = _fused_sum(hidden, weight, targets, chunk_math, scale, cap, w)
    torch.testing.assert_close(got_loss, want_loss.detach(), rtol=1e-12, atol=0)
    assert got_grads[1].shape == weight.shape
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert got_hits == want_hits > 0


@pytest.mark.parametrize("how", ["functional", "compiled"])
def test_the_chunk_math_for_the_compiler_is_the_same_math(how):
    """`chunk_math_functional` (what a GPU run compiles into one or two passes over each chunk's logits) gives the
    eager in-place path's loss, gradients and argmax hits, over two chunks and ignored slots (fp64); traced whole
    by torch.compile (fullgraph, dynamic rows: the aot_eager backend here, inductor on a GPU) it still does."""
    hidden, weight, targets = _head_inputs(CE_CHUNK_ROWS + 37)
    chunk_math = chunk_math_functional if how == "functional" else ChunkMath(backend="aot_eager")
    want_loss, want_grads, want_hits = _fused_sum(hidden, weight, targets, None)
    got_loss, got_grads, got_hits = _fused_sum(hidden, weight, targets, chunk_math)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-12, atol=0)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    assert got_hits == want_hits > 0
    if how == "compiled":
        assert chunk_math.failed is None


@pytest.mark.parametrize("rows_per_chunk", [1, 100, 4 * CE_CHUNK_ROWS])
def test_the_chunk_size_changes_no_loss_or_gradient(rows_per_chunk):
    """A GPU's chunks are larger than a CPU's (`chunk_rows`: as many rows as fit 1 GiB of fp32 logits, so fewer
    passes that add a chunk's head gradient into its fp32 sum): any chunk size, down to a row at a time, gives the
    same loss, gradients and argmax hits (fp64; the sums only grouped differently)."""
    from sftune.fused_loss import chunk_rows

    assert chunk_rows(torch.device("cpu"), 50_257) == CE_CHUNK_ROWS
    hidden, weight, targets = _head_inputs(CE_CHUNK_ROWS + 37)
    want_loss, want_grads, want_hits = _fused_sum(hidden, weight, targets, None)
    got_loss, got_grads, got_hits = _fused_sum(hidden, weight, targets, None, rows_per_chunk=rows_per_chunk)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-12, atol=0)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    assert got_hits == want_hits > 0


def test_a_chunk_math_that_fails_to_compile_runs_eagerly(capsys):
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    chunk_math = ChunkMath(backend=broken)
    hidden, weight, targets = _head_inputs(50)
    got = _fused_sum(hidden, weight, targets, chunk_math)
    want = _fused_sum(hidden, weight, targets, None)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=0)
    assert chunk_math.failed and "no compiler here" in chunk_math.failed
    assert "runs eagerly" in capsys.readouterr().err


def test_gpt2s_python_gelu_runs_as_torchs_fused_one_computing_the_same(tmp_path):
    """`fuse_activations`: GPT-2's gelu_new (tanh GELU written out in Python, about eight kernels) becomes torch's
    fused tanh GELU, one per layer: the logits agree to float rounding (fp32), the saved config still names
    gelu_new, and a model with another activation (Llama's SiLU) is left alone."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.activations import GELUTanh, NewGELUActivation

    from conftest import FIXTURES
    from sftune.blocks import fuse_activations

    model = make_tiny_gpt2().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    want = model(ids).logits
    assert fuse_activations(model) == model.config.n_layer
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    assert sum(isinstance(m, GELUTanh) for m in model.modules()) == model.config.n_layer
    got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).activation_function == "gelu_new"
    llama = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(FIXTURES / "tiny-llama"))
    assert fuse_activations(llama) == 0
