"""Turning examples into padded batches, and choosing which examples go together.

Labels are IGNORE_INDEX exactly where the attention mask is 0 (padding) or
the token is not supervised; they are never derived from the token's value,
so EOS, which doubles as the pad token for GPT-2, is still trained. A batch also
carries its training targets, found here on the host so the loss never has to
look for them on the device: `target_positions` (flat indices into the (B * T)
positions that predict a target: position t predicts token t + 1) and `targets`.

    >>> ex = Examples.from_lists([[5, 6, 50256], [7, 50256]])
    >>> b = collate(ex, [0, 1], pad_id=50256)
    >>> b["input_ids"].tolist(), b["attention_mask"].tolist(), b["labels"].tolist()
    ([[5, 6, 50256], [7, 50256, 50256]], [[1, 1, 1], [1, 1, 0]], [[5, 6, 50256], [7, 50256, -100]])
    >>> b["target_positions"].tolist(), b["targets"].tolist()
    ([0, 1, 3], [6, 50256, 50256])
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sftune.attention import FLEX_KEYS, block_tables, sequence_starts
from sftune.data.examples import Examples

IGNORE_INDEX = -100  # label value cross-entropy skips


@dataclass(frozen=True)
class Padding:
    """How a batch is padded. An eager step pads to its longest row and lists only the real targets. A CUDA graph
    or a compiled step runs a fixed set of shapes (`static`): widths rounded up to a `multiple` (never past
    `max_width`, the model's context), `rows` rows (empty ones added), and a target slot at every position
    (IGNORE_INDEX where nothing is trained), so a shape's target count is fixed too. Padding is never in the loss:
    a static batch computes exactly the loss of the same rows padded as little as possible."""

    multiple: int = 1
    rows: int | None = None
    max_width: int | None = None
    static: bool = False

    @property
    def shapes(self) -> int:
        """How many widths a batch can have (at most), so how many compiles a shape-specialised step can need."""
        return -(-(self.max_width or 1024) // self.multiple)

    def width(self, longest: int) -> int:
        rounded = -(-longest // self.multiple) * self.multiple
        return max(longest, min(rounded, self.max_width or rounded))


EAGER = Padding()


def batch_shape(sizes: Sequence[int], padding: Padding = EAGER) -> tuple[int, int]:
    """(rows, width) of the batch `collate` or `collate_packed` makes of rows of these token counts; no rows: the
    1 x 1 `idle_batch` (static shapes: empty rows of the fixed count).

    >>> batch_shape([5, 9, 3]), batch_shape([5, 9, 3], Padding(multiple=16, rows=4, static=True)), batch_shape([])
    ((3, 9), (4, 16), (1, 1))
    """
    if len(sizes) == 0 and not padding.static:
        return 1, 1
    return max(len(sizes), padding.rows or 1), padding.width(max(sizes, default=1))


def with_targets(batch: dict[str, np.ndarray], static: bool = False) -> dict[str, torch.Tensor]:
    """Add `target_positions` and `targets` (both (N,) int64) from `labels`, and make tensors.

    Row b's position t scores label t + 1, so its flat position is b * T + t. `static`: every position is listed
    (N = B x T), with IGNORE_INDEX as the target of positions that train nothing."""
    labels = batch["labels"]
    if static:
        targets = np.full(labels.shape, IGNORE_INDEX, dtype=np.int64)
        targets[:, :-1] = labels[:, 1:]
        batch["target_positions"], batch["targets"] = np.arange(labels.size), targets.reshape(-1)
    else:
        rows, cols = np.nonzero(labels[:, 1:] != IGNORE_INDEX)
        batch["target_positions"] = rows * labels.shape[1] + cols
        batch["targets"] = labels[rows, cols + 1]
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)) for k, v in batch.items()}


# what the loss module reads: tensors copied to the device, and (packed rows) the longest sequence, a host int.
# `attention_mask` (1 on real tokens) is never given to the model (see `loss.model_inputs`): only a mixture of
# experts' load-balancing loss reads it, to leave padding out of the routers' statistics (`ROUTER_KEYS`).
DEVICE_KEYS = ("input_ids", "position_ids", "target_positions", "targets", "cu_seqlens") + FLEX_KEYS
ROUTER_KEYS = DEVICE_KEYS + ("attention_mask",)
HOST_KEYS = ("max_seqlen",)
VARLEN_KEYS = ("cu_seqlens", "max_seqlen")  # read only by a model under `--attention varlen`
ATTENTION_KEYS = {"varlen": VARLEN_KEYS, "flex": FLEX_KEYS}  # ... and under `--attention flex`


def to_device(batch: dict[str, torch.Tensor], device, keys: tuple[str, ...] = DEVICE_KEYS) -> dict[str, torch.Tensor]:
    """What the loss module reads (`keys`: its `device_keys`), on `device` (`labels` and, unless a router loss reads
    it, `attention_mask` stay on the host: the targets were taken from the labels)."""
    return {k: v.to(device, non_blocking=True) if k in keys else v for k, v in batch.items()
            if k in keys or k in HOST_KEYS}


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Training targets of a collated batch (host-side: no device sync)."""
    targets = batch["targets"]
    return int((targets != IGNORE_INDEX).sum()) if len(targets) else 0


def idle_batch(pad_id: int) -> dict[str, torch.Tensor]:
    """One pad token and no target: what a rank runs when a step's last micro-batch has fewer rows than
    ranks, so that every rank still takes part in the forward and backward (DDP all-reduces in the backward)."""
    return with_targets({"input_ids": np.full((1, 1), pad_id), "attention_mask": np.ones((1, 1), dtype=np.int64),
                         "labels": np.full((1, 1), IGNORE_INDEX)})


def collate(examples: Examples, indices: Sequence[int], pad_id: int, padding: Padding = EAGER) -> dict[str, torch.Tensor]:
    """Right-pad the chosen examples to the longest one (or as `padding` says). Returns int64 (B, T) tensors
    `input_ids`, `attention_mask` and `labels`, and the (N,) `target_positions` and `targets`."""
    if len(indices) == 0 and not padding.static:
        return idle_batch(pad_id)
    lengths = [int(examples.offsets[i + 1] - examples.offsets[i]) for i in indices]
    shape = batch_shape(lengths, padding)
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros(shape, dtype=np.int64)
    for row, (i, n) in enumerate(zip(indices, lengths)):
        ids, supervised = examples.example(i)
        input_ids[row, :n] = ids
        attention_mask[row, :n] = 1
        labels[row, :n] = np.where(supervised, ids, IGNORE_INDEX)
    return with_targets({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}, padding.static)


def prefetch(items: Iterator, depth: int = 2, prepare: Callable | None = None) -> Iterator:
    """`items`, made up to `depth` ahead in a background thread (with `prepare` applied there): the next optimizer
    step's batches are collated, and pinned for an asynchronous copy, while the GPU runs this one. An error in the
    thread is raised here, in order; closing the returned iterator stops the thread.

    >>> list(prefetch(iter(range(5)), prepare=lambda x: 2 * x))
    [0, 2, 4, 6, 8]
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop, end = threading.Event(), object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((prepare(item) if prepare else item, None)):
                    return
            put((end, None))
        except BaseException as e:  # (handed to the consumer, which raises it)
            put((end, e))

    thread = threading.Thread(target=work, name="sftune-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()


def pin(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch's tensors in page-locked memory, so that copies to the GPU run asynchronously."""
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


GROUP_CHUNK_STEPS = 64  # length grouping sorts chunks of this many optimizer steps' rows
GROUP_MIN_CHUNKS = 4  # ... or fewer, so that an epoch has at least this many chunks (small datasets)


def epoch_steps(
    lengths: np.ndarray,
    batch_size: int,
    grad_accum: int,
    seed: int,
    epoch: int,
    batch_tokens: int | None = None,
    group_by_length: bool = True,
) -> list[list[np.ndarray]]:
    """The optimizer steps of one epoch: each a list of `grad_accum` micro-batches of row indices.

    Rows are shuffled by (seed, epoch). With `group_by_length`, each chunk of
    `batch_size * grad_accum * 64` shuffled rows (fewer on a small dataset, so that an
    epoch has at least 4 chunks) is sorted by length before it is cut,
    so a micro-batch holds rows of nearly equal length (almost no padding), and the
    steps are then shuffled. A micro-batch holds at most `batch_size` rows and, with
    `batch_tokens`, at most that many tokens padded (rows x longest row). Every row is
    used exactly once; the result is deterministic, so a run can resume mid-epoch, and
    a step holds the same rows for (batch 32, accum 1) and (batch 8, accum 4).

    >>> [[b.tolist() for b in s] for s in epoch_steps(np.array([3, 1, 2]), 2, 1, 0, 0, group_by_length=False)]
    [[[2, 0]], [[1]]]
    """
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if group_by_length:
        # at least GROUP_MIN_CHUNKS chunks an epoch, so that on a small dataset the batches still change
        # from epoch to epoch (one sorted chunk gives nearly the same batches every epoch: NOTES try 11)
        rows_per_step = batch_size * grad_accum
        steps = -(-len(lengths) // rows_per_step)
        chunk = rows_per_step * max(1, min(GROUP_CHUNK_STEPS, steps // GROUP_MIN_CHUNKS))
        parts = [order[i : i + chunk] for i in range(0, len(order), chunk)]
        # longest first within each chunk (stable, so ties keep the shuffled order)
        parts = [p[np.argsort(-lengths[p], kind="stable")] for p in parts]
    else:
        parts = [order]
    micro = [b for p in parts for b in cut_rows(p, lengths, batch_size, batch_tokens)]
    steps = [micro[i : i + grad_accum] for i in range(0, len(micro), grad_accum)]
    if group_by_length:
        steps = [steps[i] for i in rng.permutation(len(steps))]
    return steps


def cut_rows(rows: np.ndarray, lengths: np.ndarray, batch_size: int, batch_tokens: int | None) -> list[np.ndarray]:
    """Cut `rows` in order into micro-batches of at most batch_size rows and batch_tokens padded tokens."""
    if batch_tokens is None:
        return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    batches, start, width = [], 0, 0
    for i, row in enumerate(rows):
        n = i - start
        new_width = max(width, int(lengths[row]))
        if n and (n >= batch_size or (n + 1) * new_width > batch_tokens):
            batches.append(rows[start:i])
            start, new_width = i, int(lengths[row])
        width = new_width
    if start < len(rows):
        batches.append(rows[start:])
    return batches


def heaviest_rows(lengths: np.ndarray, rows: int, batch_tokens: int | None) -> np.ndarray:
    """The heaviest micro-batch a step can hold (every rank's rows): the `rows` longest examples, longest first, as
    many as `batch_tokens` allows. A micro-batch is padded to its longest row, so none needs more memory."""
    longest = np.argsort(-np.asarray(lengths), kind="stable")[:rows]
    return cut_rows(longest, lengths, len(longest), batch_tokens)[0] if len(longest) else longest


def chunk_rows_for(batch_size: int, grad_accum: int) -> int:
    """Rows per streamed chunk: as many as one length-grouping chunk of in-memory training."""
    return batch_size * grad_accum * GROUP_CHUNK_STEPS


def length_sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Batches of similar length (longest first): for evaluation, where order does not matter."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padding_efficiency(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    """Real tokens / padded tokens computed, over the given batches (1.0 = no padding)."""
    lengths = np.asarray(lengths)
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return real / padded if padded else 1.0


# --- packing: several examples per row, kept apart ----------------------------------------


def best_fit_decreasing(lengths: np.ndarray, width: int) -> list[np.ndarray]:
    """Pack items into rows of at most `width` tokens: longest first, each into the fullest row
    it still fits (best fit), so rows end up nearly full. Returns the item indices of each row.

    >>> [r.tolist() for r in best_fit_decreasing(np.array([4, 3, 2, 1, 5]), 6)]
    [[4, 3], [0, 2], [1]]
    """
    import bisect

    lengths = np.asarray(lengths)
    if len(lengths) and int(lengths.max()) > width:
        raise ValueError(f"an item of {int(lengths.max())} tokens does not fit a row of {width}")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row id), sorted: the best fit is the first with space >= item
    for item in np.argsort(-lengths, kind="stable"):
        n = int(lengths[item])
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, row = free.pop(at)
        else:
            space, row = width, len(rows)
            rows.append([])
        rows[row].append(int(item))
        if space - n > 0:
            bisect.insort(free, (space - n, row))
    return [np.asarray(r, dtype=np.int64) for r in rows]


def packed_epoch_steps(
    lengths: np.ndarray,
    width: int,
    batch_size: int,
    grad_accum: int,
    seed: int,
    epoch: int,
    batch_tokens: int | None = None,
) -> list[list[list[np.ndarray]]]:
    """Like `epoch_steps`, but a micro-batch is a list of packed rows (each an array of example
    indices, at most `width` tokens): examples are shuffled by (seed, epoch), packed best-fit-decreasing,
    and the rows cut into steps in a shuffled order."""
    lengths = np.asarray(lengths)
    order = np.random.default_rng([seed, epoch, 1]).permutation(len(lengths))
    rows = [order[r] for r in best_fit_decreasing(lengths[order], width)]
    row_lengths = np.array([int(lengths[r].sum()) for r in rows])
    steps = epoch_steps(row_lengths, batch_size, grad_accum, seed, epoch, batch_tokens, group_by_length=False)
    return [[[rows[i] for i in micro] for micro in step] for step in steps]


def collate_packed(examples: Examples, rows: Sequence[np.ndarray], pad_id: int,
                   padding: Padding = EAGER) -> dict[str, torch.Tensor]:
    """Concatenate each row's examples; right-pad rows to the longest. Returns int64 (R, W) tensors
    `input_ids`, `position_ids`, `labels` and `attention_mask` (1 on real tokens, for counting).

    Position ids restart at 0 for every example: the model is then called WITHOUT an attention
    mask, so transformers builds a block-diagonal causal mask from them (no token sees another
    example). The first token of each example has no label: it would be predicted from the
    previous example's last token. Padding forms its own block and has no labels.
    The same boundaries as `cu_seqlens` (int32) and `max_seqlen` (an int), for `--attention varlen`
    (`attention.sequence_starts`), and as flex attention's block mask tables, for `--attention flex`
    (`attention.block_tables`: `doc_ids` and the `*kv_*` tiles).

    >>> ex = Examples.from_lists([[5, 6, 9], [7, 9]])
    >>> b = collate_packed(ex, [np.array([0, 1])], pad_id=9)
    >>> b["input_ids"].tolist(), b["position_ids"].tolist(), b["labels"].tolist()
    ([[5, 6, 9, 7, 9]], [[0, 1, 2, 0, 1]], [[-100, 6, 9, -100, 9]])
    """
    if len(rows) == 0 and not padding.static:
        return idle_batch(pad_id)
    totals = [int(examples.lengths[r].sum()) for r in rows]
    shape = batch_shape(totals, padding)
    width = shape[1]
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros(shape, dtype=np.int64)
    position_ids = np.zeros(shape, dtype=np.int64)
    for row, (items, total) in enumerate(zip(rows, totals)):
        at = 0
        for i in items:
            ids, supervised = examples.example(int(i))
            n = len(ids)
            input_ids[row, at : at + n] = ids
            labels[row, at : at + n] = np.where(supervised, ids, IGNORE_INDEX)
            labels[row, at] = IGNORE_INDEX
            position_ids[row, at : at + n] = np.arange(n)
            at += n
        attention_mask[row, :total] = 1
        position_ids[row, total:] = np.arange(width - total)  # padding: a block of its own
    position_ids[len(rows):] = np.arange(width)  # (rows added by `padding`: pad tokens, a block of their own)
    batch = with_targets({"input_ids": input_ids, "position_ids": position_ids, "labels": labels,
                          "attention_mask": attention_mask}, padding.static)
    lengths = [examples.lengths[r].tolist() for r in rows]
    cu_seqlens, batch["max_seqlen"] = sequence_starts(lengths, width, shape[0], padding.static)
    batch["cu_seqlens"] = torch.from_numpy(cu_seqlens)
    batch.update({k: torch.from_numpy(v) for k, v in block_tables(lengths, width, shape[0]).items()})
    return batch
