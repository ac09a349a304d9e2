"""Where a run's metrics go besides `metrics.jsonl`: TensorBoard (the default), Weights & Biases, or nowhere.

    sftune train --config configs/quickstart.yaml        # also writes runs/quickstart/tensorboard/
    tensorboard --logdir runs/                            # every run's curves side by side
    sftune train ... --report-to wandb                    # needs `pip install wandb` (WANDB_MODE=offline works)
    sftune train ... --report-to none

`metrics.jsonl` stays the record; every line written to it is also sent here: train lines as scalars under
`train/`, evaluations under `eval/`, sample generations as text under `samples/`. A resumed run continues the
same curves without duplicate points: TensorBoard hides the events the interrupted process wrote after the
checkpoint's step (`purge_step`), and W&B resumes the same run by its id.
"""

from __future__ import annotations

from pathlib import Path

from sftune.errors import SftuneError

TB_DIR = "tensorboard"
# metrics.jsonl keys sent as scalars, by record type: {key: tag}
SCALARS = {
    "train": {"loss": "train/loss", "token_accuracy": "train/token_accuracy", "lr": "train/lr",
              "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s", "tokens": "train/tokens_seen",
              "epoch": "train/epoch", "peak_memory_gb": "train/peak_memory_gb", "mfu": "train/mfu",
              "router_loss": "train/router_loss"},
    "eval": {"val_loss": "eval/loss", "val_ppl": "eval/perplexity", "val_token_accuracy": "eval/token_accuracy"},
}


def check_report_to(report_to: str) -> None:
    """Fail before training when the chosen tracker is not installed."""
    if report_to == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise SftuneError("--report-to wandb needs the wandb package: pip install wandb (or --report-to "
                              "tensorboard, the default, or none)") from None


class Tracker:
    """Sends metrics records to TensorBoard or W&B; a no-op for `none` (and off rank 0: only rank 0 makes one)."""

    def __init__(self, report_to: str, out: Path, run_id: str, config: dict, resumed_step: int | None):
        self.report_to, self.writer, self.wandb = report_to, None, None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events at or after it (written by a process that was then interrupted) are dropped
            self.writer = SummaryWriter(str(out / TB_DIR), purge_step=None if resumed_step is None else resumed_step + 1)
        elif report_to == "wandb":
            import wandb

            self.wandb = wandb.init(project="sftune", name=out.name, dir=str(out), id=run_id, resume="allow",
                                    config=config)

    def write(self, record: dict) -> None:
        step = record.get("step")
        scalars = {tag: record[key] for key, tag in SCALARS.get(record.get("type"), {}).items() if key in record}
        for name, loss in record.get("val_loss_by_dataset", {}).items():  # a mixture's datasets, one curve each
            scalars[f"eval/loss/{name}"] = loss
        text = None
        if record.get("type") == "sample":  # markdown: the prompt in bold, then the completion
            text = (f"samples/{record['index']}", f"**{record['prompt']}** {record['completion']}")
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
            if text:
                self.writer.add_text(*text, step)
        if self.wandb is not None and (scalars or text):
            self.wandb.log({**scalars, **({text[0]: text[1]} if text else {})}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
