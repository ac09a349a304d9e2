"""The optimizer step's own parts: clipping the gradients, and skipping an update that is not finite.

Both decide on the device where the optimizer lets them (fused AdamW: its kernel divides the gradients by a
`grad_scale` and skips the update when `found_inf` is set), so a step that does not log never waits for the GPU.

    norm, divisor = clip_gradients(model, max_grad_norm, into_update=guard.on_device)
    loss = guard.step(loss, norm, step, divisor)   # the update, unless non-finite
    guard.settle()                                  # later: (step, skipped) of that update, read on the host
"""

from __future__ import annotations

import torch

from sftune.dist import Dist


class NonFiniteGuard:
    """Skips an optimizer step whose loss or gradient norm is not finite: the step then changes nothing.

    With fused AdamW (CPU and CUDA) the verdict stays on the device: the kernel skips the update when its
    `found_inf` flag is set (weights, moments and step count untouched), so no step waits for the GPU to decide.
    The host reads the verdict later (`settle`: at the next step, once its batches are ready, or before anything
    that logs or saves), from a pinned copy the GPU wrote long before. fp16 (its loss scaler reads the flag on the
    host) and optimizers without the flag decide on the host at once. Every rank skips, or none does.
    """

    def __init__(self, optimizer, scaler, precision: str, dist: Dist):
        self.optimizer, self.scaler, self.precision, self.dist = optimizer, scaler, precision, dist
        self.on_device = bool(optimizer.defaults.get("fused")) and precision != "fp16"
        self.pending: tuple[int, torch.Tensor, object] | None = None  # (step, verdict, event)
        self.host = torch.zeros((), dtype=torch.bool, pin_memory=dist.device.type == "cuda")

    def step(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor, step: int,
             divisor: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the update unless the step is non-finite; returns the loss to log (0 for a skipped step).
        `divisor` (on the device): the fused kernel divides the gradients by it (`clip_gradients`)."""
        bad = ~torch.isfinite(loss_sum)
        if self.precision != "fp16":  # (under fp16 the scaler itself skips steps whose gradients overflowed)
            bad |= ~torch.isfinite(grad_norm)
        bad = self.dist.all_reduce_sum(bad.int()) > 0  # every rank skips, or none does
        if self.on_device:
            self.optimizer.found_inf = bad.float()
            if divisor is not None:
                self.optimizer.grad_scale = divisor
            try:
                self.scaler.step(self.optimizer)
            finally:
                del self.optimizer.found_inf
                self.optimizer.__dict__.pop("grad_scale", None)
            self.host.copy_(bad, non_blocking=True)
            event = torch.cuda.Event() if self.dist.device.type == "cuda" else None
            if event is not None:
                event.record()
            self.pending = (step, self.host, event)
        else:
            if not bool(bad):  # note: a host sync
                self.scaler.step(self.optimizer)
            self.pending = (step, bad, None)
        return torch.where(bad, torch.zeros_like(loss_sum), loss_sum)  # the logged loss stays finite

    def settle(self) -> tuple[int, bool] | None:
        """(step, skipped) of the last step, once; None when nothing is pending."""
        if self.pending is None:
            return None
        step, bad, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()  # waits for that step's verdict only, not for the work queued since
        return step, bool(bad)


def clip_gradients(model, max_norm: float | None, into_update: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the gradients' global L2 norm, a divisor for the update or None): clipping to `max_norm` (0/None: none).

    `into_update` (fused AdamW, which divides the gradients by its `grad_scale` as it reads them): the clip is that
    divisor, max(1, (norm + 1e-6) / max_norm), so no pass of its own over the gradients (on a GPU at the seed's
    recipe, 0.37 of a step's 8.6 ms; benchmarks/NOTES.md try 65). An unclipped step is the same to the bit as
    `clip_grad_norm_` (x / 1 = x); a clipped one within a rounding of each gradient (x / (1 / c) against x * c).
    Otherwise torch's `clip_grad_norm_` clips in place (FSDP: its norm is a DTensor, made whole here)."""
    if not into_update:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
        return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm), None
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None], foreach=True)
    if not max_norm:
        return norm, None
    return norm, torch.clamp((norm + 1e-6) / max_norm, min=1.0)
