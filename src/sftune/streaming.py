"""Streaming: train on a dataset too big for memory, tokenized on the fly.

    sftune train --dataset "big/*.jsonl" --streaming --max-steps 10000

The training split is read as a stream (`datasets` streaming mode), shuffled in a
buffer, and taken in chunks of `batch_size * grad_accum * 64` rows. Each chunk is
tokenized by the same function as in-memory data (`data.tokenize_split`: same
formats, same masks, same filters) and cut into optimizer steps the same way
(length-grouped or packed), seeded by (seed, epoch, chunk). A checkpoint records
the rows read before the current chunk and the steps done in it, so a resumed
run skips those rows without tokenizing them and continues with the same steps.

Validation is materialized (it is evaluated many times): the dataset's own
validation split, else the first `stream_val_rows` rows, which training skips.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from sftune.batching import GROUP_CHUNK_STEPS
from sftune.console import log
from sftune.data import (VALIDATION_NAMES, EncodeOptions, Examples, SplitStats, chat_template_for, check_end_of_turn,
                         file_loader, local_files, tokenize_split, warn_about)
from sftune.errors import SftuneError
from sftune.formats import ROW_COLUMN, ChatTemplate, Layout, detect_layout
from sftune.hub import from_hub_or_cache

SHUFFLE_BUFFER_CHUNKS = 4  # the shuffle buffer holds this many chunks of rows


@dataclass
class StreamPosition:
    """Where training stands in one epoch of the stream (saved in checkpoints)."""

    rows: int = 0  # training rows read before the current chunk
    chunk: int = 0  # index of the current chunk in the epoch
    steps_done: int = 0  # optimizer steps of the current chunk already taken


def open_stream(dataset: str, config_name: str | None, split: str):
    """The dataset's splits as IterableDatasets (nothing is read yet)."""
    import datasets

    files = local_files(dataset)
    if files is not None:
        builder, kwargs = file_loader(files)
        return datasets.load_dataset(builder, data_files={"train": [str(f) for f in files]}, streaming=True, **kwargs)
    if (path := Path(dataset).expanduser()).is_dir():
        return datasets.load_dataset(str(path), config_name, streaming=True)

    def load(local_files_only: bool):
        if local_files_only:  # a stream needs the Hub; cached files are read without --streaming
            raise OSError("streaming needs the Hub")
        return datasets.load_dataset(dataset, config_name, streaming=True)

    return from_hub_or_cache(dataset, "dataset", "--dataset", load)


class StreamedData:
    """A streamed training split and a materialized validation split, tokenized alike."""

    def __init__(self, dataset: str, tokenizer, options: EncodeOptions, *, format: str = "auto",
                 columns: dict[str, str] | None = None, text_column: str | None = None,
                 dataset_config: str | None = None, split: str = "train", val_rows: int = 1000, seed: int = 42):
        import datasets

        streams = open_stream(dataset, dataset_config, split)
        if split not in streams:
            raise SftuneError(f"dataset {dataset} has no {split!r} split (it has: {', '.join(streams)}); set --split")
        numbered = streams[split].map(lambda _, i: {ROW_COLUMN: i}, with_indices=True)
        val_name = next((n for n in VALIDATION_NAMES if n in streams and n != split), None)
        if val_name is not None:
            val_rows_list = list(streams[val_name].map(lambda _, i: {ROW_COLUMN: i}, with_indices=True))
            self.train_stream = numbered
        else:
            val_rows_list = list(itertools.islice(numbered, val_rows))
            self.train_stream = numbered.skip(len(val_rows_list))
            log(f"data: streaming {dataset} with no validation split: its first {len(val_rows_list):,} rows are "
                f"held out for validation (--stream-val-rows)")
        if not val_rows_list:
            raise SftuneError(f"dataset {dataset} has no rows to validate on (--dataset)")
        validation_rows = datasets.Dataset.from_list(val_rows_list)
        self.layout: Layout = detect_layout(validation_rows.features, format, columns, text_column)
        self.template = None
        if self.layout.format.startswith("chat"):
            self.template = ChatTemplate(chat_template_for(tokenizer), tokenizer)
            check_end_of_turn(self.template)
        self.tokenizer, self.options, self.seed, self.split = tokenizer, options, seed, split
        self.validation, self.validation_stats = tokenize_split(
            validation_rows, tokenizer, self.layout, options, self.template, source=val_name or split)
        warn_about({"validation": self.validation_stats}, self.layout, options)  # train chunks are like it
        if len(self.validation) == 0:
            raise SftuneError(f"no validation example is left after filtering ({self.validation_stats.dropped}); "
                              f"check --min-tokens, --max-length and --format")

    def chunk(self, rows: list[dict]) -> tuple[Examples, SplitStats]:
        import datasets

        if not rows:
            return Examples.from_lists([]), SplitStats()
        return tokenize_split(datasets.Dataset.from_list(rows), self.tokenizer, self.layout, self.options,
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


def chunk_rows_for(batch_size: int, grad_accum: int) -> int:
    """Rows per chunk: as many as one length-grouping chunk of in-memory training."""
    return batch_size * grad_accum * GROUP_CHUNK_STEPS
