"""The optimizer and its step: AdamW or Adafactor over parameter groups (decay for matrices only, LoRA+'s faster B
matrices), the learning rate of each step, clipping the gradients and skipping an update that is not finite.

Both decide on the device where the optimizer lets them (fused AdamW: its kernel divides the gradients by a
`grad_scale` and skips the update when `found_inf` is set), so a step that does not log never waits for the GPU.

    norm, divisor = clip_gradients(model, max_grad_norm, into_update=guard.on_device)
    loss = guard.step(loss, norm, step, divisor)   # the update, unless non-finite
    guard.update_scale()                            # fp16's loss scale: (scale, lowered) if it overflowed
    guard.settle()                                  # later: (step, skipped) of that update, read on the host
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING

import torch

from sftune.config import SFTConfig
from sftune.dist import Dist
from sftune.errors import SftuneError, on_every_rank

if TYPE_CHECKING:
    from sftune.loss import CausalLMLoss


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

    def update_scale(self) -> tuple[float, float] | None:
        """`scaler.update()`. Under fp16: (the loss scale, the lowered one) when the step's gradients overflowed, so
        the scaler skipped its update (unless the guard skipped the step itself: said there). Read on the host, where
        fp16's steps are decided anyway (and every rank sees the same overflow: DDP's gradients are the same, and
        FSDP's shards' flags are reduced over the ranks)."""
        if not self.scaler.is_enabled():
            self.scaler.update()
            return None
        before = self.scaler.get_scale()
        self.scaler.update()
        after = self.scaler.get_scale()
        if after >= before or (self.pending is not None and bool(self.pending[1])):
            return None
        return before, after

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


# --- the learning rate of each step ---------------------------------------------------------------------------
# transformers' schedules (`get_scheduler`: constant_with_warmup, linear, polynomial, cosine, cosine_with_min_lr,
# warmup_stable_decay), computed as transformers computes them, float for float (tests/test_cli_options.py compares
# every step's lr), so a checkpoint from either resumes under the other. Written here because importing
# `transformers.optimization` imports its Trainer's utilities, and they import peft and accelerate: 1.35 s of a
# run's start on a 2-core CPU (benchmarks/NOTES.md try 114), for 30 lines of arithmetic.


def warmup_factor(step: int, warmup: int) -> float:
    return float(step) / float(max(1, warmup))


def constant_factor(step: int, *, warmup: int) -> float:
    return float(step) / float(max(1.0, warmup)) if step < warmup else 1.0


def linear_factor(step: int, *, warmup: int, total: int, floor: float, lr: float) -> float:
    """Down from 1 to `floor` at `total` (transformers' linear for floor 0; above, its polynomial decay of power 1,
    which works in learning rates: `lr`, the optimizer's)."""
    if step < warmup:
        return warmup_factor(step, warmup)
    if not floor:
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    lr_end = floor * lr
    if step > total:
        return lr_end / lr
    pct_remaining = 1 - (step - warmup) / max(1, total - warmup)  # (transformers divides by 0 when warmup = total)
    return ((lr - lr_end) * pct_remaining ** 1.0 + lr_end) / lr


def cosine_factor(step: int, *, warmup: int, total: int, floor: float) -> float:
    """Half a cosine from 1 down to `floor` at `total`."""
    if step < warmup:
        return warmup_factor(step, warmup)
    progress = float(step - warmup) / float(max(1, total - warmup))
    factor = 0.5 * (1.0 + math.cos(math.pi * float(0.5) * 2.0 * progress))
    return max(0, factor * (1 - floor) + floor)


def wsd_factor(step: int, *, warmup: int, stable: int, decay: int, floor: float) -> float:
    """Warm-up (from `floor`, as transformers' wsd starts it), stable at 1, then half a cosine down to `floor`."""
    if step < warmup:
        return max(0.0, warmup_factor(step, warmup) * (1.0 - floor) + floor)
    if step < warmup + stable:
        return 1.0
    if step < warmup + stable + decay:
        progress = float(step - warmup - stable) / float(max(1, decay))
        factor = 0.5 * (1.0 + math.cos(math.pi * float(0.5) * 2.0 * progress))
        return max(0.0, factor * (1.0 - floor) + floor)
    return floor


def lr_factor(schedule: str, lr: float, warmup: int, total: int, floor: float = 0.0, decay: int = 0):
    """The factor of the learning rate `lr` at each step (for torch's `LambdaLR`): `schedule` constant, linear,
    cosine or wsd (whose decay is the last `decay` steps), warming up linearly over `warmup` steps, ending at
    `floor`."""
    if schedule == "constant":
        return partial(constant_factor, warmup=warmup)
    if schedule == "linear":
        return partial(linear_factor, warmup=warmup, total=total, floor=floor, lr=lr)
    if schedule == "cosine":
        return partial(cosine_factor, warmup=warmup, total=total, floor=floor)
    if schedule == "wsd":
        return partial(wsd_factor, warmup=warmup, stable=total - warmup - decay, decay=decay, floor=floor)
    raise ValueError(f"unknown lr_schedule {schedule!r}")


def warmup_steps(cfg: SFTConfig, total_steps: int) -> int:
    """`warmup_steps`, or `warmup_ratio` of the run's steps rounded up (the HF Trainer's rule)."""
    return math.ceil(cfg.warmup_ratio * total_steps) if cfg.warmup_ratio is not None else cfg.warmup_steps


def build_scheduler(cfg: SFTConfig, optimizer, warmup: int, total_steps: int):
    """The learning rate of each step (`update.lr_factor`, transformers' schedules): linear warm-up over `warmup`
    steps, then constant, a linear or cosine decay to `min_lr_ratio` x lr at `total_steps`, or wsd: constant, then
    a cosine decay to it over the last `decay_ratio` of the steps."""
    decay = 0
    if cfg.lr_schedule == "wsd":
        decay = math.ceil(cfg.decay_ratio * total_steps)
        if warmup + decay > total_steps:
            raise on_every_rank(SftuneError(
                f"lr_schedule wsd: {warmup} warm-up and {decay} decay steps (decay_ratio {cfg.decay_ratio:g}) do not "
                f"fit the run's {total_steps:,} steps; lower --warmup-steps or --decay-ratio"))
    factor = lr_factor(cfg.lr_schedule, optimizer.defaults["lr"], warmup, total_steps, cfg.min_lr_ratio, decay)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def param_groups(model, weight_decay: float, lr: float, b_ratio: float | None = None) -> list[dict]:
    """Decay matrices only: biases and norm gains (1-D) are not decayed (as in HF/TRL, nanoGPT). LoRA+ (`b_ratio`):
    the adapters' B matrices learn at `b_ratio` times `lr` (Hayou et al., 2024; peft's `create_loraplus_optimizer`)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    faster = {id(p) for n, p in named if b_ratio and (".lora_B." in n or ".lora_embedding_B." in n)}
    params = [p for _, p in named if id(p) not in faster]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    if faster:
        groups.append({"params": [p for _, p in named if id(p) in faster], "weight_decay": weight_decay,
                       "lr": lr * b_ratio})
    return groups


def build_optimizer(cfg: SFTConfig, loss_model: CausalLMLoss, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused: one kernel over all parameters, measured 6x faster than foreach on CPU, benchmarks/NOTES.md),
    or Adafactor (decoupled weight decay, as AdamW's); the parameter groups' own lr and decay."""
    groups = param_groups(loss_model, cfg.weight_decay, cfg.lr, cfg.loraplus_lr_ratio)
    if cfg.optimizer == "adafactor":
        optimizer = torch.optim.Adafactor(groups, lr=cfg.lr)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                      fused=device.type in ("cpu", "cuda"))
    optimizer.register_step_post_hook(loss_model.forget_cast)  # the weights changed: recast the head next time
    return optimizer
