"""What `sftune data` reports: per split, what was kept and dropped and why, and what
batching will cost (optimizer steps, padding efficiency)."""

from __future__ import annotations

from dataclasses import asdict

from sftune.batching import IGNORE_INDEX, collate, heaviest_rows, length_sorted_batches, padding_efficiency
from sftune.data.examples import weighted_count
from sftune.data.pipeline import PreparedData


def data_report(
    data: PreparedData,
    dataset: str,
    max_length: int,
    batch_size: int,
    grad_accum: int,
    eval_batch_size: int,
    steps: list,
    batch_tokens: int | None = None,
    group_by_length: bool = True,
    packing: bool = False,
    show: int = 0,
    streaming: bool = False,
    ranks: int = 1,
) -> dict:
    """A JSON-ready summary of a prepared dataset, with the first `show` training examples
    as they are batched (`labels` is IGNORE_INDEX where a token is not trained on).

    `steps` are the first epoch's optimizer steps as training plans them (`steps.plan_steps`) on `ranks` processes:
    rows of example indices, or of packed rows with `packing`; each rank pads its share of a micro-batch."""
    splits = {}
    for name, examples in (("train", data.train), ("validation", data.validation)):
        splits[name] = asdict(data.stats[name])
    # padding efficiency of the batching in use: the first epoch's training batches, length-sorted for validation
    lengths = data.train.lengths
    micro = [b for step in steps for b in step]
    shares = [b[rank::ranks] for b in micro for rank in range(ranks) if len(b[rank::ranks])]  # (`Dist.shard`)
    if packing:
        rows = [r for b in micro for r in b]
        real = sum(int(lengths[r].sum()) for b in micro for r in b)
        splits["train"]["packed_rows"] = len(rows)
        splits["train"]["pack_fill_rate"] = real / (len(rows) * max_length)
        # a micro-batch of packed rows is padded to its fullest row
        padded = sum(len(b) * max(int(lengths[r].sum()) for r in b) for b in shares)
        splits["train"]["padding_efficiency"] = real / padded
    else:
        splits["train"]["padding_efficiency"] = padding_efficiency(lengths, shares)
    # (other than `kept` in a weighted mixture)
    splits["train"]["examples_per_epoch"] = sum(len(r) for b in micro for r in b) if packing else sum(map(len, micro))
    splits["train"]["micro_batches_per_epoch"] = len(micro)
    splits["train"]["optimizer_steps_per_epoch"] = len(steps)
    splits["train"]["heaviest_micro_batch"] = heaviest_shape(lengths, batch_size, ranks, batch_tokens, packing,
                                                             max_length)
    splits["validation"]["padding_efficiency"] = padding_efficiency(
        data.validation.lengths, length_sorted_batches(data.validation.lengths, eval_batch_size))
    examples = []
    for i in range(min(show, len(data.train))):
        batch = collate(data.train, [i], pad_id=0)  # a single row: no padding
        examples.append({"index": i, "input_ids": batch["input_ids"][0].tolist(), "labels": batch["labels"][0].tolist()})
    return {
        "dataset": dataset,
        "format": data.layout.format,
        "columns": data.layout.columns,
        "max_length": max_length,
        "batch_size": batch_size,
        "ranks": ranks,
        "grad_accum": grad_accum,
        "batch_tokens": batch_tokens,
        "group_by_length": group_by_length,
        "packing": packing,
        "streaming": streaming,
        "cache": {"path": str(data.cache_path) if data.cache_path else None, "hit": data.from_cache},
        "seconds": round(data.seconds, 3),
        "splits": splits,
        "datasets": [{"dataset": name, "format": part.layout.format, "columns": part.layout.columns,
                      "weight": weight, "train_per_epoch": None if streaming else weighted_count(len(part.train), weight),
                      "cache": {"path": str(part.cache_path) if part.cache_path else None, "hit": part.from_cache},
                      "splits": {split: asdict(part.stats[split]) for split in ("train", "validation")}}
                     for (name, part), weight in zip(data.parts, data.weights or [1.0] * len(data.parts))
                     if len(data.parts) > 1],
        # a mixture's datasets (the splits above: their totals)
        "validation_datasets": [{"dataset": name, "format": part.layout.format, "columns": part.layout.columns,
                                 "splits": {"validation": asdict(part.stats["validation"])}}
                                for name, part in data.held_out],  # validated on alone
        "examples": examples,
    }


def marked_text(tokenizer, input_ids: list[int], labels: list[int], color: bool = False) -> str:
    """The example's text with its trained tokens marked: [[...]], or green on a terminal.

    Runs of trained and untrained tokens are decoded separately; their boundaries are the
    parts' own boundaries, so no character is split.
    """
    runs: list[tuple[bool, list[int]]] = []
    for i, lab in zip(input_ids, labels):
        trained = lab != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(i)
        else:
            runs.append((trained, [i]))
    open_, close = ("\x1b[1;32m", "\x1b[0m") if color else ("[[", "]]")
    return "".join(open_ + tokenizer.decode(ids) + close if trained else tokenizer.decode(ids) for trained, ids in runs)


