"""Tier 1: packed rows behave exactly like separate examples."""

import numpy as np
import pytest
import torch

from conftest import make_tiny_gpt2
from sftune.attention import NAME as VARLEN
from sftune.attention import register, varlen_inputs
from sftune.batching import IGNORE_INDEX, best_fit_decreasing, collate, collate_packed, packed_epoch_steps
from sftune.data import Examples
from sftune.loss import CausalLMLoss, model_inputs

EOS = 50256


def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return Examples.from_lists([rng.integers(0, 50_000, n - 1).tolist() + [EOS] for n in lengths])


def _token_losses(logits, labels):
    """(B, T-1) next-token losses, 0 where there is no target."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none")


def test_best_fit_decreasing_fills_rows_and_uses_every_item_once():
    lengths = np.random.default_rng(0).integers(6, 67, 3000)
    rows = best_fit_decreasing(lengths, 256)
    assert sorted(np.concatenate(rows).tolist()) == list(range(3000))
    assert all(lengths[r].sum() <= 256 for r in rows)
    fill = lengths.sum() / (len(rows) * 256)
    assert fill > 0.98
    with pytest.raises(ValueError, match="does not fit"):
        best_fit_decreasing(np.array([300]), 256)


def test_packed_epoch_steps_use_every_example_once():
    lengths = np.random.default_rng(1).integers(6, 67, 1000)
    steps = packed_epoch_steps(lengths, 128, batch_size=2, grad_accum=2, seed=0, epoch=3)
    used = np.concatenate([row for step in steps for micro in step for row in micro])
    assert sorted(used.tolist()) == list(range(1000))
    assert all(lengths[row].sum() <= 128 for step in steps for micro in step for row in micro)


@pytest.mark.parametrize("fused", [False, True])
def test_packed_losses_and_gradients_equal_separate_padded_examples(fused):
    """Per-example losses and gradients from packed rows match the same examples padded separately."""
    ex = _examples([9, 4, 17, 6, 12, 3, 8])
    rows = best_fit_decreasing(ex.lengths, 24)
    assert len(rows) < len(ex)  # really packed
    model = make_tiny_gpt2()

    packed = collate_packed(ex, rows, EOS)
    padded = collate(ex, list(range(len(ex))), EOS)
    assert (packed["labels"] != IGNORE_INDEX).sum() == (padded["labels"][:, 1:] != IGNORE_INDEX).sum()

    # per-example losses
    with torch.no_grad():
        lp = _token_losses(model(**model_inputs(packed)).logits, packed["labels"])
        ls = _token_losses(model(**model_inputs(padded)).logits, padded["labels"])
    for row, items in enumerate(rows):
        at = 0
        for i in items:
            n = int(ex.lengths[i])
            # positions at .. at+n-2 of the row predict tokens 1 .. n-1 of example i
            torch.testing.assert_close(lp[row, at : at + n - 1], ls[i, : n - 1], rtol=1e-5, atol=1e-5)
            at += n

    # gradients of the summed loss
    grads = []
    for batch in (packed, padded):
        model.zero_grad()
        CausalLMLoss(model, fused)(batch).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("varlen", [False, True], ids=["mask", "varlen"])
def test_no_token_attends_to_another_example(varlen):
    """Changing one example's tokens changes nothing for the others in its row: under transformers' block mask,
    and under --attention varlen."""
    ex = _examples([7, 5, 9])
    rows = [np.array([0, 1, 2])]
    model = make_tiny_gpt2().eval()
    if varlen:
        register()
        model.set_attn_implementation(VARLEN)
    base = collate_packed(ex, rows, EOS)
    changed = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in base.items()}
    changed["input_ids"][0, 7:12] = torch.arange(100, 105)  # example 1 occupies positions 7..11
    with torch.no_grad():
        a = model(**model_inputs(base, "varlen" if varlen else None)).logits
        b = model(**model_inputs(changed, "varlen" if varlen else None)).logits
    assert torch.equal(a[0, :7], b[0, :7])  # example 0: before, untouched
    assert torch.equal(a[0, 12:], b[0, 12:])  # example 2: after, untouched even though it comes later
    assert not torch.allclose(a[0, 7:12], b[0, 7:12])  # example 1 itself did change

    # and the same through gradients: example 2's loss does not depend on examples 0 and 1's embeddings
    emb = model.get_input_embeddings()(base["input_ids"]).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb, position_ids=base["position_ids"], use_cache=False,
                   **(varlen_inputs(base) if varlen else {})).logits
    labels = base["labels"].clone()
    labels[0, :12] = IGNORE_INDEX  # keep only example 2's targets
    _token_losses(logits, labels).sum().backward()
    assert emb.grad[0, :12].abs().max() == 0
    assert emb.grad[0, 12:].abs().max() > 0


def test_packed_labels_never_cross_example_boundaries():
    ex = Examples.from_lists([[1, 2, EOS], [3, 4, 5, EOS]])
    b = collate_packed(ex, [np.array([0, 1]), np.array([1])], pad_id=EOS)
    assert b["input_ids"].tolist() == [[1, 2, EOS, 3, 4, 5, EOS], [3, 4, 5, EOS, EOS, EOS, EOS]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 0, 1, 2]]
    assert b["labels"].tolist() == [[-100, 2, EOS, -100, 4, 5, EOS], [-100, 4, 5, EOS, -100, -100, -100]]
    assert b["attention_mask"].tolist() == [[1] * 7, [1, 1, 1, 1, 0, 0, 0]]
