"""Token-weighted causal-LM loss.

The loss of an optimizer step is the sum of the token losses over every
supervised target of the step (all micro-batches, later all ranks) divided by
their count. Averaging per-micro-batch means instead (the 2024
gradient-accumulation bug) weights short sequences more than long ones.
Position t predicts token t+1, so a row of n supervised tokens has n-1 targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sftune.batching import IGNORE_INDEX


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """Number of positions the loss is computed on: labels after the shift that are not ignored."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def sum_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropies over supervised targets.

    logits: (B, T, V) in any dtype (upcast to fp32 for the softmax); labels: (B, T).
    Divide by the step's total `count_targets` to get the step loss.
    """
    # (B, T-1, V): position t scores token t+1
    shifted = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    return F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


# --- the output projection fused with the loss ------------------------------------------

# Model types whose logits are exactly `last_hidden_state @ output_embeddings.weight.T` (no bias,
# soft-capping or scaling), so the projection can be fused with the loss.
FUSED_CE_MODEL_TYPES = {"gpt2", "llama", "mistral", "qwen2", "qwen3", "gpt_neox", "phi3", "olmo2", "smollm3"}
CE_CHUNK_ROWS = 1024  # rows of (rows, vocab) logits alive at once: 1024 x 50,257 x 4 B = 206 MB in fp32


def supports_fused_ce(model) -> bool:
    head = model.get_output_embeddings()
    return (getattr(model.config, "model_type", None) in FUSED_CE_MODEL_TYPES
            and isinstance(head, torch.nn.Linear) and head.bias is None)


class LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), chunk by chunk, without the (N, vocab) logits.

    The gradients are computed in the forward pass, chunk by chunk (d loss / d logits =
    softmax - onehot), so neither pass ever holds more than CE_CHUNK_ROWS rows of logits.
    Matrix products run in `compute_dtype` (bf16 under autocast); softmax and sums in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype):
        w = weight.to(compute_dtype)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = None  # (V, D) fp32, created by the first chunk: no 150 MB zero-fill for GPT-2
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for i in range(0, hidden.shape[0], CE_CHUNK_ROWS):
            h = hidden[i : i + CE_CHUNK_ROWS].to(compute_dtype)
            t = targets[i : i + CE_CHUNK_ROWS]
            logits = (h @ w.T).float()  # (chunk, V) fp32: the only logits alive
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_grad:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                probs = probs.to(compute_dtype)
                grad_hidden[i : i + CE_CHUNK_ROWS] = probs @ w
                chunk_grad = probs.T @ h
                if grad_weight is None:
                    grad_weight = chunk_grad.float()
                else:
                    grad_weight += chunk_grad
        if need_grad and grad_weight is None:  # no targets at all
            grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        # in place: the saved gradients are used once (scaled by 1 / the step's target count)
        return grad_hidden.mul_(grad_total), grad_weight.mul_(grad_total).to(ctx.weight_dtype), None, None


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """The model's keyword arguments for a batch.

    Packed rows (they carry `position_ids`) get no attention mask: transformers then builds a
    block-diagonal causal mask from the positions restarting at 0. That detection needs
    `use_cache=False` (with a cache it silently attends across examples), so it is always set.
    """
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


def batch_loss_sum(model, batch: dict[str, torch.Tensor], fused: bool) -> torch.Tensor:
    """Sum of next-token losses over the batch's targets. Call under the autocast context.

    fused=True skips the model's (B, T, V) logits: the final hidden states of the target
    positions only (no padding, no last position) go through LinearCrossEntropySum.
    """
    inputs = model_inputs(batch)
    if not fused:
        return sum_token_loss(model(**inputs).logits, batch["labels"])
    hidden = model.base_model(**inputs).last_hidden_state  # (B, T, D)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    device_type = hidden.device.type
    weight = model.get_output_embeddings().weight
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    with torch.autocast(device_type, enabled=False):
        return LinearCrossEntropySum.apply(hidden[:, :-1][keep], weight, targets[keep], dtype)
