"""What a run says as it trains: the log window's figures, the log line, the time left.

    window = LogWindow(state.window, dist, loss_model)   # a resumed run continues the window where it stopped
    window.add(loss_sum, step_targets, step_tokens, one_off)  # each step: on the device, no sync
    figures = window.close(dist)                          # each log line: loss, accuracy, tok/s, ms/step
    log(train_line(record, total_steps, where, figures["ms_per_step"]))
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sftune.dist import Dist


@dataclass
class OneOffs:
    """The steps of this process whose time was mostly a one-off: a CUDA graph captured or a batch shape compiled
    (the first step of each shape). The log's pace leaves them out, time and tokens alike; a metrics record carries
    their totals so that a benchmark can leave them out of its own window too."""

    seconds: float = 0.0
    steps: int = 0
    tokens: int = 0
    padded_tokens: int = 0

    def add(self, seconds: float, tokens: int, padded_tokens: int) -> None:
        self.seconds, self.steps = self.seconds + seconds, self.steps + 1
        self.tokens, self.padded_tokens = self.tokens + tokens, self.padded_tokens + padded_tokens

    def record(self) -> dict:
        return {"compile_s": round(self.seconds, 3), "compile_steps": self.steps, "compile_tokens": self.tokens,
                "compile_padded_tokens": self.padded_tokens}


class LogWindow:
    """What the log line reports: token-weighted loss, token accuracy and throughput since the last log line.
    Time spent evaluating and saving is kept out of the throughput, and so is a step that captured or compiled a
    new batch shape (its time and its tokens: `add`'s `one_off`), unless the window holds no other step (then the
    pace is those steps' own, their one-off time included: never tokens over a time that left out their step).

    Under torchrun each rank sums its own targets' losses and hits; a checkpoint keeps the sums over all ranks,
    and a resumed run gives them back to rank 0 alone (the all-reduce at the next log line adds the rest)."""

    def __init__(self, saved: dict, dist: Dist, loss_model):
        mine = dist.is_main  # the saved sums are all ranks' together
        self.loss = torch.full((), saved.get("loss", 0.0) if mine else 0.0, device=dist.device)  # on the device
        self.steps, self.targets, self.tokens = saved.get("steps", 0), saved.get("targets", 0), saved.get("tokens", 0)
        self.correct = saved.get("correct", 0) if mine else 0  # argmax hits (the loss module counts them)
        self.router = saved.get("router", 0.0) if mine else 0.0  # load-balancing loss x targets (mixture of experts)
        self.loss_model = loss_model
        self._new_pace()

    def add(self, loss_sum: torch.Tensor, targets: int, tokens: int, one_off: float | None = None) -> None:
        """A step's sums; `one_off`: the seconds of this step that captured or compiled (left out of the pace)."""
        self.loss += loss_sum
        self.steps, self.targets, self.tokens = self.steps + 1, self.targets + targets, self.tokens + tokens
        if one_off is None:
            self.paced_steps, self.paced_tokens = self.paced_steps + 1, self.paced_tokens + tokens
        else:
            self.start += one_off
            self.one_off_s += one_off
            self.one_off_steps, self.one_off_tokens = self.one_off_steps + 1, self.one_off_tokens + tokens

    def exclude(self, seconds: float) -> None:
        self.start += seconds

    def close(self, dist: Dist) -> dict:
        """The window's figures: token-weighted `loss` over all ranks' targets, `token_accuracy`, `tokens_per_s`,
        `ms_per_step`, and for a mixture of experts `router_loss` (its load-balancing loss, target-weighted, before
        the coefficient); then a new window starts. note: .item() syncs (and the all-reduce under torchrun); once
        per log line."""
        seconds = time.perf_counter() - self.start
        steps, tokens = self.paced_steps, self.paced_tokens  # (a resumed window's steps before the checkpoint:
        if not steps:  # neither, their time is another process's)
            steps, tokens, seconds = self.one_off_steps, self.one_off_tokens, seconds + self.one_off_s
        seconds = max(seconds, 1e-9)
        loss_sum, correct, router = self.totals(dist)
        targets = max(self.targets, 1)
        result = {"loss": loss_sum / targets, "token_accuracy": correct / targets, "tokens_per_s": tokens / seconds,
                  "ms_per_step": 1000 * seconds / max(steps, 1)}
        if self.loss_model.router is not None:
            result["router_loss"] = router / targets
        self.loss.zero_()
        self.steps, self.targets, self.tokens, self.correct, self.router = 0, 0, 0, 0, 0.0
        self._new_pace()
        return result

    def _new_pace(self) -> None:
        """The window's clock from now, and its pace's counts: the steps of this process timed in it, and those
        whose time was a one-off (left out)."""
        self.start = time.perf_counter()
        self.paced_steps = self.paced_tokens = self.one_off_steps = self.one_off_tokens = 0
        self.one_off_s = 0.0

    def totals(self, dist: Dist) -> tuple[float, int, float]:
        """(sum of token losses, argmax hits, load-balancing loss x targets) over all ranks: a collective (targets
        and tokens are global already)."""
        self.correct += self.loss_model.take_correct()
        self.router += self.loss_model.take_router_loss()
        return (dist.all_reduce_sum(self.loss.clone()).item(), dist.all_reduce_sum(self.correct),
                dist.all_reduce_sum(self.router) if self.loss_model.router is not None else 0.0)

    def saved(self, dist: Dist) -> dict:
        """What a checkpoint keeps: the sums over all ranks (a collective)."""
        loss_sum, correct, router = self.totals(dist)
        return {"loss": loss_sum, "steps": self.steps, "targets": self.targets, "tokens": self.tokens,
                "correct": correct, "router": router}


def eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_line(record: dict, total_steps: int, where: str, ms_per_step: float) -> str:
    """The human log line of a metrics.jsonl "train" record."""
    return (f"step {record['step']:>6,}/{total_steps:,} | {where} | loss {record['loss']:.4f} "
            f"| acc {record['token_accuracy']:.3f} "
            + (f"| router {record['router_loss']:.4f} " if "router_loss" in record else "")
            + f"| lr {record['lr']:.2e} | {record['tokens_per_s']:,.0f} tok/s | {ms_per_step:,.0f} ms/step "
            f"| {record['tokens']:,} tokens | eta {eta(record['eta_s'])}"
            + (f" | {record['peak_memory_gb']:.1f} GiB peak" if "peak_memory_gb" in record else "")
            + (f" | MFU {100 * record['mfu']:.1f}%" if "mfu" in record else ""))
