"""Tier 1: collate (labels per position), token-weighted loss, accumulation equivalence, eval weighting."""

import math

import numpy as np
import pytest
import torch

from conftest import make_tiny_gpt2
from sftune.batching import IGNORE_INDEX, collate, epoch_steps, length_sorted_batches, padding_efficiency
from sftune.data import Examples
from sftune.evaluate import evaluate
from sftune.dist import Dist
from sftune.loss import CausalLMLoss, sum_token_loss
from sftune.train import forward_backward

EOS = 50256


def test_collate_labels_follow_the_attention_mask_not_the_token_id():
    ex = Examples.from_lists([[11, 12, EOS], [21, EOS], [31, 32, 33, 34, EOS]])
    b = collate(ex, [0, 1, 2], pad_id=EOS)
    assert b["input_ids"].tolist() == [[11, 12, EOS, EOS, EOS], [21, EOS, EOS, EOS, EOS], [31, 32, 33, 34, EOS]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    # every real EOS is a label; every pad position (same id!) is ignored
    assert b["labels"].tolist() == [[11, 12, EOS, -100, -100], [21, EOS, -100, -100, -100], [31, 32, 33, 34, EOS]]
    assert ((b["labels"] == IGNORE_INDEX) == (b["attention_mask"] == 0)).all()
    assert b["input_ids"].dtype == torch.int64


def test_unsupervised_tokens_are_ignored():
    ex = Examples.from_lists([[1, 2, 3, EOS]], [[False, False, True, True]])
    assert collate(ex, [0], pad_id=EOS)["labels"].tolist() == [[-100, -100, 3, EOS]]


def test_the_seed_collator_masks_eos_and_ours_does_not(gpt2_tokenizer):
    """DataCollatorForLanguageModeling(mlm=False) with pad = EOS ignores every EOS: the model never learns to stop."""
    from transformers import DataCollatorForLanguageModeling

    ex = Examples.from_lists([[11, 12, EOS], [21, EOS]])
    seed_labels = DataCollatorForLanguageModeling(gpt2_tokenizer, mlm=False)(
        [{"input_ids": ex.example(i)[0].tolist()} for i in range(2)])["labels"]
    ours = collate(ex, [0, 1], pad_id=EOS)["labels"]
    assert seed_labels.tolist() == [[11, 12, -100], [21, -100, -100]]
    assert ours.tolist() == [[11, 12, EOS], [21, EOS, -100]]


def _rows(steps):
    return [np.concatenate(step) for step in steps]


@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("batch_tokens", [None, 40])
def test_epoch_steps_use_every_row_once_deterministically(group, batch_tokens):
    lengths = np.random.default_rng(0).integers(2, 20, 500)
    steps = epoch_steps(lengths, 8, 2, seed=1, epoch=0, batch_tokens=batch_tokens, group_by_length=group)
    flat = np.concatenate(_rows(steps))
    assert sorted(flat.tolist()) == list(range(500))
    again = epoch_steps(lengths, 8, 2, seed=1, epoch=0, batch_tokens=batch_tokens, group_by_length=group)
    assert np.array_equal(flat, np.concatenate(_rows(again)))
    other_epoch = epoch_steps(lengths, 8, 2, seed=1, epoch=1, batch_tokens=batch_tokens, group_by_length=group)
    assert not np.array_equal(flat, np.concatenate(_rows(other_epoch)))
    for step in steps:
        assert 1 <= len(step) <= 2
        for b in step:
            assert len(b) <= 8
            if batch_tokens:
                assert len(b) * lengths[b].max() <= batch_tokens


def test_length_grouping_removes_padding():
    lengths = np.random.default_rng(0).integers(6, 67, 5000)  # SST-2-like spread
    grouped = [b for s in epoch_steps(lengths, 32, 1, 0, 0) for b in s]
    shuffled = [b for s in epoch_steps(lengths, 32, 1, 0, 0, group_by_length=False) for b in s]
    assert padding_efficiency(lengths, grouped) > 0.97
    assert padding_efficiency(lengths, shuffled) < 0.75


def test_small_datasets_are_grouped_in_several_chunks():
    """400 rows are 25 steps of 16: sorted as one chunk, every batch would hold a single length (in templated
    data, a single template) every epoch; in 4 chunks, batches mix nearby lengths (NOTES try 11)."""
    lengths = np.random.default_rng(0).integers(10, 30, 400)
    spread = np.mean([np.ptp(lengths[b]) for s in epoch_steps(lengths, 16, 1, 0, 0) for b in s])
    assert 2 < spread < 6  # one sorted chunk: 0.76
    assert len(epoch_steps(lengths, 16, 1, 0, 0)) == 25


def test_a_step_holds_the_same_rows_whatever_the_micro_batch_split():
    """(batch 32, accum 1) and (batch 8, accum 4) train on the same rows in each optimizer step."""
    lengths = np.random.default_rng(0).integers(6, 67, 3000)
    for group in (True, False):
        big = _rows(epoch_steps(lengths, 32, 1, 7, 0, group_by_length=group))
        small = _rows(epoch_steps(lengths, 8, 4, 7, 0, group_by_length=group))
        assert len(big) == len(small) == 94
        for a, b in zip(big, small):
            assert np.array_equal(a, b)


def test_steps_and_padding_efficiency():
    lengths = np.full(49_401, 10)
    assert len(epoch_steps(lengths, 32, 1, 0, 0)) == 1_544  # the seed notebook's count
    assert len(epoch_steps(lengths, 8, 4, 0, 0)) == 1_544
    assert padding_efficiency(np.array([2, 4, 4]), [np.array([0, 1]), np.array([2])]) == pytest.approx(10 / 12)
    assert [b.tolist() for b in length_sorted_batches(np.array([1, 5, 3]), 2)] == [[1, 2], [0]]


def test_sum_token_loss_is_the_shifted_cross_entropy_sum():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[1, 2, 3, -100], [4, 5, -100, -100]])
    expected = 0.0
    for b, t in [(0, 0), (0, 1), (1, 0)]:  # position t predicts label t+1
        expected -= torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]].item()
    assert sum_token_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    # one target per row fewer than supervised tokens (no over-count of the first token)
    assert (labels[:, 1:] != IGNORE_INDEX).sum().item() == 3


