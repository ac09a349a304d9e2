"""CUDA graphs of the training step's forward and backward, one per batch shape (`--compile graphs`).

A step of 32 short sentences (the seed's recipe) is about a millisecond of GPU work, but launching its few hundred
kernels one by one from Python takes tens of milliseconds: the GPU waits on the host. A CUDA graph records the
kernels of one micro-batch's forward and backward once, and replays them all with one launch. A graph holds fixed
shapes and fixed addresses, so:

- batches come in a handful of shapes (`batching.Padding`: widths rounded up, a fixed number of rows, a target
  slot at every position); padding is never in the loss, so the loss is the eager step's;
- each shape has input buffers that a batch is copied into, and its own graph, captured when the shape first comes
  (all graphs share one memory pool: a graph's intermediates live only inside its replay);
- gradients: for a model small for its card (`ASSIGN_SHAPES`), each graph writes its own fixed gradient tensors and
  the parameters' `.grad` point at the ones of the graph just replayed, so no pass zeroes them between steps and
  none adds them into a running sum (the eager step's `backward` into empty gradients does the same); a step of
  several micro-batches copies the first into a sum of its own and adds the others' there (the eager step's
  sums). A larger model keeps one set of gradient tensors that each replay adds into, zeroed in place between
  steps: one set of gradients, not one per batch shape;
- the step's scale (1 / its target count) is a device scalar the graph reads;
- in bf16 the matrix products' weights can be cast in one pass rather than one kernel each (`casts.py`: given by the
  training loop); the check below then compares the graph with an eager step made with autocast's own casts, and a
  graph that fails or differs is captured again without them.

Dropout draws from the CUDA generator through its graph-safe state: a replay draws what the same eager step would.
The warm-up and the capture run under a forked RNG (their token counts are put back; adding, with the step's scale
at 0: their gradients add nothing; assigning, into gradients of their own, then dropped), so capturing a graph
changes no number of the run. Once captured, the graph is replayed from the first warm-up's RNG state and must
give that eager step's loss (to 1e-3; assigning, the norm of its gradients too): a graph that would compute
something else is never used (the run goes on eagerly, or stops under `--compile graphs`).

    graphs = StepGraphs(loss_model, device, "bf16")
    total += graphs.run(batch, scale, first=i == 0)   # None when graphs are off for good: run it eagerly
    ...                                                # (between steps: zero_grad(set_to_none=graphs.assign))
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sftune.batching import HOST_KEYS, to_device
from sftune.casts import MatmulCasts
from sftune.console import log
from sftune.runtime import autocast

WARMUP_STEPS = 3  # eager runs on a side stream before a capture (cuBLAS handles, workspaces, lazy inits)
REPLAY_RTOL = 1e-3  # the check replay's loss (and gradient norm) against the first warm-up's (same inputs and draws)
ASSIGN_SHAPES = 8  # graphs assign their own gradients when this many sets of them fit in a quarter of the card


@dataclass
class Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # the graph reads its batch from these
    scale: torch.Tensor  # () fp32: what the summed loss is multiplied by before the backward
    loss: torch.Tensor  # () fp32: the batch's summed token loss, written by each replay
    grads: list[torch.Tensor | None] | None = None  # assigning graphs: the gradients each replay writes


def shape_key(batch: dict[str, torch.Tensor], keys: tuple[str, ...]) -> tuple:
    """What a graph is captured for (and a compiled step compiled for): the shapes of the tensors the step reads
    (`keys`: the loss module's `device_keys`, the very tensors a replay copies into its buffers), and for a model
    that reads the packed rows' sequence starts (`--attention varlen`) their longest sequence too (flash
    attention's grid is sized by it). Other models do not read the starts, whose count changes from batch to
    batch, so those make no new shapes."""
    return (tuple((k, tuple(batch[k].shape)) for k in keys if k in batch)
            + (tuple((k, batch[k]) for k in HOST_KEYS if k in batch) if "cu_seqlens" in keys else ()))


def why_not_graphs(device: torch.device, world_size: int, precision: str, gradient_checkpointing: bool) -> str | None:
    """Why CUDA graphs cannot run this configuration (None: they can)."""
    if device.type != "cuda":
        return "they need a CUDA GPU"
    if world_size > 1:
        return "under torchrun each rank's backward talks to the others (use --compile torch)"
    if precision == "fp16":
        return "fp16's loss scaler decides on the host at each step (bf16, on a GPU from Ampere on, has none)"
    if gradient_checkpointing:
        return "activation checkpointing saves and restores the RNG on the host during the backward"
    return None


def close(replayed: float, expected: float) -> bool:
    """A replay's figure against the eager step's: equal, within REPLAY_RTOL, or both NaN (weights already broken:
    the guard's business)."""
    both_nan = replayed != replayed and expected != expected
    return replayed == expected or abs(replayed - expected) <= REPLAY_RTOL * abs(expected) or both_nan


class StepGraphs:
    """Captures and replays one micro-batch's forward + backward per batch shape."""

    def __init__(self, loss_model, device: torch.device, precision: str, required: bool = False,
                 assign: bool | None = None, casts: MatmulCasts | None = None):
        self.loss_model, self.device, self.precision, self.required = loss_model, device, precision, required
        self.casts = casts  # the matrix products' weights cast in one pass (`casts.py`; checked at each capture)
        self.params = [p for p in loss_model.parameters() if p.requires_grad]
        grad_bytes = sum(p.numel() * p.element_size() for p in self.params)
        # (None: by size) each graph writes gradients of its own, assigned to the parameters after its replay: GPT-2
        # small's 0.5 GB a set on an 80 GB card, not a 1B model's 4.4 GB, nor GPT-2 small's on an 8 GB card
        card = torch.cuda.get_device_properties(device).total_memory
        self.assign = grad_bytes * ASSIGN_SHAPES <= card // 4 if assign is None else assign
        self.sums: list[torch.Tensor] | None = None  # assigning, a step of several micro-batches: their sum
        self.graphs: dict[tuple, Captured] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.failed: str | None = None
        loss_model.cache_cast = False  # the head's cast to bf16 is part of each graph, not a tensor kept between

    def run(self, batch: dict[str, torch.Tensor], scale: float, first: bool = True) -> torch.Tensor | None:
        """Add this micro-batch's gradients (times `scale`) to the step's (`first`: the step's first micro-batch,
        whose gradients start the step's; the caller emptied or zeroed them) and return its summed loss (a tensor
        the next replay of the same shape overwrites: use it at once); None when graphs are off (the caller runs
        the batch eagerly)."""
        if self.failed:
            return None
        key = shape_key(batch, self.loss_model.device_keys)
        captured = self.graphs.get(key)
        if captured is None:
            captured = self._capture(key, batch)
            if captured is None:
                return None
        if self.assign and not first:
            self._keep_sum()  # (before the replay: it may overwrite the gradients the parameters point at)
        for name, buffer in captured.inputs.items():
            if isinstance(buffer, torch.Tensor):
                buffer.copy_(batch[name], non_blocking=True)
        captured.scale.fill_(scale)
        captured.graph.replay()
        if self.assign:
            pairs = [(p, g) for p, g in zip(self.params, captured.grads) if g is not None]
            if first:
                for p, g in pairs:
                    p.grad = g
            else:
                torch._foreach_add_([p.grad for p, _ in pairs], [g for _, g in pairs])
        return captured.loss

    def _keep_sum(self) -> None:
        """Assigning, before a step's second micro-batch: its gradients so far into tensors of the step's own."""
        grads = [p.grad for p in self.params]
        if self.sums is not None and all(g is s for g, s in zip(grads, self.sums)):
            return
        if self.sums is None:
            self.sums = [torch.zeros_like(p) for p in self.params]
        for p, held, total in zip(self.params, grads, self.sums):
            if held is None:
                total.zero_()
            else:
                total.copy_(held)
            p.grad = total

    def _step(self, inputs: dict[str, torch.Tensor], scale: torch.Tensor, casts: bool = True) -> torch.Tensor:
        with autocast(self.device, self.precision, cache=False):  # (a cached cast would outlive the capture)
            loss = self.casts.call(self.loss_model, inputs) if casts and self.casts else self.loss_model(inputs)
        (loss * scale).backward()
        return loss.detach()

    def _capture(self, key: tuple, batch: dict[str, torch.Tensor]) -> Captured | None:
        started = time.perf_counter()
        held = [p.grad for p in self.params]  # assigning: the step's gradients so far, put back after the capture
        for p in self.params:  # adding: fixed gradient tensors, added into by every replay; assigning: none, so
            # that the warm-up's first backward makes the eager step's gradients and the capture's makes the graph's
            p.grad = None if self.assign else (torch.zeros_like(p) if p.grad is None else p.grad)
        counters = self.loss_model.counters()
        counted = [counter.clone() for counter in counters]
        inputs = to_device(batch, self.device, self.loss_model.device_keys)
        # adding: 0 during the warm-up and the capture, so the gradients get + 0; assigning: 1, whose gradients (the
        # first warm-up's and the check replay's) are compared and then dropped
        scale = torch.full((), 1.0 if self.assign else 0.0, device=self.device)
        generator = torch.cuda.default_generators[self.device.index if self.device.index is not None
                                                else torch.cuda.current_device()]
        clean = generator.clone_state()  # (see `_restore_generator`)
        try:
            with torch.random.fork_rng(devices=[self.device]):
                rng = torch.cuda.get_rng_state(self.device)
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    eager_loss = self._step(inputs, scale, casts=False)  # (the eager step's own casts: the check's
                    # reference for a graph whose weights are cast in one pass)
                    eager_norm = self._grad_norm() if self.assign else None
                    for _ in range(WARMUP_STEPS - 1):
                        self._step(inputs, scale)
                torch.cuda.current_stream(self.device).wait_stream(side)
                if self.assign:
                    for p in self.params:
                        p.grad = None
                torch.cuda.empty_cache()  # the warm-up's activations, cached for the side stream, go back first
                graph = torch.cuda.CUDAGraph()
                # thread_local: the prefetching thread may pin host memory (a CUDA call) while this thread captures
                with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                    loss = self._step(inputs, scale)
                grads = [p.grad for p in self.params] if self.assign else None
                # a check, once per shape: a replay from the first warm-up's RNG state computes its loss (and,
                # assigning, the norm of its gradients)
                torch.cuda.set_rng_state(rng, self.device)
                graph.replay()
                replayed, expected = float(loss), float(eager_loss)  # note: a sync, once per shape
                norms = (float(self._grad_norm()), float(eager_norm)) if self.assign else None
        except Exception as e:  # noqa: BLE001 (any capture failure means: run this model eagerly)
            _restore_generator(generator, clean)
            self.graphs.clear()  # (graphs captured before draw from the generator state replaced: captured again)
            self._put_back(held)
            return self._without_casts(key, batch, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        self._put_back(held)
        for counter, before in zip(counters, counted):  # the warm-up's and the check's argmax hits (and router
            counter.copy_(before)  # losses) are not the run's
        if not close(replayed, expected):
            return self._without_casts(key, batch, f"a replay gave the loss {replayed!r}, the eager step {expected!r}")
        if norms is not None and not close(*norms):
            return self._without_casts(key, batch, f"a replay's gradients have the norm {norms[0]!r}, the eager "
                                                   f"step's {norms[1]!r}")
        captured = Captured(graph, inputs, scale, loss, grads)
        self.graphs[key] = captured
        seconds = time.perf_counter() - started
        shape = " x ".join(map(str, batch["input_ids"].shape))
        log(f"CUDA graph {len(self.graphs)} captured for batches of {shape} tokens ({seconds:.2f} s)")
        return captured

    def _grad_norm(self) -> torch.Tensor:
        """The L2 norm of the trained weights' gradients, on the device."""
        grads = [p.grad for p in self.params if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)

    def _put_back(self, held: list[torch.Tensor | None]) -> None:
        """Assigning: the step's gradients from before the capture, where the parameters find them."""
        if self.assign:
            for p, grad in zip(self.params, held):
                p.grad = grad

    def _without_casts(self, key: tuple, batch: dict[str, torch.Tensor], reason: str) -> Captured | None:
        """A capture that failed, or whose replay differs from the eager step: with the one-pass casts, captured
        again with autocast's own (they are what is new; said once); without, graphs are given up."""
        if self.casts is None:
            return self._give_up(reason)
        self.casts = None
        log(f"warning: a CUDA graph with the matrix products' weights cast in one pass failed ({reason}); capturing "
            f"with autocast's own casts from now on")
        return self._capture(key, batch)

    def _give_up(self, reason: str) -> None:
        from sftune.errors import SftuneError

        torch.cuda.synchronize(self.device)
        self.failed = reason
        self.graphs.clear()
        if self.required:
            raise SftuneError(f"--compile graphs: capturing a CUDA graph of the training step failed ({reason}); "
                              f"use --compile off or torch")
        log(f"warning: capturing a CUDA graph of the training step failed ({reason}); training continues eagerly "
            f"(--compile off skips the attempt)")
        self.loss_model.cache_cast = True
        return None


def _restore_generator(generator: torch.Generator, clean) -> None:
    """The CUDA generator as it was before a capture that failed. A capture marks the generator's state as capturing
    and only a capture that ends well unmarks it; after one that raised, the next eager draw (dropout in the steps
    that go on eagerly) would stop the run ("Offset increment outside graph capture encountered unexpectedly", torch
    2.11 on an H100 with --compile-blocks). `clean` is a copy taken before the capture; fork_rng has put the seed and
    offset back, and they are kept. The generator then holds another state object than the one the graphs captured
    before hold (a replay advances the state its graph was captured with): those are dropped by the caller."""
    state = generator.get_state()
    generator.graphsafe_set_state(clean)
    generator.set_state(state)
