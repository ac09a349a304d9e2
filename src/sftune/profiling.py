"""`--profile-steps A-B`: torch.profiler over optimizer steps A to B of a run.

It writes <output_dir>/profile/trace.json.gz (a Chrome trace: Perfetto or chrome://tracing opens it) and
summary.txt: the steps' wall time, how much of it the GPU was busy (the kernels', copies' and fills' own time, which
says whether the step waits on the GPU or on the host), and the operators that took the most GPU and CPU time.
Under torchrun each rank profiles its own process (`trace-rank<N>.json.gz`, `summary-rank<N>.txt`).

    profiler = StepProfiler((20, 30), out / "profile", dist)
    profiler.before(step)   # at the top of each optimizer step (1-based: the step about to run)
    profiler.after(step)    # once the step has run; stops and writes after step B
    profiler.close()        # at the end of the loop (a run shorter than B writes what it profiled)
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from sftune.console import log, stderr_muted
from sftune.dist import Dist


class StepProfiler:
    def __init__(self, steps: tuple[int, int], directory: Path, dist: Dist):
        self.first, self.last = steps
        self.directory, self.dist = directory, dist
        self.profiler: torch.profiler.profile | None = None
        self.started, self.from_step = 0.0, 0

    def before(self, step: int) -> None:
        """Start before step `first` (or the first step of a resumed run that starts inside the range)."""
        if self.profiler is not None or not self.first <= step <= self.last:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.dist.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities)
        self.sync()
        with stderr_muted():  # (kineto's "USDT: ... profiler_start" line)
            self.profiler.start()
        self.started, self.from_step = time.perf_counter(), step

    def after(self, step: int) -> None:
        if self.profiler is not None and step >= self.last:
            self.finish(step)

    def close(self, step: int | None = None) -> None:
        """The loop ended: write what was profiled (`step`: the last step run), or drop it (None: an error)."""
        if self.profiler is None:
            return
        if step is None:
            with stderr_muted():
                self.profiler.stop()
            self.profiler = None
            return
        self.finish(step)

    def sync(self) -> None:
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)

    def finish(self, step: int) -> None:
        self.sync()
        seconds = time.perf_counter() - self.started
        profiler, self.profiler = self.profiler, None
        with stderr_muted():
            profiler.stop()
        self.directory.mkdir(parents=True, exist_ok=True)
        suffix = f"-rank{self.dist.rank}" if self.dist.distributed else ""
        trace = self.directory / f"trace{suffix}.json.gz"
        profiler.export_chrome_trace(str(trace))
        text = summary(profiler, self.from_step, step, seconds, self.dist.device.type == "cuda")
        (self.directory / f"summary{suffix}.txt").write_text(text)
        if self.dist.is_main:
            log(f"profile of steps {self.from_step:,}-{step:,}: {self.directory} ({text.splitlines()[1]})")


def summary(profiler, first: int, last: int, seconds: float, cuda: bool, rows: int = 25) -> str:
    """The summary.txt of a profile: wall time a step, the GPU's busy time, the top operators."""
    steps = last - first + 1
    averages = profiler.key_averages()
    lines = [f"steps {first:,}-{last:,} ({steps} optimizer steps), device synchronized at both ends",
             f"wall {1000 * seconds / steps:.2f} ms a step"]
    if cuda:
        busy = sum(event.self_device_time_total for event in averages) / 1e6  # microseconds -> s
        lines[1] += (f", GPU busy {1000 * busy / steps:.2f} ms a step ({100 * busy / seconds:.0f}%: "
                     "kernels, copies and fills)")
        lines += ["", "by GPU time (self):", averages.table(sort_by="self_device_time_total", row_limit=rows)]
    lines += ["", "by CPU time (self):", averages.table(sort_by="self_cpu_time_total", row_limit=rows)]
    return "\n".join(lines) + "\n"
