"""Tokenization: a split's rows become `Examples` with exact trained-token masks.

Owns how one example is assembled (`encode_example`: BOS prefix, EOS, mask, truncation),
how a split is tokenized in batches (`tokenize_split`, via `datasets.map`, 512 rows a call
as in the seed), which chat template is used (`chat_template_for`), and the warnings a user
should see about the result. Imports `examples` and `formats` only.

    >>> encode_example([[464, 3797, 3332, 319, 262, 2603]], [True], eos_id=50256, min_tokens=5, max_length=16,
    ...                overlong="drop")
    ([464, 3797, 3332, 319, 262, 2603, 50256], [True, True, True, True, True, True, True], 'kept')
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import re
import signal
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sftune.console import log, tokenizer_threads
from sftune.data.examples import DROP_REASONS, Examples, SplitStats, count_targets, drop_untrained, length_summary
from sftune.data.formats import ROW_COLUMN, Layout, row_segments
from sftune.data.templates import DEFAULT_CHAT_TEMPLATE, ChatTemplate
from sftune.errors import SftuneError

MAP_BATCH_SIZE = 512  # rows per tokenizer call in datasets.map, as in the seed
PER_WORKER = 512  # rows a tokenizing process gets at least (--data-workers: fewer processes for a small split)
PLAIN_PER_WORKER = 8_192  # ... under --data-workers auto, for text and prompt-completion rows (NOTES try 146)
PLAIN_MIN_CORES = 8  # ... fewer cores than this: plain rows in one process (the tokenizer's threads use them)
AUTO_MOST = {True: 16, False: 8}  # auto takes at most this many for chat rows (True) and plain ones: as far as
# measured (16 cores: chat 9.5 s in 8, 6.1 in 16; plain rows slower in 16 than in 8), and each process a copy of
# the parent's memory as it touches it


def tokenizing_processes(workers: int | str, rows: int, chat: bool, cores: int) -> int:
    """How many processes tokenize a split of `rows` rows (`--data-workers`). A number is taken as asked, less
    where a process would get under 512 rows. auto: chat rows, which spend most of their time in Python (the
    template's renders), one a core; plain rows, which the Rust tokenizer already encodes on every core, one
    process, or half the cores where there are 8 or more (16 cores of the GPU machine: SST-2 2.62 s in one,
    1.60 s in 8, 1.74 s in 16; chat 100,000 rows 30.0 s in one, 6.1 s in 16: NOTES try 146); at most 16 and 8."""
    if workers != "auto":
        return max(1, min(int(workers), rows // PER_WORKER))
    if chat:
        return max(1, min(cores, AUTO_MOST[True], rows // PER_WORKER))
    if cores < PLAIN_MIN_CORES:
        return 1
    return max(1, min(cores // 2, AUTO_MOST[False], rows // PLAIN_PER_WORKER))


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: its CPU affinity, or fewer where a cgroup's quota allows less (a container's
    `--cpus`, a Kubernetes CPU limit: the affinity still lists every core of the host there)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cpu_quota(cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def cpu_quota(cgroup: Path) -> float | None:
    """CPUs' worth of time a cgroup grants (cgroup v2's `cpu.max`, v1's `cpu.cfs_quota_us` / `cpu.cfs_period_us`), or
    None for no limit or none readable."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for v1 in (cgroup / "cpu", cgroup / "cpu,cpuacct"):
        try:
            quota, period = (int((v1 / f"cpu.cfs_{k}_us").read_text()) for k in ("quota", "period"))
            return quota / period if quota > 0 and period > 0 else None
        except (OSError, ValueError):
            continue
    return None


# --- one example --------------------------------------------------------------


def encode_example(
    parts: list[list[int]],
    trained: list[bool],
    eos_id: int | None,
    min_tokens: int,
    max_length: int,
    overlong: str,
    truncation_side: str = "right",
    prefix: list[int] | tuple[int, ...] = (),
    whole_turns: bool = False,
) -> tuple[list[int], list[bool], str]:
    """Join one example's tokenized parts, mark the trained tokens, and decide its fate.

    `parts` are the token ids of each segment (tokenized separately, so the boundaries are
    exact), `trained` says which segments are trained on. `prefix` (e.g. BOS) goes first,
    untrained. With `eos_id`, EOS is appended unless the last part already ends with it,
    trained like the last part. `min_tokens` is compared with the parts' tokens, like the
    seed's `len(input_ids) > 5`. If the example is longer than `max_length`, "truncate"
    cuts from `truncation_side` ("right" loses the end, EOS included: none is added back;
    "left" loses the start after the prefix), "drop" and "error" report it as overlong. With `whole_turns`
    (chat), "right" first tries to keep whole turns: the longest start that ends where a trained part ends
    (status turns_cut), so that every answer kept has its end-of-turn marker.
    Returns (input_ids, supervised mask, status) with status in
    kept | truncated | turns_cut | empty | too_short | overlong.

    >>> encode_example([[5, 6, 7], [8, 9]], [False, True], eos_id=0, min_tokens=0, max_length=16, overlong="drop")
    ([5, 6, 7, 8, 9, 0], [False, False, False, True, True, True], 'kept')
    >>> encode_example([[5, 6, 7], [8, 9]], [False, True], eos_id=0, min_tokens=0, max_length=4, overlong="truncate")
    ([5, 6, 7, 8], [False, False, False, True], 'truncated')
    >>> encode_example([[5, 6, 7], [8, 9]], [False, True], eos_id=0, min_tokens=0, max_length=4, overlong="truncate",
    ...                truncation_side="left")
    ([7, 8, 9, 0], [False, True, True, True], 'truncated')
    >>> encode_example([[5], [6, 7], [8], [9, 10]], [False, True, False, True], eos_id=None, min_tokens=0,
    ...                max_length=4, overlong="truncate", whole_turns=True)
    ([5, 6, 7], [False, True, True], 'turns_cut')
    """
    ids = [t for p in parts for t in p]
    if not ids:
        return [], [], "empty"
    if len(ids) <= min_tokens:
        return [], [], "too_short"
    mask = [flag for p, flag in zip(parts, trained) for _ in p]
    if eos_id is not None and ids[-1] != eos_id:
        ids.append(eos_id)
        mask.append(trained[-1])
    room = max_length - len(prefix)
    status = "kept"
    if len(ids) > room:
        if overlong != "truncate":
            return [], [], "overlong"
        ends = list(itertools.accumulate(len(p) for p in parts))
        turn_ends = [end for end, flag in zip(ends, trained) if flag and end <= room] if whole_turns else []
        if truncation_side == "right" and turn_ends:
            ids, mask, status = ids[: turn_ends[-1]], mask[: turn_ends[-1]], "turns_cut"
        else:
            cut = slice(None, room) if truncation_side == "right" else slice(len(ids) - room, None)
            ids, mask, status = ids[cut], mask[cut], "truncated"
    return [*prefix, *ids], [False] * len(prefix) + mask, status


def text_encoder(tokenizer):
    """`encode(texts) -> ids`, what `tokenizer(texts, add_special_tokens=False)["input_ids"]` gives, faster: a
    fast tokenizer's Rust encoder is called directly (`encode_batch_fast`: no offsets), without the per-text
    dicts transformers builds around it (0.6 s of SST-2's 2.7 s of tokenizing here: benchmarks/NOTES.md try
    87). Only while the encoder is set as transformers sets it for such a call (no truncation, no padding, its
    `split_special_tokens`); otherwise, and for tokenizers whose class encodes in Python, through transformers."""
    from transformers import PreTrainedTokenizerBase, TokenizersBackend

    def through_transformers(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    backend = getattr(tokenizer, "_tokenizer", None)
    kind = type(tokenizer)
    if (not hasattr(backend, "encode_batch_fast") or kind._encode_plus is not TokenizersBackend._encode_plus
            or kind.__call__ is not PreTrainedTokenizerBase.__call__):
        return through_transformers

    def encode(texts: list[str]) -> list[list[int]]:
        if (backend.truncation is None and backend.padding is None
                and backend.encode_special_tokens == bool(tokenizer.split_special_tokens)):
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        return through_transformers(texts)  # (which also sets the encoder as it needs it, for the next call)

    return encode


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text by itself (a BOS for Llama-style tokenizers; none for GPT-2)."""
    with_specials = tokenizer("a")["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    if not bare or bare[0] not in with_specials:
        return []
    return list(with_specials[: with_specials.index(bare[0])])


# --- loading rows ---------------------------------------------------------------


@dataclass(frozen=True)
class EncodeOptions:
    """How rows become training examples (everything but the data and the tokenizer)."""

    max_length: int
    min_tokens: int = 5
    overlong: str = "drop"
    truncation_side: str = "right"
    train_on_prompt: bool = False
    train_on_all_turns: bool = False


def tokenize_split(rows, tokenizer, layout: Layout, options: EncodeOptions, template: ChatTemplate | None = None,
                   source: str = "train", workers: int | str = 1):
    """Tokenize one split with batched `datasets.map` (512 rows a call, original columns removed)
    and keep what `encode_example` keeps. Returns (Examples, SplitStats).

    Each row's segments (`formats.row_segments`) are tokenized separately, so the trained
    tokens are exactly the answer's own tokens. Where tokenizing the joined text would
    merge tokens across a boundary, the parts' tokens win (they are what the model sees
    when it is given the prompt alone); such rows are counted in `boundary_merges`.
    `source` names the split the rows came from, for error messages.
    """
    eos_id = tokenizer.eos_token_id
    plain = layout.format in ("text", "prompt_completion")  # these get BOS/EOS from us; chat templates write their own
    prefix = special_prefix(tokenizer) if plain else []
    encode = text_encoder(tokenizer)
    o = options

    def encode_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        numbers = batch[ROW_COLUMN] if ROW_COLUMN in batch else indices
        names = [k for k in batch if k != ROW_COLUMN]  # every column: a row of another format is recognised
        segments = [
            row_segments({k: batch[k][i] for k in names}, layout, template, o.train_on_prompt,
                         o.train_on_all_turns, where=f"{source} row {numbers[i] + 1}")
            for i in range(len(numbers))
        ]
        flat = encode([text for segs in segments for text, _ in segs])
        multi = [i for i, segs in enumerate(segments) if len(segs) > 1]
        joined = encode(["".join(text for text, _ in segments[i]) for i in multi]) if multi else []
        whole = dict(zip(multi, joined))
        out: dict[str, list] = {"input_ids": [], "supervised": [], "status": [], "merged": [], "n_tokens": []}
        at = 0
        for i, segs in enumerate(segments):
            parts, at = flat[at : at + len(segs)], at + len(segs)
            ids, mask, status = encode_example(parts, [t for _, t in segs], eos_id if plain else None, o.min_tokens,
                                               o.max_length, o.overlong, o.truncation_side, prefix,
                                               whole_turns=not plain)
            joined_parts = [t for p in parts for t in p]
            out["input_ids"].append(ids)
            out["supervised"].append(mask)
            out["status"].append(status)
            out["merged"].append(i in whole and whole[i] != joined_parts)
            out["n_tokens"].append(len(prefix) + len(joined_parts) + int(plain))
        return out

    processes = tokenizing_processes(workers, len(rows), not plain, usable_cores())
    if processes > 1:
        asked = " auto; 1 for one process" if workers == "auto" else ""
        log(f"data: {source}: {len(rows):,} rows tokenized by {processes} processes (--data-workers{asked})")
    with tokenizer_threads(processes):
        mapped = _map(
            rows,
            encode_batch if processes == 1 else functools.partial(_in_worker, encode_batch, os.getpid()),
            batched=True,
            batch_size=MAP_BATCH_SIZE,
            with_indices=True,
            remove_columns=rows.column_names,
            keep_in_memory=True,  # our own cache holds the result; no second copy in the datasets cache
            # no hashing of encode_batch for a fingerprint: it pickles the tokenizer (~1.5 s a call; NOTES try 12)
            new_fingerprint=uuid.uuid4().hex,
            desc="tokenizing",
            num_proc=processes if processes > 1 else None,  # (contiguous shards, joined in order: the same rows)
        )
    table = mapped.data.table  # pyarrow: read columns without building Python lists
    status = table.column("status").to_numpy(zero_copy_only=False).astype(str)
    stats = SplitStats(rows=len(rows))
    for reason in DROP_REASONS:
        stats.dropped[reason] = int((status == reason).sum())
    stats.truncated = int((status == "truncated").sum())
    stats.turns_cut = int((status == "turns_cut").sum())
    if o.overlong == "error" and stats.dropped["overlong"]:
        longest = int(table.column("n_tokens").to_numpy()[status == "overlong"].max())
        raise SftuneError(
            f"{stats.dropped['overlong']:,} example(s) are longer than max_length {o.max_length} tokens "
            f"(longest: about {longest}). "
            f"Raise --max-length, or set --overlong drop or --overlong truncate."
        )
    keep = np.flatnonzero((status == "kept") | (status == "truncated") | (status == "turns_cut"))
    stats.boundary_merges = int(table.column("merged").to_numpy(zero_copy_only=False)[keep].sum())
    kept = table.select(["input_ids", "supervised"]).take(keep)
    flat, offsets = _flat_lists(kept.column("input_ids"), np.int32)
    mask, _ = _flat_lists(kept.column("supervised"), bool)
    examples, stats.dropped["no_targets"] = drop_untrained(Examples(flat, mask, offsets))
    stats.kept = len(examples)
    stats.tokens = int(len(examples.input_ids))
    stats.supervised_tokens = count_targets(examples)
    stats.untrained_tokens = int(len(examples.input_ids) - examples.supervised.sum())
    stats.length = length_summary(examples.lengths)
    return examples, stats


def _map(rows, function, **options):
    """`rows.map(function, **options)`. A signal that stops this process while worker processes tokenize
    (`signals.StopFlag` raises it here) reaches datasets' pool first, whose clean-up then raises an error of its own
    (multiprocess's TimeoutError, waiting for the tasks it cut short) in its place: the signal's stop is raised."""
    from sftune.signals import Preempted

    try:
        return rows.map(function, **options)
    except Exception as e:
        cause = e.__context__
        while cause is not None and not isinstance(cause, (Preempted, KeyboardInterrupt)):
            cause = cause.__context__
        if cause is None:
            raise
        raise cause from None


_worker_signals_reset = False  # (in a tokenizing process: `_in_worker` has reset its signal handlers)


def _in_worker(encode_batch, parent: int, batch: dict, indices: list[int]) -> dict:
    """`encode_batch` in a tokenizing process (`parent`: the id of the process that forked it). A worker forked from
    sftune has sftune's signal handlers, which stop a preparing process by raising (`signals.StopFlag`): in a worker
    that would end the task, not the process, and leave the parent waiting. Workers take the default action
    instead: a Ctrl-C (to the whole process group) ends them, and the parent, stopped by its own handler, ends the
    pool."""
    global _worker_signals_reset
    if os.getpid() != parent and not _worker_signals_reset:
        for signum in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)):
            if signum is not None:
                signal.signal(signum, signal.SIG_DFL)
        _worker_signals_reset = True
    return encode_batch(batch, indices)


def _flat_lists(column, dtype) -> tuple[np.ndarray, np.ndarray]:
    """A pyarrow list column as (flat values, offsets from 0)."""
    lists = column.combine_chunks()
    offsets = lists.offsets.to_numpy().astype(np.int64)
    values = lists.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]].astype(dtype)
    return np.ascontiguousarray(values), offsets - offsets[0]


# --- the whole pipeline, cached ------------------------------------------------


# --- chat templates and warnings ---------------------------------------------------


def chat_template_for(tokenizer) -> str:
    """The tokenizer's chat template, else sftune's default (set on the tokenizer, so it is saved with the model)."""
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the default one
        if not template.get("default"):
            raise SftuneError(f"the tokenizer names several chat templates ({', '.join(map(str, template))}) and "
                              f"none is 'default'; give the one to train with: --chat-template FILE")
        template = template["default"]
    if not template:
        tokenizer.chat_template = template = DEFAULT_CHAT_TEMPLATE
        log("chat: the tokenizer has no chat template; using sftune's default "
            "(<|role|>\\n{content}<|endoftext|> per turn; see README) and saving it with the model")
    return template


def load_chat_template(tokenizer) -> ChatTemplate:
    """What chat rows are rendered with: `chat_template_for`'s template and, where the tokenizer names a `tool_use`
    template beside its default (Hermes, Command R), that one for rows with tools, as `apply_chat_template(...,
    tools=...)` picks it."""
    template = ChatTemplate(chat_template_for(tokenizer), tokenizer)
    named = tokenizer.chat_template
    if isinstance(named, dict) and named.get("tool_use"):
        template.tool_use = ChatTemplate(named["tool_use"], tokenizer)
    warn_about_split_markers(template, tokenizer)
    return template


MARKER = re.compile(r"<\|[^<>|\s]{1,40}\|>|<｜[^<>｜]{1,40}｜>")  # <|im_start|>, DeepSeek's <｜Assistant｜>


def warn_about_split_markers(template: ChatTemplate, tokenizer) -> None:
    """Markers a template writes (`<|im_start|>`) that are not tokens of this tokenizer: each is then learned as
    several pieces of text, and generation cannot stop at an end-of-turn marker that is not one token. (A ChatML
    template on GPT-2's tokenizer; sftune's default template uses plain-text headers and EOS on purpose.)"""
    if template.source == DEFAULT_CHAT_TEMPLATE:
        return
    split = sorted({m for m in MARKER.findall(template.source)
                    if len(tokenizer(m, add_special_tokens=False)["input_ids"]) > 1})
    if split:
        log(f"warning: the chat template writes {', '.join(split[:4])}{' ...' if len(split) > 4 else ''}, which "
            f"this tokenizer splits into several tokens each: the model learns them as text, and generation cannot "
            f"stop at an end-of-turn marker that is not one token. Add them as tokens (--add-tokens "
            f"{' '.join(repr(m) for m in split)}), or use the template's own model family (--model, --tokenizer), or "
            f"a template written with this tokenizer's tokens (--chat-template)")


def check_end_of_turn(template: ChatTemplate) -> None:
    try:
        end = template.end_of_turn()
    except Exception as e:
        raise SftuneError(f"the chat template cannot render a simple user/assistant exchange: {e} "
                          f"(check --chat-template)") from None
    if template.rewrites_earlier_turns():
        log("chat: the template writes an assistant turn otherwise once more messages follow (e.g. it drops the "
            "turn's thinking); each assistant turn is trained as the template writes it when it is the last one, "
            "that is as the model generates it (README: Chat templates)")
    if not end.strip():
        log("warning: the chat template writes no end-of-turn marker after an assistant's answer, so the model "
            "will not learn where an answer ends; use a template that ends turns (e.g. with EOS) via --chat-template")


def warn_about(stats: dict[str, SplitStats], layout: Layout, options: EncodeOptions) -> None:
    """Say what the user should know before training: rows left out, untrained rows, answers cut before their end,
    merges."""
    for name, st in stats.items():
        why = {"empty": "empty", "too_short": f"under --min-tokens {options.min_tokens}",
               "overlong": f"over --max-length {options.max_length} (--overlong drop)"}
        if left_out := [f"{st.dropped[k]:,} {label}" for k, label in why.items() if st.dropped.get(k)]:
            log(f"data: {sum(st.dropped[k] for k in why):,} of {st.rows:,} {name} rows left out: {', '.join(left_out)}")
        if st.dropped["no_targets"]:
            log(f"warning: {st.dropped['no_targets']:,} {name} example(s) have no trained tokens and were dropped "
                f"({'truncation cut their answer' if st.truncated else 'empty answer'}); "
                f"see `sftune data --show N`")
        if st.turns_cut:
            log(f"data: {st.turns_cut:,} {name} conversation(s) longer than max_length end after their last whole "
                f"turn that fits: the turns after it are left out, and every answer kept ends with its end-of-turn "
                f"marker (--overlong truncate)")
        if st.truncated and options.truncation_side == "right":
            log(f"warning: {st.truncated:,} {name} example(s) were truncated on the right: they do not end with "
                f"EOS{'/end-of-turn' if layout.is_chat else ''}, so they do not teach the model "
                f"to stop (raise --max-length, or --overlong drop)")
        if st.boundary_merges:
            log(f"data: {st.boundary_merges:,} {name} example(s) tokenize differently as one text than as parts "
                f"(BPE merges across the prompt/answer boundary); sftune trains on the parts' tokens, which are "
                f"what the model sees when given the prompt alone")
