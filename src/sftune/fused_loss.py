"""The output projection fused with cross-entropy: the loss and its gradients without the (N, vocab) logits.

`LinearCrossEntropySum` computes sum_i CE(h_i @ W.T, t_i) chunk by chunk, each chunk's gradients made in the
forward pass (softmax - onehot), so no pass holds more than a chunk of logits: 1,024 rows (206 MB for GPT-2's
vocabulary) on a CPU, up to 1 GiB of them on a GPU (`chunk_rows`). Products run in bf16 under autocast on a copy of
the head padded to 64-row multiples (`aligned_cast`); softmax and sums in fp32, eagerly in place
(`_chunk_in_place`) or compiled (`ChunkMath`). `loss.CausalLMLoss` calls it; the model types it serves and their
logit maps are there (`LOGIT_MAPS`).

    >>> import torch
    >>> h, w, t = torch.randn(5, 8), torch.randn(11, 8), torch.tensor([1, 2, 3, 4, 5])
    >>> loss = LinearCrossEntropySum.apply(h, w, t, w)
    >>> bool(torch.allclose(loss, torch.nn.functional.cross_entropy(h @ w.T, t, reduction="sum")))
    True
"""

from __future__ import annotations

import torch

from sftune.batching import IGNORE_INDEX

CE_CHUNK_ROWS = 1024  # rows of (rows, vocab) logits alive at once: 1024 x 50,257 x 4 B = 206 MB in fp32
GPU_CHUNK_BYTES = 1 << 30  # on a GPU, chunks of up to this many bytes of fp32 logits (and 1/64 of its memory)
VOCAB_ALIGN = 64  # the head's cast gets zero rows up to a multiple of this (50,257 -> 50,304): aligned products



