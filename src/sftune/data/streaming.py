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

import itertools
import json
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from sftune.console import log
from sftune.data.cache import sources_fingerprint
from sftune.data.examples import Examples, SplitStats
from sftune.data.formats import CHAT_COLUMNS, ROW_COLUMN, Layout, detect_layout
from sftune.data.pipeline import DataOptions
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
        if options.val_dataset is not None:  # (read whole, as a validation split is)
            validation, val_name = rows_to_validate_on(options.val_dataset, options.val_split)
            val_rows_list = list(validation)
            self.train_stream = numbered
        elif (val_name := validation_split(streams, dataset, split, options.val_split)) is not None:
            val_rows_list = list(streams[val_name].map(lambda _, i: {ROW_COLUMN: i}, with_indices=True))
            self.train_stream = numbered
        else:
            val_rows_list = list(itertools.islice(numbered, val_rows))
            self.train_stream = numbered.skip(len(val_rows_list))
            log(f"data: streaming {dataset} with no validation split: its first {len(val_rows_list):,} rows are "
                f"held out for validation (--stream-val-rows)")
        if not val_rows_list:
            raise SftuneError(f"dataset {dataset} has no rows to validate on (--dataset)")
        self.layout: Layout = detect_layout(datasets.Dataset.from_list(val_rows_list[:100]).features, options.format,
                                            options.columns, options.text_column)
        validation_rows = table(val_rows_list, self.layout)
        self.template = None
        if self.layout.is_chat:
            self.template = load_chat_template(tokenizer)
            check_end_of_turn(self.template)
        self.tokenizer, self.options, self.seed, self.split = tokenizer, options.encode, options.seed, split
        self.validation, self.validation_stats = tokenize_split(
            validation_rows, tokenizer, self.layout, self.options, self.template, source=val_name or split)
        warn_about({"validation": self.validation_stats}, self.layout, self.options)  # train chunks are like it
        if len(self.validation) == 0:
            raise SftuneError(f"no validation example is left after filtering ({self.validation_stats.dropped}); "
                              f"check --min-tokens, --max-length and --format")

    def chunk(self, rows: list[dict]) -> tuple[Examples, SplitStats]:
        if not rows:
            return Examples.from_lists([]), SplitStats()
        return tokenize_split(table(rows, self.layout), self.tokenizer, self.layout, self.options,
                              self.template, source=self.split)

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
        """The first chunk of the first epoch, tokenized (what `sftune data --streaming` reports on)."""
        return self.chunk(list(itertools.islice(self.shuffled(0, chunk_rows), chunk_rows)))

    def shuffled(self, epoch: int, chunk_rows: int):
        """The training stream in the epoch's order (shuffle buffer seeded by seed and epoch)."""
        stream = self.train_stream.shuffle(seed=self.seed, buffer_size=chunk_rows * SHUFFLE_BUFFER_CHUNKS)
        stream.set_epoch(epoch)
        return stream

