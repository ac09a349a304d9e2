"""The one place that knows about ranks: which device, who writes, who prepares data first,
what is summed across processes, when gradients are synchronised, whether all agree to stop.

In one process (no `torchrun`) every helper is a no-op: `all_reduce_sum(x)` is `x`,
`main_first()` just runs its block, `no_sync` does nothing. Everything else asks the
`Dist` object instead of reading `RANK` or calling `torch.distributed` itself.

    >>> d = Dist()                      # a single process
    >>> (d.rank, d.world_size, d.is_main, d.all_reduce_sum(7), d.any(False))
    (0, 1, True, 7, False)

Under `torchrun` the environment names this process's RANK, LOCAL_RANK and WORLD_SIZE;
`init_dist` then starts the process group (NCCL on CUDA, gloo on CPU) and pins the
device to `cuda:LOCAL_RANK`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

from sftune.errors import SftuneError


def env_rank() -> int:
    """This process's global rank as torchrun sets it (0 when not distributed); for code that
    runs before `init_dist` (the console)."""
    return int(os.environ.get("RANK", "0"))


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: Any = "cpu"  # torch.device of this process (torch is imported lazily: the CLI's config errors stay instant)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed

            torch.distributed.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (it prepares data and writes caches); the others wait,
        then run it and find the cache written."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def all_reduce_sum(self, value):
        """Sum of `value` (a number or a tensor on this process's device) over all ranks."""
        if not self.distributed:
            return value
        import torch

        if isinstance(value, torch.Tensor):
            torch.distributed.all_reduce(value)
            return value
        t = torch.tensor(value, dtype=torch.float64 if isinstance(value, float) else torch.int64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.item()  # note: syncs with the device

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank says True (a stop signal seen by one rank stops all at the
        same step)."""
        return bool(self.all_reduce_sum(int(flag))) if self.distributed else flag

    def no_sync(self, model, last_micro_batch: bool):
        """Skip the gradient all-reduce on every micro-batch but the step's last (DDP's `no_sync`)."""
        if self.distributed and not last_micro_batch and hasattr(model, "no_sync"):
            return model.no_sync()
        return contextlib.nullcontext()

    def shard(self, items: list) -> list:
        """This rank's share of one global step's items (every world_size-th, from `rank`)."""
        return items[self.rank :: self.world_size] if self.distributed else items

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed

        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def wrap(self, module, strategy: str):
        """The module as training sees it: itself in one process, DDP-wrapped under torchrun."""
        if not self.distributed:
            return module
        if strategy == "fsdp":
            raise SftuneError("--strategy fsdp is not available yet; use --strategy ddp (each rank holds the whole "
                              "model)")
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def close(self) -> None:
        import torch.distributed

        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_dist(device_name: str) -> Dist:
    """The run's `Dist`: the device (`cuda:LOCAL_RANK` under torchrun) and, with WORLD_SIZE > 1,
    the process group. `device_name` is the config's device: auto, cpu or cuda."""
    import torch

    from sftune.runtime import resolve_device

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Dist(rank, local_rank, world_size, device)
