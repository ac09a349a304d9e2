"""Streaming: train on a dataset too big for memory, tokenized on the fly.

    sftune train --dataset "big/*.jsonl" --streaming --max-steps 10000

The training split is read as a stream (`datasets` streaming mode), shuffled in a
buffer, and taken in chunks of `batch_size * grad_accum * 64` rows. Each chunk is
tokenized by the same function as in-memory data (`tokenize.tokenize_split`: same
formats, same masks, same filters) and cut into optimizer steps the same way
(length-grouped or packed), seeded by (seed, epoch, chunk). A checkpoint records
the rows read before the current chunk and the steps done in it, so a resumed
run skips those rows without tokenizing them and continues with the same steps.

Validation is materialized (it is evaluated many times): the dataset's own
validation split, else the first `stream_val_rows` rows, which training skips.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import numpy as np

from sftune.console import log
from sftune.data.cache import sources_fingerprint
from sftune.data.examples import Examples, SplitStats, concat_examples, sum_stats
from sftune.data.formats import CHAT_COLUMNS, ROW_COLUMN, Layout, detect_layout, mixture_layout
from sftune.data.pipeline import DataOptions, PreparedData, held_out_datasets, mixture_entries, prepare_data, \
    validation_groups
from sftune.data.sources import open_stream, rows_to_validate_on, validation_split
from sftune.data.tokenize import check_end_of_turn, load_chat_template, tokenize_split, warn_about
from sftune.errors import SftuneError

SHUFFLE_BUFFER_CHUNKS = 4  # the shuffle buffer holds this many chunks of rows


@dataclass
class StreamPosition:
    """Where training stands in one epoch of the stream (saved in checkpoints)."""

    rows: int = 0  # training rows read before the current chunk
    chunk: int = 0  # index of the current chunk in the epoch
    steps_done: int = 0  # optimizer steps of the current chunk already taken
    streams: list[int] | None = None  # (several datasets) rows read from each stream before the current chunk
    ended: list[bool] | None = None  # (several datasets) the streams found empty before the current chunk


def table(rows: list[dict], layout: Layout):
    """Streamed rows as a Dataset to tokenize. A chat layout's message and tool columns go in as JSON text (read
    back by `row_segments`): a table built from Python rows gives every message, tool call and tool schema every
    key that any of them has, null where it had none, and a template writes those nulls (a call to `search`
    with `"city": null`)."""
    import datasets

    if layout.is_chat:
        columns = [layout.columns[k] for k in CHAT_COLUMNS if k in layout.columns]
        rows = [{**row, **{c: json.dumps(row[c]) for c in columns if c in row}} for row in rows]
    return datasets.Dataset.from_list(rows)


class StreamedData:
    """A streamed training split and a materialized validation split, tokenized alike."""

    def __init__(self, options: DataOptions, tokenizer):
        import datasets

        dataset, split, val_rows = options.dataset, options.split, options.stream_val_rows
        self.fingerprint = sources_fingerprint(dataset, options.val_dataset)  # local files by content; None: Hub
        streams = open_stream(dataset, options.dataset_config, split)
        if split not in streams:
            raise SftuneError(f"dataset {dataset} has no {split!r} split (it has: {', '.join(streams)}); set --split")
        numbered = streams[split].map(lambda _, i: {ROW_COLUMN: i}, with_indices=True)
        self.validates_on_first_rows = False  # (its first rows held out: no validation split)
        self.all_held_out = False  # (... and they were all of it: nothing left to train on)
        if options.only == "train":  # (a mixture's stream, validated on a --val-dataset of its own)
            val_rows_list, val_name = [], None
            self.train_stream = numbered
        elif options.val_dataset is not None:  # (read whole, as a validation split is)
            validation, val_name = rows_to_validate_on(options.val_dataset, options.val_split)
            val_rows_list = list(validation)
            self.train_stream = numbered
        elif (val_name := validation_split(streams, dataset, split, options.val_split)) is not None:
            val_rows_list = list(streams[val_name].map(lambda _, i: {ROW_COLUMN: i}, with_indices=True))
            self.train_stream = numbered
        else:
            val_rows_list = list(itertools.islice(numbered, val_rows))
            self.train_stream = numbered.skip(len(val_rows_list))
            self.validates_on_first_rows = True
            self.all_held_out = len(val_rows_list) < val_rows
            log(f"data: streaming {dataset} with no validation split: its first {len(val_rows_list):,} rows are "
                f"held out for validation (--stream-val-rows)")
        if not val_rows_list and options.only != "train":
            raise SftuneError(f"dataset {dataset} has no rows to validate on (--dataset)")
        sample = val_rows_list[:100] or list(itertools.islice(numbered, 100))
        if not sample:
            raise SftuneError(f"dataset {dataset} has no rows in its {split!r} split (--dataset, --split)")
        self.layout: Layout = detect_layout(datasets.Dataset.from_list(sample).features, options.format,
                                            options.columns, options.text_column)
        self.template = None
        if self.layout.is_chat:
            self.template = load_chat_template(tokenizer)
            check_end_of_turn(self.template)
        self.tokenizer, self.options, self.seed, self.split = tokenizer, options.encode, options.seed, split
        self.validation, self.validation_stats = self.chunk(val_rows_list, source=val_name or split)
        if val_rows_list:
            warn_about(self.stats, self.layout, self.options)  # (the training chunks are like it)
        if len(self.validation) == 0 and options.only != "train":
            raise SftuneError(f"no validation example is left after filtering ({self.validation_stats.dropped}); "
                              f"check --min-tokens, --max-length and --format")

    @property
    def stats(self) -> dict[str, SplitStats]:
        """As `PreparedData.stats`, for the split held in memory (the training rows are counted as they stream)."""
        return {"validation": self.validation_stats}

    def chunk(self, rows: list[dict], source: str | None = None) -> tuple[Examples, SplitStats]:
        if not rows:
            return Examples.from_lists([]), SplitStats()
        return tokenize_split(table(rows, self.layout), self.tokenizer, self.layout, self.options,
                              self.template, source=source or self.split)

    def steps(self, epoch: int, position: StreamPosition, chunk_rows: int,
              plan: Callable[[np.ndarray, int], list]) -> Iterator[tuple[Examples, list, StreamPosition]]:
        """The epoch's remaining optimizer steps from `position`: (chunk examples, step rows, position after it).

        `plan(lengths, key)` cuts a chunk's examples into steps, seeded by `key`."""
        stream = self.shuffled(epoch, chunk_rows)
        rows_iter = iter(stream.skip(position.rows) if position.rows else stream)
        rows_before, chunk, skip = position.rows, position.chunk, position.steps_done
        while rows := list(itertools.islice(rows_iter, chunk_rows)):
            examples, _ = self.chunk(rows)
            steps = plan(examples.lengths, epoch * 1_000_000 + chunk) if len(examples) else []
            for j in range(skip, len(steps)):
                yield examples, steps[j], StreamPosition(rows_before, chunk, j + 1)
            rows_before, chunk, skip = rows_before + len(rows), chunk + 1, 0

    def first_chunk(self, chunk_rows: int) -> tuple[Examples, SplitStats]:
        """The first chunk of the first epoch, tokenized."""
        return self.chunk(list(itertools.islice(self.shuffled(0, chunk_rows), chunk_rows)))

    def first_chunk_data(self, chunk_rows: int) -> PreparedData:
        """The first chunk as the training split beside the validation: what `sftune data --streaming` reports on."""
        start = time.perf_counter()
        train, stats = self.first_chunk(chunk_rows)
        return PreparedData(train, self.validation, {"train": stats, **self.stats}, self.layout, None, False,
                            time.perf_counter() - start)

    def shuffled(self, epoch: int, chunk_rows: int):
        """The training stream in the epoch's order (shuffle buffer seeded by seed and epoch)."""
        stream = self.train_stream.shuffle(seed=self.seed, buffer_size=chunk_rows * SHUFFLE_BUFFER_CHUNKS)
        stream.set_epoch(epoch)
        return stream