def aligned_cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The head's weight (V, D) cast to `dtype`, with zero rows after its V up to a multiple of VOCAB_ALIGN.

    With V = 50,257 (GPT-2) every (rows, V) logits tensor has an odd row stride, and no product that reads or
    writes one has the 16-byte aligned rows a GPU's bf16 matrix kernels want. `LinearCrossEntropySum` takes the
    extra columns as logits of -inf: they add nothing to the softmax, the loss or any gradient (tested).
    """
    vocab = weight.shape[0]
    rows = -(-vocab // VOCAB_ALIGN) * VOCAB_ALIGN
    if rows == vocab:
        return weight.detach().to(dtype)
    cast = weight.new_empty((rows, weight.shape[1]), dtype=dtype)
    cast[:vocab].copy_(weight.detach())
    cast[vocab:].zero_()
    return cast


def chunk_rows(device: torch.device, vocab: int) -> int:
    """Rows of logits per chunk of the fused loss: CE_CHUNK_ROWS on a CPU (where larger chunks are no faster);
    on a GPU, as many multiples of it as fit GPU_CHUNK_BYTES of fp32 logits (GPT-2: 5,120 rows), since each chunk
    adds its (vocab x width) head gradient into the fp32 sum in a pass of its own, and a larger chunk makes larger
    products (a packed step of 32,768 rows: 7 chunks instead of 32)."""
    if device.type != "cuda":
        return CE_CHUNK_ROWS
    budget = min(GPU_CHUNK_BYTES, torch.cuda.get_device_properties(device).total_memory // 64)
    return max(1, budget // (vocab * 4 * CE_CHUNK_ROWS)) * CE_CHUNK_ROWS


class LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(logits_i, target_i), chunk by chunk, without the (N, vocab) logits: logits_i = hidden_i @ weight.T
    times `scale`, then `cap * tanh(logits_i / cap)` if `cap` (the model's own map: `LOGIT_MAPS`).

    The gradients are computed in the forward pass, chunk by chunk (d loss / d logits =
    softmax - onehot), so neither pass ever holds more than `chunk_rows` rows of logits.
    Matrix products run in `w`'s dtype (the weight cast to bf16 under autocast); softmax and
    sums in fp32. `w` may have more rows than `weight` (`aligned_cast`): their logits count as -inf. No gradient
    is computed for an input that does not need one (a frozen head). `correct`, when given, counts the targets the
    argmax predicts (for the logged token accuracy). A target of IGNORE_INDEX (a static batch's position that
    trains nothing) adds nothing to the loss, its gradient or the count. `rows` and `values`: the head is `weight`
    (a constant) except that its rows `rows` are `values`, which get the gradient (`values[j]`'s is row
    `rows[j]`'s), computed for those rows alone. `rows_per_chunk`: `chunk_rows`.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, w, correct=None, chunk_math=None, scale=1.0, cap=None, rows=None,
                values=None, rows_per_chunk=CE_CHUNK_ROWS):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_rows = rows is not None and ctx.needs_input_grad[9]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = None  # (V, D) fp32, created by the first chunk: no 150 MB zero-fill for GPT-2
        acc = torch.promote_types(w.dtype, torch.float32)  # softmax and sums: fp32 (fp64 for an fp64 model)
        grad_rows = torch.zeros_like(values, dtype=acc) if need_rows else None
        # `total` is summed out of place: torch.compile before 2.13 (dynamo's autograd.Function tracing) hands the
        # backward a zero gradient for an output that forward made with torch.zeros and then updated in place
        total = torch.zeros((), dtype=acc, device=hidden.device)
        vocab = weight.shape[0] if w.shape[0] != weight.shape[0] else None  # (padded: the real columns)
        for i in range(0, hidden.shape[0], rows_per_chunk):
            h = hidden[i : i + rows_per_chunk].to(w.dtype)
            t = targets[i : i + rows_per_chunk]
            trained = t != IGNORE_INDEX
            t = t.clamp(min=0)  # (an ignored row picks class 0, then counts for nothing)
            if chunk_math is not None:  # the same math, fused by torch.compile: one or two passes over the logits
                loss, hits, probs = chunk_math(h @ w.T, t, trained, acc, need_hidden or need_weight or need_rows,
                                               scale, cap, vocab)
                if correct is not None:
                    correct += hits
            else:
                logits = (h @ w.T).to(acc)  # (chunk, V) fp32: the only logits alive
                loss, probs = _chunk_in_place(logits, t, trained, correct, need_hidden or need_weight or need_rows,
                                              scale, cap, vocab)
            total = total + loss
            if probs is not None:
                probs = probs.to(w.dtype)
                if need_hidden:
                    grad_hidden[i : i + rows_per_chunk] = probs @ w
                if need_weight:
                    chunk_grad = (probs.T @ h)[: weight.shape[0]]  # (the padding's rows: zero, dropped)
                    if grad_weight is None:
                        grad_weight = chunk_grad.to(acc)
                    else:
                        grad_weight += chunk_grad
                if need_rows:
                    grad_rows += probs.index_select(1, rows).T @ h
        if need_weight and grad_weight is None:  # no targets at all
            grad_weight = torch.zeros_like(weight, dtype=acc)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_rows)
        ctx.weight_dtype, ctx.values_dtype = weight.dtype, values.dtype if values is not None else None
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_rows = ctx.saved_tensors
        # in place: the saved gradients are used once (scaled by 1 / the step's target count)
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_total)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_total).to(ctx.weight_dtype)
        if grad_rows is not None:
            grad_rows = grad_rows.mul_(grad_total).to(ctx.values_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, grad_rows, None


def _chunk_in_place(logits, t, trained, correct, want_grad: bool, scale: float = 1.0,
                    cap: float | None = None, vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk eagerly, in place in its fp32 logits z = h @ W.T: (its loss sum, d loss / d z (softmax - onehot,
    0 on untrained rows, through the model's scale and soft cap) or None); its argmax hits are added to `correct`.
    `vocab`: the real columns when W was padded (`aligned_cast`); the others become -inf. One `max` pass gives the
    argmax and the shift of the log-sum-exp, max + log(sum(exp(z - max))), whose exponentials are kept for the
    softmax: on a CPU a third of the time of `logsumexp`, `argmax` and the softmax's own exp (NOTES try 61)."""
    slope = None  # the soft cap's derivative, 1 - tanh^2: one more (chunk, V) buffer, only for capped models
    if scale != 1.0:
        logits.mul_(scale)
    if cap is not None:
        logits.div_(cap).tanh_()
        slope = 1.0 - logits.square() if want_grad else None
        logits.mul_(cap)
    if vocab is not None:
        logits[:, vocab:] = float("-inf")
    top, best = logits.max(dim=-1)  # (the first largest on ties, as argmax)
    target = logits.gather(1, t[:, None]).squeeze(1)
    if correct is not None:  # (counted in place: an accuracy for the log, no gradient)
        correct += ((best == t) & trained).sum()
    exp = logits.sub_(top[:, None]).exp_()  # exp(z - max), in place
    total = exp.sum(dim=-1)
    loss = torch.where(trained, top + total.log() - target, 0.0).sum()
    if not want_grad:
        return loss, None
    probs = exp.div_(total[:, None])  # softmax, in place
    probs[torch.arange(len(t), device=t.device), t] -= 1.0
    if slope is not None:
        probs.mul_(slope)
    if scale != 1.0:
        probs.mul_(scale)
    return loss, probs.mul_(trained[:, None])