def _random_examples(n, seed=0):
    rng = np.random.default_rng(seed)
    return Examples.from_lists([rng.integers(0, 50_000, rng.integers(3, 30)).tolist() + [EOS] for _ in range(n)])


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_grad_accumulation_equals_one_big_batch():
    """--batch-size 32 equals --batch-size 8 --grad-accum 4: same gradients, same loss."""
    ex = _random_examples(32)
    model = make_tiny_gpt2()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    dist = Dist()
    order = epoch_steps(ex.lengths, 32, 1, seed=0, epoch=0)[0][0]

    loss_big, n_big = forward_backward(CausalLMLoss(model), [collate(ex, order, EOS)], dist, "fp32", scaler)
    big = _grads(model).clone()
    model.zero_grad()
    micro = [collate(ex, order[i : i + 8], EOS) for i in range(0, 32, 8)]
    loss_acc, n_acc = forward_backward(CausalLMLoss(model), micro, dist, "fp32", scaler)
    acc = _grads(model).clone()

    assert n_big == n_acc == int(ex.lengths.sum()) - 32
    assert loss_acc.item() == pytest.approx(loss_big.item(), rel=1e-5)
    torch.testing.assert_close(acc, big, rtol=1e-4, atol=1e-6)

    # the 2024 bug, for contrast: averaging micro-batch means gives a different gradient
    model.zero_grad()
    for b in micro:
        (sum_token_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
         / len(b["targets"]) / len(micro)).backward()
    assert not torch.allclose(_grads(model), big, rtol=1e-3, atol=1e-6)


