"""The optimizer steps of a run: which rows each step holds, in what order, on which rank.

The plan is global and seeded (`plan_steps`): a step holds the same rows whatever the world size, and each rank
collates its share of each micro-batch (`step_of`). A step source yields the steps from where a run stands, for
a prepared split held in memory (`InMemorySteps`, one epoch planned at a time) or for a stream read chunk by chunk
(`StreamedSteps`); the loop sees one interface (`StepSource`).

    steps = InMemorySteps(cfg, data, max_length, tokenizer.pad_token_id, dist)
    for step in steps.remaining(state): ...        # Step: this rank's collated micro-batches, the step's tokens
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterator, Protocol

from sftune.batching import EAGER, Padding, batch_shape, chunk_rows_for, collate, collate_packed, epoch_steps, \
    heaviest_rows, packed_epoch_steps
from sftune.checkpoint import TrainState
from sftune.config import SFTConfig
from sftune.data import Examples, PreparedData
from sftune.data.formats import Layout
from sftune.dist import Dist
from sftune.errors import SftuneError, on_every_rank

def plan_steps(lengths, cfg: SFTConfig, max_length: int, key: int, world_size: int = 1) -> list[list]:
    """Optimizer steps over examples of these lengths, each a list of micro-batches (rows of example
    indices): packed, or cut from length-grouped (or shuffled) rows; `key` seeds the order.

    The plan is global: a micro-batch holds `batch_size x world_size` rows (each rank then takes its share,
    `Dist.shard`), so the same rows make each optimizer step whatever the world size."""
    rows = cfg.batch_size * world_size
    tokens = cfg.batch_tokens * world_size if cfg.batch_tokens else None
    if cfg.packing:
        return packed_epoch_steps(lengths, max_length, rows, cfg.grad_accum, cfg.seed, key, tokens)
    return epoch_steps(lengths, rows, cfg.grad_accum, cfg.seed, key, tokens, cfg.group_by_length)


def epoch_plan(data: PreparedData, cfg: SFTConfig, max_length: int, epoch: int, world_size: int = 1) -> list[list]:
    """`plan_steps` over the examples an epoch trains on: all of them, or a weighted mixture's selection
    (`PreparedData.epoch_selection`); the steps hold indices into `data.train` either way."""
    picked = data.epoch_selection(epoch, cfg.seed)
    if picked is None:
        return plan_steps(data.train.lengths, cfg, max_length, epoch, world_size)
    plan = plan_steps(data.train.lengths[picked], cfg, max_length, epoch, world_size)
    if cfg.packing:  # micro-batches of packed rows, each an array of example indices
        return [[[picked[row] for row in micro] for micro in step] for step in plan]
    return [[picked[micro] for micro in step] for step in plan]


def check_batch_tokens(cfg: SFTConfig, examples: Examples) -> None:
    longest = int(examples.lengths.max()) if len(examples) else 0
    if cfg.batch_tokens is not None and cfg.batch_tokens < longest:
        raise on_every_rank(SftuneError(f"batch_tokens {cfg.batch_tokens} is smaller than the longest training "
                                        f"example ({longest} tokens); raise --batch-tokens or lower --max-length"))


# --- step sources: where the optimizer steps come from -------------------------------


@dataclass
class Step:
    micro_batches: list[dict]  # this rank's collated micro-batches (host tensors)
    epoch: int
    last_in_epoch: bool
    tokens: int  # real (non-pad) tokens of the whole step, all ranks
    padded_tokens: int  # tokens computed for the whole step by all ranks, padding included (rows x width of each batch)
    stream: dict | None = None  # streaming: the position after this step


def step_of(examples: Examples, step_rows: list, dist: Dist, packed: bool, pad_id: int, epoch: int, last: bool,
            stream: dict | None = None, padding: Padding = EAGER) -> Step:
    """Collate this rank's share of each micro-batch of a global step, and count the step's tokens."""
    make_batch = collate_packed if packed else collate
    lengths = examples.lengths
    tokens = padded = 0
    for rows in step_rows:  # a micro-batch: example indices, or packed rows of them
        sizes = [int(lengths[r].sum()) for r in rows] if packed else [int(lengths[r]) for r in rows]
        tokens += sum(sizes)
        # what every rank computes: its share (`Dist.shard`), padded to its own longest row (or static shape)
        padded += sum(math.prod(batch_shape(sizes[r :: dist.world_size], padding)) for r in range(dist.world_size))
    batches = [make_batch(examples, dist.shard(rows), pad_id, padding) for rows in step_rows]
    return Step(batches, epoch, last, tokens, padded, stream)


class StepSource(Protocol):
    """Optimizer steps in order, across epochs, from where a run stands."""

    validation: Examples
    validation_groups: list[tuple[str, int]]  # a mixture's datasets: (name, validation examples), in order
    layout: Layout
    total_steps: int
    steps_per_epoch: int | None  # None when streamed (unknown)
    world_size: int

    def remaining(self, state: TrainState) -> Iterator[Step]: ...


def _mark_last(items: Iterator) -> Iterator[tuple[object, bool]]:
    """(item, is_last) pairs: one item of look-ahead."""
    items = iter(items)
    prev = next(items, _END := object())
    if prev is _END:
        return
    for item in items:
        yield prev, False
        prev = item
    yield prev, True


class InMemorySteps:
    """Steps over a prepared split: each epoch planned when it starts (only its index arrays are held),
    so `--epochs 1000000 --max-steps 2` plans one epoch, not a million."""

    def __init__(self, cfg: SFTConfig, data: PreparedData, max_length: int, pad_id: int, dist: Dist):
        self.cfg, self.data, self.train, self.max_length = cfg, data, data.train, max_length
        self.pad_id, self.dist = pad_id, dist
        self.padding = EAGER  # (static shapes for graphs and compile: set by `_build`)
        self.validation, self.layout, self.world_size = data.validation, data.layout, dist.world_size
        self.validation_groups = getattr(data, "validation_groups", [])
        picked = data.epoch_selection(0, cfg.seed)
        per_epoch = len(self.train) if picked is None else len(picked)
        if per_epoch < cfg.batch_size * cfg.grad_accum * dist.world_size:
            ranks = f" x {dist.world_size} ranks" if dist.distributed else ""
            weighted = "" if picked is None else f" (the datasets' weights give {per_epoch:,} an epoch)"
            raise on_every_rank(SftuneError(  # (every rank plans from the same data: rank 0 says it)
                f"the training split has {len(self.train):,} examples after filtering{weighted}, fewer than one "
                f"optimizer step of {cfg.batch_size} x {cfg.grad_accum}{ranks}; lower --batch-size or --grad-accum, "
                f"or add data"))
        check_batch_tokens(cfg, self.train)
        self._plans: dict[int, list] = {}
        self.steps_per_epoch = len(self.plan(0))
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else self._count(cfg.epochs)

    def plan(self, epoch: int) -> list:
        if epoch not in self._plans:
            self._plans = {epoch: epoch_plan(self.data, self.cfg, self.max_length, epoch,
                                             self.dist.world_size)}  # keep one epoch's plan
        return self._plans[epoch]

    def _count(self, epochs: int) -> int:
        """Steps in `epochs` epochs. Only packing and a token cap make epochs differ in length."""
        if not self.cfg.packing and self.cfg.batch_tokens is None:
            return self.steps_per_epoch * epochs
        return sum(len(epoch_plan(self.data, self.cfg, self.max_length, e, self.dist.world_size))
                   for e in range(epochs))

    def remaining(self, state: TrainState) -> Iterator[Step]:
        return self._steps(state.epoch, state.step_in_epoch)  # (read now: the steps may be made in another thread)

    def heaviest(self) -> dict:
        """This rank's share of the heaviest micro-batch a step can hold: the batch_size x world size longest
        training examples (as many of them as --batch-tokens allows), collated as a step's are (`--memory-check`).
        A micro-batch is padded to its longest row, so none is larger."""
        tokens = self.cfg.batch_tokens * self.dist.world_size if self.cfg.batch_tokens else None
        rows = heaviest_rows(self.train.lengths, self.cfg.batch_size * self.dist.world_size, tokens)
        return collate(self.train, self.dist.shard(rows), self.pad_id, self.padding)

    def _steps(self, first_epoch: int, first_step: int) -> Iterator[Step]:
        for epoch in itertools.count(first_epoch):
            start = first_step if epoch == first_epoch else 0
            plan = self.plan(epoch)
            for i in range(start, len(plan)):
                yield step_of(self.train, plan[i], self.dist, self.cfg.packing, self.pad_id, epoch, i == len(plan) - 1,
                              padding=self.padding)


class StreamedSteps:
    """Steps over a stream, chunk by chunk (`data.streaming`); the number of epochs is `epochs`, or as many
    as `max_steps` needs; a stream that yields nothing in an epoch ends the run."""

    def __init__(self, cfg: SFTConfig, data, max_length: int, pad_id: int, dist: Dist):
        self.cfg, self.data, self.max_length, self.pad_id, self.dist = cfg, data, max_length, pad_id, dist
        self.padding = EAGER  # (static shapes for graphs and compile: set by `_build`)
        self.validation, self.layout, self.world_size = data.validation, data.layout, dist.world_size
        self.validation_groups = getattr(data, "validation_groups", [])
        self.total_steps, self.steps_per_epoch = cfg.max_steps, None

    def remaining(self, state: TrainState) -> Iterator[Step]:
        return self._steps(state.epoch, state.stream)  # (read now: the steps may be made in another thread)

    def _steps(self, first_epoch: int, stream: dict | None) -> Iterator[Step]:
        from sftune.data.streaming import StreamPosition

        # (global rows: the chunks, the shuffle buffer and so the steps are the same whatever the world size)
        chunk_rows = chunk_rows_for(self.cfg.batch_size * self.dist.world_size, self.cfg.grad_accum)
        for epoch in itertools.count(first_epoch):
            position = StreamPosition(**stream) if epoch == first_epoch and stream else StreamPosition()
            steps = self.data.steps(epoch, position, chunk_rows,
                                    lambda lengths, key: plan_steps(lengths, self.cfg, self.max_length, key,
                                                                    self.dist.world_size))
            empty, checked = True, None
            for (examples, step_rows, after), last in _mark_last(steps):
                empty = False
                if examples is not checked:  # once per chunk (every step of a chunk shares its examples)
                    check_batch_tokens(self.cfg, examples)
                    checked = examples
                yield step_of(examples, step_rows, self.dist, self.cfg.packing, self.pad_id, epoch, last, vars(after),
                              self.padding)
            if empty and position.rows == 0:
                return  # the stream has no rows left to give
