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
from pathlib import Path
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

    sharded: bool = False  # FSDP: parameters are DTensor shards (set by `wrap`)
    mixed_precision: str = ""  # FSDP: how `wrap` gathers weights and reduces gradients, when not in their dtype
    owns_group: bool = False  # this run started the process group (and so ends it in `close`)
    timeout_s: int = 1800  # how long a collective waits for the slowest rank (--dist-timeout)

    def barrier(self) -> None:
        """Wait for every rank (rank 0 may be preparing data, or writing a model: a wait past --dist-timeout is a
        clear error rather than torch's)."""
        if self.distributed:
            import torch.distributed

            try:
                torch.distributed.barrier()
            except Exception as e:
                if "timed out" not in str(e).lower() and "timeout" not in type(e).__name__.lower():
                    raise
                raise SftuneError(f"rank {self.rank} waited more than {self.timeout_s} s for the other ranks (rank "
                                  f"0 preparing the data or writing a model takes longer, or a rank is stuck); "
                                  f"raise --dist-timeout (dist_timeout in YAML), e.g. --dist-timeout "
                                  f"{self.timeout_s * 4}") from None

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (it prepares data and writes caches); then the first rank of each other
        node (a node whose cache is its own disk prepares once, not once per GPU); then the rest, which find the
        cache written. Every rank passes the same two barriers."""
        if not self.is_main:
            self.barrier()  # 1: rank 0 is done
            if self.local_rank != 0:
                self.barrier()  # 2: every node's first rank is done
        yield
        if self.is_main:
            self.barrier()
            self.barrier()
        elif self.local_rank == 0:
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
        return self.any_each(flag)[0]

    def any_each(self, *flags: bool) -> list[bool]:
        """`any` for several flags, in one collective."""
        if not self.distributed:
            return list(flags)
        import torch

        summed = self.all_reduce_sum(torch.tensor([int(f) for f in flags], dtype=torch.int64, device=self.device))
        return [bool(v) for v in summed.tolist()]

    def no_sync(self, model, last_micro_batch: bool):
        """Reduce gradients on the step's last micro-batch only (DDP's `no_sync`; FSDP's gradient sync switch)."""
        if self.distributed and hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            model.set_requires_gradient_sync(last_micro_batch)
        elif self.distributed and not last_micro_batch and hasattr(model, "no_sync"):
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

    def from_main(self, obj):
        """Rank 0's `obj` (picklable), on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed

        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def wrap(self, module, strategy: str, precision: str = "fp32"):
        """The module as training sees it: itself in one process; under torchrun DDP-wrapped, or with
        strategy fsdp sharded in place by FSDP2 (`fully_shard` on each transformer block, then the root).

        FSDP in bf16: the fp32 shards are all-gathered as bf16 (half the traffic and memory of the gathered
        weights; the matrix products run in bf16 under autocast either way) and the gradients are reduce-scattered
        and accumulated in fp32 (accelerate's bf16 policy reduces them in bf16: a sum over ranks that loses bits)."""
        if not self.distributed:
            return module
        if strategy == "fsdp":
            import torch
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mesh = init_device_mesh(self.device.type, (self.world_size,))
            policy = MixedPrecisionPolicy()
            if precision == "bf16":
                policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                self.mixed_precision = "weights gathered in bf16, gradients reduced in fp32"
            from sftune.blocks import transformer_blocks

            blocks = transformer_blocks(module.model)
            if not blocks:
                raise SftuneError(f"--strategy fsdp: cannot find the transformer blocks of "
                                  f"{type(module.model).__name__} to shard; use --strategy ddp")
            whole = module.state_dict() if self.is_main else {}  # (rank 0's weights; views, not copies)
            for block in blocks:
                fully_shard(block, mesh=mesh, mp_policy=policy)
            fully_shard(module, mesh=mesh, mp_policy=policy)  # the root: embeddings, final norm and the output head
            self.sharded = True
            self.from_rank0(module, whole)
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def from_rank0(self, module, whole: dict) -> None:
        """Give every rank its shards of rank 0's weights (`whole`: rank 0's full state dict, empty elsewhere) and
        rank 0's buffers. The other ranks' modules may be weightless (meta device): they get memory first."""
        import torch
        import torch.distributed
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if not self.is_main:
            module.to_empty(device=self.device)
        set_model_state_dict(module, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        with torch.no_grad():
            for buffer in module.buffers():  # (buffers are not sharded; those not in the state dict are not sent)
                torch.distributed.broadcast(buffer, src=0)

    def close(self) -> None:
        import torch.distributed

        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def abandon(self) -> None:
        """This rank leaves the other ranks waiting in a collective it cannot join (it ran out of memory): its process
        group is left to the process's exit, not ended by `close` (which would wait for them)."""
        self.owns_group = False


def init_dist(device_name: str, timeout_s: int = 1800) -> Dist:
    """The run's `Dist`: the device (`cuda:LOCAL_RANK` under torchrun) and, with WORLD_SIZE > 1,
    the process group, whose collectives wait `timeout_s` for the slowest rank. `device_name` is the config's
    device: auto, cpu or cuda."""
    import datetime

    import torch
    import torch.distributed

    from sftune.runtime import resolve_device

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        check_gpu_count(local_rank, torch.cuda.device_count())
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = world_size > 1 and not torch.distributed.is_initialized()  # else a caller's group is used, and kept
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, device_id=device if device.type == "cuda" else None,
                                             timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank, local_rank, world_size, device, owns_group=owns, timeout_s=timeout_s)


def restart_warning(env: dict[str, str] | None = None) -> str | None:
    """torchrun --max-restarts N with torchrun's shared store: after a restart the new ranks can wait for each
    other for ever before they meet (a stale address in that store, torch issue 135712): 1 in 4 restarts on CPU
    here, 2 in 4 under load; with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 given to torchrun, 10 of 10 resumed
    (README, "Several GPUs and nodes"). A warning for such a launch (the ranks see torchrun's environment), at its
    first start, where it can still be acted on."""
    env = os.environ if env is None else env
    restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS") or 0)
    if restarts < 1 or env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or \
            env.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    return (f"warning: torchrun --max-restarts {restarts} shares its rendezvous store with the ranks, and after a "
            f"restart the new ranks can wait for each other for ever (torch issue 135712: 1 in 4 restarts here); "
            f"start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment")


TORCHRUN_GRACE_S = 30  # torchrun's agent kills the ranks this long after it passes on a stop signal (its default;
# torch before 2.12: always)
LAUNCH_GRACE_S = 600  # ... and `sftune train --nproc-per-node`'s agent (`launch.py`), where torch lets it: a big
# model's save can take minutes, and a scheduler's grace (SLURM's --signal, a cloud's preemption notice) may be longer


def shutdown_timeout_supported() -> bool:
    """Whether this torch's torchrun takes `--shutdown-timeout` (and TORCH_ELASTIC_SHUTDOWN_TIMEOUT): 2.12 on."""
    from torch.distributed.launcher.api import LaunchConfig

    return "shutdown_timeout" in LaunchConfig.__dataclass_fields__


def agent_argv() -> list[str]:
    """The command line of this process's parent (under torchrun: the agent that started the ranks), Linux only."""
    try:
        return Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def stop_grace_s(env: dict[str, str] | None = None, argv: list[str] | None = None,
                 supported: bool | None = None) -> float | None:
    """Under torchrun, the seconds its agent gives the ranks, after it passes on SIGTERM, SIGINT or SIGHUP, to stop
    before it kills them: `--shutdown-timeout` in the agent's command line (`argv`), else PET_SHUTDOWN_TIMEOUT or
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT (which the ranks inherit), else 30; 30 on a torch before 2.12, which has none of
    them. None when this process is not a torchrun rank, or the setting does not read as a number."""
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" not in env:
        return None
    if not (shutdown_timeout_supported() if supported is None else supported):
        return TORCHRUN_GRACE_S
    argv = agent_argv() if argv is None else argv
    value = env.get("PET_SHUTDOWN_TIMEOUT") or env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") or str(TORCHRUN_GRACE_S)
    for i, arg in enumerate(argv):
        for flag in ("--shutdown-timeout", "--shutdown_timeout"):
            if arg == flag and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
    try:
        return float(value)
    except ValueError:
        return None


def check_gpu_count(local_rank: int, gpus: int) -> None:
    """Each process of a node trains on GPU LOCAL_RANK: more processes than GPUs is a clear error (torch's is
    "invalid device ordinal"), said by the first process without one."""
    if local_rank < gpus:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    error = SftuneError(f"torchrun started more processes on this node than it has GPUs: this is LOCAL_RANK "
                        f"{local_rank}, and {gpus} GPU(s) are visible"
                        f"{f' (CUDA_VISIBLE_DEVICES={visible})' if visible is not None else ''}; launch one process "
                        f"a GPU: torchrun --nproc-per-node {gpus} (or --device cpu)")
    error.this_rank_only = local_rank == gpus  # (the others beyond it exit in silence)
    raise error


def reshard(model) -> None:
    """FSDP: every FSDP module's parameters back to their shards. The root stays unsharded after a forward without
    backward (an evaluation): its parameters are then views of the all-gather buffer, not shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