def chunk_math_functional(logits, t, trained, acc: torch.dtype, want_grad: bool, scale: float = 1.0,
                          cap: float | None = None, vocab: int | None = None):
    """One chunk's (loss sum, argmax hits, d loss / d logits or None) from its (rows, V) logits in the matmul's
    dtype: the math of `_chunk_in_place` without in-place steps, so that torch.compile fuses it into a pass or two
    over the logits (eagerly it would make about eight, most of them over an fp32 copy)."""
    x = logits.to(acc)
    if scale != 1.0:
        x = x * scale
    if cap is not None:
        tanh = torch.tanh(x / cap)
        x = tanh * cap
    columns = torch.arange(x.shape[-1], device=x.device)[None, :]
    if vocab is not None:  # (a padded head: its extra columns are -inf)
        x = torch.where(columns < vocab, x, float("-inf"))
    lse = torch.logsumexp(x, dim=-1)
    loss = torch.where(trained, lse - x.gather(1, t[:, None]).squeeze(1), 0.0).sum()
    hits = ((x.argmax(-1) == t) & trained).sum()
    if not want_grad:
        return loss, hits, None
    target = columns == t[:, None]
    grad = torch.where(trained[:, None], (x - lse[:, None]).exp() - target.to(acc), 0.0)
    if cap is not None:
        grad = grad * (1.0 - tanh * tanh)
    if scale != 1.0:
        grad = grad * scale
    return loss, hits, grad.to(logits.dtype)


class ChunkMath:
    """`chunk_math_functional` under torch.compile (dynamic row counts: one compile serves every chunk size).
    If compiling fails, it says so once and computes the same math eagerly."""

    def __init__(self, backend: str = "inductor"):
        self.compiled = torch.compile(chunk_math_functional, dynamic=True, fullgraph=True, backend=backend)
        self.failed: str | None = None

    def __call__(self, logits, t, trained, acc, want_grad, scale=1.0, cap=None, vocab=None):
        if self.failed is None:
            try:
                return self.compiled(logits, t, trained, acc, want_grad, scale, cap, vocab)
            except Exception as e:  # noqa: BLE001 (any compiler failure: the eager math is the same math)
                from sftune.console import log
                from sftune.errors import compiler_error

                self.failed = compiler_error(e)

                log(f"warning: compiling the fused loss's chunk math failed ({self.failed}); it runs eagerly")
        return chunk_math_functional(logits, t, trained, acc, want_grad, scale, cap, vocab)
