"""NEFTune (Jain et al., 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"): in training, uniform
noise in [-1, 1] scaled by alpha / sqrt(L * d) is added to the input embeddings (d: their width, L: the sequence's
length); evaluation and generation see none.

L is each example's own length, as in the paper's code (its real tokens, from the attention mask). The hook that
transformers' Trainer (and so TRL's `neftune_noise_alpha`) installs takes L from the batch's shape: a padded row's
width, or a packed row's 1,024, so short examples in long batches, and every example in a packed row, get less
noise than the method prescribes (a packed example of 64 tokens: a quarter). Here padding gets no noise, and each
example of a packed row is scaled by its own length (its positions restart at 0).

    noise = NoisyEmbeddings(model, alpha=5.0)      # a forward hook on the input embeddings
    noise.lengths = example_lengths(batch)         # before each training forward; None after it
"""

from __future__ import annotations

import torch


def example_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T) float: for each real token, the length of the example it belongs to; 0 on padding. Rows are
    right-padded (`attention_mask` 1 on real tokens); packed rows carry `position_ids`, which restart at 0 at each
    example. On the device, without a host sync (a CUDA graph can hold it)."""
    mask = batch["attention_mask"]
    if "position_ids" not in batch:
        return (mask * mask.sum(1, keepdim=True)).float()
    starts = batch["position_ids"] == 0
    segment = starts.long().cumsum(1)  # (B, T): 1, 1, 1, 2, 2, ... the example each token is in
    rows, width = segment.shape
    flat = (segment + torch.arange(rows, device=segment.device)[:, None] * (width + 1)).reshape(-1)
    counts = torch.zeros(rows * (width + 1), dtype=mask.dtype, device=mask.device).index_add_(0, flat, mask.reshape(-1))
    return (counts[flat].reshape(rows, width) * mask).float()


class NoisyEmbeddings:
    """A forward hook on `model`'s input embeddings that adds NEFTune's noise while the embeddings are in training
    mode and `lengths` is set (`example_lengths` of the batch being trained on)."""

    def __init__(self, model, alpha: float):
        self.alpha = float(alpha)
        self.lengths: torch.Tensor | None = None
        self.handle = model.get_input_embeddings().register_forward_hook(self.add_noise)

    def add_noise(self, module, inputs, output):
        if not module.training or self.lengths is None or self.lengths.shape != output.shape[:2]:
            return output  # (generation and evaluation: no noise)
        bound = self.alpha / torch.sqrt(self.lengths.clamp(min=1) * output.shape[-1])
        bound = torch.where(self.lengths > 0, bound, 0.0)[..., None].to(output.dtype)
        return output + (torch.rand_like(output) * 2 - 1) * bound

    def remove(self) -> None:
        self.handle.remove()
