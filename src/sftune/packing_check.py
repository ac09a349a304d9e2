"""`--packing` on a model that cannot keep packed examples apart: found on the model itself, before training.

Packed rows are exact only where no token of an example sees another example: the attention kept inside each example
(transformers' block-diagonal mask built from the restarting position ids, or sftune's varlen/flex attention) and
nothing else carried along the row. Many models do carry something: Mamba-style and linear-attention layers a state
(Mamba, Jamba, Falcon-H1, Qwen3-Next, MiniMax, RecurrentGemma, RWKV), older architectures positions or masks made from
the attention mask rather than the position ids (OPT, BLOOM, MPT, XGLM, BioGPT). Trained packed, each example learns
from its neighbours' tokens, without a word (TRL's padding-free packing leaves this to the user). So the model
computes two examples packed in one row, and the second alone, with the inputs training gives it (`model_inputs`),
and a run whose second example comes out other than alone is refused.
"""

from __future__ import annotations

import numpy as np
import torch

from sftune.errors import SftuneError, on_every_rank

LEAK_TOLERANCE = 1e-4  # relative to the largest logit: fp32 rounding gives <1e-6; every leak measured gave >4e-3


def packing_leak(model) -> float:
    """How far the second of two examples packed in one row is from itself alone: the largest logit difference over
    its tokens, relative to the largest logit (fp32, TF32 off, dropout off, no gradients)."""
    from sftune.attention import reference_kernels
    from sftune.batching import collate_packed, to_device
    from sftune.data import Examples
    from sftune.loss import CausalLMLoss, model_inputs

    vocab = getattr(model.get_input_embeddings(), "num_embeddings", None) or model.config.get_text_config().vocab_size
    draw = np.random.default_rng(0)
    first, second = (draw.integers(1, vocab, n).tolist() for n in (5, 6))
    examples = Examples.from_lists([first, second])
    loss = CausalLMLoss(model, fused=False)  # (its attention: sftune's varlen or flex, or transformers' own)
    device = next(model.parameters()).device
    was_training, tf32 = model.training, torch.backends.cuda.matmul.allow_tf32
    model.eval()
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad(), reference_kernels():  # (sftune's varlen and flex as on a CPU: fp32, no compile)
            # one forward over both rows (the model's weights read once): [first, second] and [second, padding]
            batch = to_device(collate_packed(examples, [np.array([0, 1]), np.array([1])], 0), device, loss.device_keys)
            logits = model(**model_inputs(batch, loss.attention)).logits.float()
    finally:
        model.train(was_training)
        torch.backends.cuda.matmul.allow_tf32 = tf32
    packed, alone = logits[0, len(first):len(first) + len(second)], logits[1, :len(second)]
    return float((packed - alone).abs().max() / alone.abs().max().clamp_min(1e-30))


def check_packing(model, dist, sharded: bool, auto: bool) -> str | None:
    """Refuse `--packing` for a model that does not keep packed examples apart (rank 0 computes it: under FSDP the
    other ranks hold no weights yet; every rank then decides alike). Under sftune's varlen or flex attention, a model
    whose layers do not pass the packed rows' bounds on to the attention function (StableLM, Nemotron: their
    attention then sees one causal row) is tried under transformers' own attention, whose mask comes from the
    position ids: with `--attention auto` the run goes on with it (returned: "sdpa" or "eager", for the caller to
    say), else the error names it. None: the model as it is keeps them apart."""
    leak = leak_on_rank_0(model, dist, sharded)
    if leak <= LEAK_TOLERANCE:
        return None
    implementation = getattr(model.config, "_attn_implementation", "")
    name = {"sftune_varlen": "varlen", "sftune_flex": "flex"}.get(implementation)
    if name is not None:  # sftune's attention: would transformers' own keep the examples apart?
        fallback = "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"
        model.set_attn_implementation(fallback)
        if leak_on_rank_0(model, dist, sharded) <= LEAK_TOLERANCE:
            if auto:
                return fallback
            model.set_attn_implementation(implementation)
            raise on_every_rank(SftuneError(
                f"--attention {name}: {type(model).__name__}'s layers do not pass the packed rows' example bounds on "
                f"to the attention function, so sftune's {name} attention cannot keep packed examples apart ({leak:.1e} "
                f"apart, relative); use --attention {fallback} (transformers' mask from the position ids keeps them "
                f"apart for this model) or auto"))
        model.set_attn_implementation(implementation)
    raise on_every_rank(SftuneError(
        f"--packing: {type(model).__name__} does not keep packed examples apart: the second of two examples "
        f"packed in one row computes other logits than it does alone ({leak:.1e} apart, relative), so each "
        f"example would learn from its neighbours' tokens (its layers carry a state along the row, or its "
        f"positions or mask do not restart with each example). Train without --packing: length-grouped rows, "
        f"the default, waste little on padding (sftune data shows how much)" +
        ("" if name is not None else "; or try --attention flex, whose attention keeps each example apart by itself")))


def leak_on_rank_0(model, dist, sharded: bool) -> float:
    """`packing_leak`, computed where the weights are (under FSDP rank 0 alone) and the same on every rank."""
    return dist.from_main(packing_leak(model) if dist.is_main or not sharded else None)