class MixedStreams:
    """Several datasets streamed together (`datasets` with `--streaming`; or one, validated on `val_datasets`). Each is a `StreamedData` of its own (its
    format, columns, shuffle buffer and validation); each chunk's rows are drawn from the streams at random, in
    proportion to their `weight`s (equal shares by default), seeded by (seed, epoch, chunk). A stream that runs out
    drops out of the draw; the epoch ends when all have. Each stream's rows are tokenized by its own part, and the
    chunk's examples are then cut into steps together. A checkpoint records the rows read from each stream."""

    def __init__(self, options: DataOptions, tokenizer):
        self.parts: list[tuple[str, StreamedData]] = []
        self.weights: list[float] = []
        for i, name, weight, part in mixture_entries(options, lambda entry: StreamedData(entry, tokenizer)):
            log(f"data: {i + 1}/{len(options.mixture) or 1} streaming {name} ({part.split}), weight {weight:g}, "
                f"{len(part.validation):,} validation examples, format {part.layout.describe()}")
            self.parts.append((name, part))
            self.weights.append(weight)
        held = held_out_datasets(options, lambda entry: prepare_data(entry, tokenizer))  # (read whole, in memory)
        self.val_parts, self.held_out = held or self.parts, held
        self.validation = concat_examples([part.validation for _, part in self.val_parts])
        self.validation_stats = sum_stats([p.stats["validation"] for _, p in self.val_parts], self.validation.lengths)
        self.validation_groups = validation_groups(self.val_parts)
        prints = [part.fingerprint for _, part in self.parts] + [part.fingerprint for _, part in held]
        self.layout = mixture_layout([part.layout for _, part in self.parts])
        self.fingerprint = None if None in prints else hashlib.sha256("|".join(prints).encode()).hexdigest()
        self.seed, self.warned = options.seed, set()

    stats = StreamedData.stats  # (the validation split's counts, as one stream's)

    def steps(self, epoch: int, position: StreamPosition, chunk_rows: int,
              plan: Callable[[np.ndarray, int], list]) -> Iterator[tuple[Examples, list, StreamPosition]]:
        """As `StreamedData.steps`, over the streams drawn together."""
        counts = list(position.streams or [0] * len(self.parts))
        ended = list(position.ended or [False] * len(self.parts))
        rows_iters = [iter(part.shuffled(epoch, chunk_rows).skip(n) if n else part.shuffled(epoch, chunk_rows))
                      for (_, part), n in zip(self.parts, counts)]
        chunk, skip = position.chunk, position.steps_done
        while True:
            before = StreamPosition(sum(counts), chunk, 0, list(counts), list(ended))
            drawn = self._draw(rows_iters, counts, ended, chunk_rows, epoch, chunk)
            if not any(drawn):
                return
            examples = self._tokenize(drawn)
            steps = plan(examples.lengths, epoch * 1_000_000 + chunk) if len(examples) else []
            for j in range(skip, len(steps)):
                yield examples, steps[j], replace(before, steps_done=j + 1)
            chunk, skip = chunk + 1, 0

    def _draw(self, rows_iters: list, counts: list[int], ended: list[bool], chunk_rows: int, epoch: int,
              chunk: int) -> list[list[dict]]:
        """A chunk's rows, per stream: `chunk_rows` draws (fewer once every stream has ended), each from a stream
        picked by weight among those not ended; `counts` and `ended` are updated."""
        rng = np.random.default_rng([self.seed, epoch, chunk])
        drawn: list[list[dict]] = [[] for _ in self.parts]
        weights = np.asarray(self.weights)
        while sum(map(len, drawn)) < chunk_rows and not all(ended):
            live = np.where(ended, 0.0, weights)
            i = int(rng.choice(len(live), p=live / live.sum()))
            row = next(rows_iters[i], None)
            if row is None:
                ended[i] = True
                if counts[i] == 0 and epoch == 0 and chunk == 0 and i not in self.warned:
                    self.warned.add(i)
                    why = " (its first --stream-val-rows rows are its validation)" \
                        if self.parts[i][1].validates_on_first_rows else ""
                    log(f"warning: datasets entry {i} ({self.parts[i][0]}) streams no training rows{why}")
                continue
            drawn[i].append(row)
            counts[i] += 1
        return drawn

    def _tokenize(self, drawn: list[list[dict]]) -> Examples:
        return concat_examples([part.chunk(rows)[0] for (_, part), rows in zip(self.parts, drawn)])

    def first_chunk_data(self, chunk_rows: int) -> PreparedData:
        """The first chunk of the first epoch as the training split beside the validation, with each stream's rows
        in it and its validation as the parts: what `sftune data --streaming` reports on."""
        start = time.perf_counter()
        rows_iters = [iter(part.shuffled(0, chunk_rows)) for _, part in self.parts]
        drawn = self._draw(rows_iters, [0] * len(self.parts), [False] * len(self.parts), chunk_rows, 0, 0)
        parts = []
        for (name, part), rows in zip(self.parts, drawn):
            train, stats = part.chunk(rows)
            parts.append((name, PreparedData(train, part.validation, {"train": stats, **part.stats}, part.layout,
                                             None, False, 0.0)))
        train = concat_examples([p.train for _, p in parts])
        stats = {"train": sum_stats([p.stats["train"] for _, p in parts], train.lengths), **self.stats}
        return PreparedData(train, self.validation, stats, self.layout, None, False, time.perf_counter() - start,
                            parts=parts, weights=self.weights, val_parts=self.held_out or parts)