def test_eval_loss_is_token_weighted_over_the_split():
    model = make_tiny_gpt2()
    with torch.no_grad():  # the first example is the model's own greedy continuation: its argmax hits 7 targets
        greedy = model.generate(torch.tensor([[5]]), max_new_tokens=7, do_sample=False, pad_token_id=EOS)[0].tolist()
    ex = Examples.from_lists([greedy + [EOS], [13, EOS], [14, 15, EOS]])
    cpu = torch.device("cpu")
    loss_model = CausalLMLoss(model).train()
    loss_model(collate(ex, [0, 1], EOS))  # a training forward before: its argmax hits stay the training log's
    trained_hits = int(loss_model.correct)
    result = evaluate(loss_model, ex, batch_size=2, pad_id=EOS, device=cpu, precision="fp32")
    assert loss_model.take_correct() == trained_hits and loss_model.training
    sums, counts, hits = [], [], 0
    with torch.no_grad():
        for i in range(3):
            b = collate(ex, [i], EOS)
            logits = model(input_ids=b["input_ids"]).logits
            sums.append(sum_token_loss(logits, b["labels"]).item())
            counts.append(len(b["targets"]))
            hits += int((logits[0, :-1].argmax(-1) == b["labels"][0, 1:]).sum())  # (every label here is a target)
    assert result.targets == sum(counts) == 11
    assert result.accuracy == hits / 11 and hits >= 7  # the argmax hits over the whole split
    assert result.loss == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    # differs from the mean of per-example means, so weighting matters here
    assert abs(result.loss - np.mean([s / c for s, c in zip(sums, counts)])) > 1e-3
    assert model.training and loss_model.eval_correct is None  # evaluate restores what it found


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_padded_tokens_count_what_every_rank_computes(packed, static):
    """A step's `padded_tokens` is what all ranks compute together, padding included: each rank pads its share of
    each micro-batch to its own longest row (or to the static shapes of graphs and compiled steps), so on 2 or 3
    ranks it is the sum of every rank's batch sizes, not the micro-batch padded as one."""
    from sftune.batching import Padding
    from sftune.steps import step_of

    rng = np.random.default_rng(0)
    ex = Examples.from_lists([[7] * int(n) for n in rng.choice([3, 4, 30, 41], size=40)])
    # two micro-batches of 7 examples, or of 3 packed rows of 2-3 examples each
    micro = [list(range(0, 7)), list(range(7, 14))] if not packed else \
        [[np.array([3 * i, 3 * i + 1]) for i in range(j, j + 3)] for j in (0, 3)]
    padding = Padding(multiple=16, rows=4, max_width=128, static=True) if static else Padding()
    for world in (1, 2, 3):
        steps = [step_of(ex, micro, Dist(rank=r, world_size=world), packed, EOS, 0, False, padding=padding)
                 for r in range(world)]
        computed = sum(b["input_ids"].numel() for s in steps for b in s.micro_batches)
        assert {s.padded_tokens for s in steps} == {computed}, world  # every rank counts the same, exactly
        assert steps[0].tokens == sum(int(ex.lengths[r].sum()) for rows in micro for r in rows)


@pytest.mark.parametrize("max_norm", [None, 1e9, 0.05])
def test_clipping_inside_the_fused_update_is_torchs_clip(max_norm):
    """With fused AdamW the clip is the divisor its kernel applies as it reads the gradients (no pass of its own):
    five steps of a small model end at torch's `clip_grad_norm_` + step to the bit when no step is clipped, and
    within a rounding per update when every step is (max_norm 0.05); the norm reported is the same."""
    from sftune.update import clip_gradients

    def run(into_update: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        x, norms = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)), []
        for _ in range(5):
            model(x).pow(2).sum().backward()
            norm, divisor = clip_gradients(model, max_norm, into_update)
            assert (divisor is None) == (not into_update or not max_norm)
            optimizer.found_inf = torch.zeros(())
            if divisor is not None:
                optimizer.grad_scale = divisor
            optimizer.step()
            optimizer.__dict__.pop("grad_scale", None)
            optimizer.zero_grad()
            norms.append(float(norm))
        return [p.detach().clone() for p in model.parameters()], norms

    (want, want_norms), (got, got_norms) = run(False), run(True)
    assert got_norms == want_norms if max_norm != 0.05 else got_norms == pytest.approx(want_norms, rel=1e-5)
    for a, b in zip(got, want):
        if max_norm == 0.05:
            assert min(want_norms) > 0.05  # (every step clipped)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b)