def heaviest_shape(lengths, batch_size: int, ranks: int, batch_tokens: int | None, packing: bool,
                   max_length: int) -> list[int]:
    """(rows, width) of the heaviest micro-batch a step can hold, per rank, as `--memory-check` makes it: the
    batch_size x ranks longest examples cut by --batch-tokens (each rank's share padded to its longest), or
    batch_size packed rows of max_length."""
    if packing:
        return [batch_size, max_length]
    rows = heaviest_rows(lengths, batch_size * ranks, batch_tokens * ranks if batch_tokens else None)
    return [len(rows[0::ranks]), int(lengths[rows[0]])] if len(rows) else [0, 0]


def format_data_report(report: dict, tokenizer, color: bool = False) -> str:
    s = report["splits"]
    columns = ", ".join(f"{k}={v}" for k, v in report["columns"].items())
    lines = [
        f"dataset {report['dataset']}: format {report['format']}{f' ({columns})' if columns else ''}, "
        f"max_length {report['max_length']}; "
        f"{'read from cache' if report['cache']['hit'] else 'tokenized'} in {report['seconds']:.2f}s",
        "",
        f"{'split':<11}{'rows':>9}{'kept':>9}{'too_short':>11}{'overlong':>10}{'empty':>7}{'no_targets':>11}{'truncated':>11}"
        f"{'tokens':>11}{'mean':>7}{'p50':>6}{'p95':>6}{'max':>6}{'trained':>11}{'untrained':>11}",
    ]
    rows = list(s.items())
    held = report.get("validation_datasets", [])  # (then the trained datasets give no validation rows)
    for i, part in enumerate(report.get("datasets", []), 1):  # a mixture: each dataset's rows below the totals
        rows += [(f"{i}:{'val' if name == 'validation' else name}", st) for name, st in part["splits"].items()
                 if not (held and name == "validation")]
    for i, part in enumerate(report.get("validation_datasets", []), 1):
        rows.append((f"v{i}:val", part["splits"]["validation"]))
    for name, st in rows:
        d, ln = st["dropped"], st["length"]
        lines.append(
            f"{name:<11}{st['rows']:>9,}{st['kept']:>9,}{d['too_short']:>11,}{d['overlong']:>10,}{d['empty']:>7,}"
            f"{d['no_targets']:>11,}{st['truncated'] + st.get('turns_cut', 0):>11,}"  # (shortened either way)
            f"{st['tokens']:>11,}{ln.get('mean', 0):>7.1f}{ln.get('p50', 0):>6.0f}"
            f"{ln.get('p95', 0):>6.0f}{ln.get('max', 0):>6}{st['supervised_tokens']:>11,}{st['untrained_tokens']:>11,}"
        )
    for i, part in enumerate(report.get("datasets", []), 1):
        columns = ", ".join(f"{k}={v}" for k, v in part["columns"].items())
        weighted = ("" if part.get("weight", 1) == 1 else f", weight {part['weight']:g} (its share of the rows drawn)"
                    if part.get("train_per_epoch") is None else
                    f", weight {part['weight']:g}: {part['train_per_epoch']:,} train examples an epoch")
        lines.append(f"{i}: {part['dataset']}, format {part['format']} ({columns}), "
                     f"{'read from cache' if part['cache']['hit'] else 'tokenized'}{weighted}")
    for i, part in enumerate(report.get("validation_datasets", []), 1):
        columns = ", ".join(f"{k}={v}" for k, v in part["columns"].items())
        lines.append(f"v{i}: {part['dataset']}, format {part['format']} ({columns}), validated on")
    t = s["train"]
    lines += [
        "(trained: tokens the loss is computed on; untrained: prompt, template and other tokens it never sees)",
        "",
        f"train: {t['micro_batches_per_epoch']:,} batches of up to {report['batch_size'] * report['ranks']} "
        f"{'packed rows' if report['packing'] else 'rows'} "
        + (f"({report['batch_size']} a rank x {report['ranks']} ranks) " if report["ranks"] > 1 else "") +
        f"{'in the first chunk' if report.get('streaming') else 'per epoch'} = "
        f"{t['optimizer_steps_per_epoch']:,} optimizer steps (grad_accum {report['grad_accum']}); "
        f"padding efficiency {100 * t['padding_efficiency']:.1f}% (real / computed tokens, "
        f"{'packed' if report['packing'] else 'length-grouped' if report['group_by_length'] else 'shuffled'} batches)"
        + (f"; {t['packed_rows']:,} packed rows of {report['max_length']}, {100 * t['pack_fill_rate']:.1f}% full"
           if report["packing"] else ""),
        f"validation: padding efficiency {100 * s['validation']['padding_efficiency']:.1f}% (length-sorted batches)",
        "heaviest micro-batch a step can hold: {} rows x {} tokens{} (its memory decides the batch size: "
        "--memory-check runs it after the first step, on a GPU by default)".format(
            *t["heaviest_micro_batch"], " a rank" if report["ranks"] > 1 else ""),
    ]
    if report["examples"]:
        lines.append("\ntrained tokens are " + ("shown in green" if color else "in [[double brackets]]") + ":")
    for ex in report["examples"]:
        trained = sum(lab != IGNORE_INDEX for lab in ex["labels"])
        lines.append(f"\n--- train example {ex['index']} ({len(ex['input_ids'])} tokens, {trained} trained) ---")
        lines.append(marked_text(tokenizer, ex["input_ids"], ex["labels"], color))
    return "\n".join(lines)
