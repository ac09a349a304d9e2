"""What `sftune data` reports: per split, what was kept and dropped and why, and what
batching will cost (optimizer steps, padding efficiency)."""

from __future__ import annotations

from dataclasses import asdict

from sftune.batching import IGNORE_INDEX, collate, epoch_steps, length_sorted_batches, packed_epoch_steps, padding_efficiency
from sftune.data import PreparedData


def data_report(
    data: PreparedData,
    dataset: str,
    max_length: int,
    batch_size: int,
    grad_accum: int,
    eval_batch_size: int,
    seed: int,
    batch_tokens: int | None = None,
    group_by_length: bool = True,
    packing: bool = False,
    show: int = 0,
) -> dict:
    """A JSON-ready summary of a prepared dataset, with the first `show` training examples
    as they are batched (`labels` is IGNORE_INDEX where a token is not trained on)."""
    splits = {}
    for name, examples in (("train", data.train), ("validation", data.validation)):
        splits[name] = asdict(data.stats[name])
    # padding efficiency of the batching in use: the first epoch's training batches, length-sorted for validation
    lengths = data.train.lengths
    if packing:
        steps = packed_epoch_steps(lengths, max_length, batch_size, grad_accum, seed, 0, batch_tokens)
        micro = [b for step in steps for b in step]
        rows = [r for b in micro for r in b]
        splits["train"]["packed_rows"] = len(rows)
        splits["train"]["pack_fill_rate"] = int(lengths.sum()) / (len(rows) * max_length)
        # a micro-batch of packed rows is padded to its fullest row
        real = sum(int(lengths[r].sum()) for b in micro for r in b)
        padded = sum(len(b) * max(int(lengths[r].sum()) for r in b) for b in micro)
        splits["train"]["padding_efficiency"] = real / padded
    else:
        steps = epoch_steps(lengths, batch_size, grad_accum, seed, 0, batch_tokens, group_by_length)
        micro = [b for step in steps for b in step]
        splits["train"]["padding_efficiency"] = padding_efficiency(lengths, micro)
    splits["train"]["micro_batches_per_epoch"] = len(micro)
    splits["train"]["optimizer_steps_per_epoch"] = len(steps)
    splits["validation"]["padding_efficiency"] = padding_efficiency(
        data.validation.lengths, length_sorted_batches(data.validation.lengths, eval_batch_size))
    examples = []
    for i in range(min(show, len(data.train))):
        batch = collate(data.train, [i], pad_id=0)  # a single row: no padding
        examples.append({"index": i, "input_ids": batch["input_ids"][0].tolist(), "labels": batch["labels"][0].tolist()})
    return {
        "dataset": dataset,
        "text_column": data.text_column,
        "max_length": max_length,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "batch_tokens": batch_tokens,
        "group_by_length": group_by_length,
        "packing": packing,
        "cache": {"path": str(data.cache_path), "hit": data.from_cache},
        "seconds": round(data.seconds, 3),
        "splits": splits,
        "examples": examples,
    }


def format_data_report(report: dict, tokenizer) -> str:
    s = report["splits"]
    lines = [
        f"dataset {report['dataset']} (text column '{report['text_column']}', max_length {report['max_length']}); "
        f"{'read from cache' if report['cache']['hit'] else 'tokenized'} in {report['seconds']:.2f}s",
        "",
        f"{'split':<11}{'rows':>9}{'kept':>9}{'too_short':>11}{'overlong':>10}{'empty':>7}{'no_targets':>11}{'truncated':>11}"
        f"{'tokens':>11}{'mean':>7}{'p50':>6}{'p95':>6}{'max':>6}{'targets':>11}",
    ]
    for name, st in s.items():
        d, ln = st["dropped"], st["length"]
        lines.append(
            f"{name:<11}{st['rows']:>9,}{st['kept']:>9,}{d['too_short']:>11,}{d['overlong']:>10,}{d['empty']:>7,}"
            f"{d['no_targets']:>11,}"
            f"{st['truncated']:>11,}{st['tokens']:>11,}{ln.get('mean', 0):>7.1f}{ln.get('p50', 0):>6.0f}"
            f"{ln.get('p95', 0):>6.0f}{ln.get('max', 0):>6}{st['supervised_tokens']:>11,}"
        )
    t = s["train"]
    lines += [
        "",
        f"train: {t['micro_batches_per_epoch']:,} batches of up to {report['batch_size']} "
        f"{'packed rows' if report['packing'] else 'rows'} per epoch = "
        f"{t['optimizer_steps_per_epoch']:,} optimizer steps (grad_accum {report['grad_accum']}); "
        f"padding efficiency {100 * t['padding_efficiency']:.1f}% (real / computed tokens, "
        f"{'packed' if report['packing'] else 'length-grouped' if report['group_by_length'] else 'shuffled'} batches)"
        + (f"; {t['packed_rows']:,} packed rows of {report['max_length']}, {100 * t['pack_fill_rate']:.1f}% full"
           if report["packing"] else ""),
        f"validation: padding efficiency {100 * s['validation']['padding_efficiency']:.1f}% (length-sorted batches)",
    ]
    for ex in report["examples"]:
        lines.append(f"\nexample {ex['index']}: {tokenizer.decode(ex['input_ids'])!r}")
        lines.append(f"  {'pos':>4} {'id':>7} {'label':>7}  token")
        for pos, (i, lab) in enumerate(zip(ex["input_ids"], ex["labels"])):
            mark = "" if lab != IGNORE_INDEX else "  (not trained)"
            lines.append(f"  {pos:>4} {i:>7} {lab:>7}  {tokenizer.convert_ids_to_tokens(i)!r}{mark}")
    return "\n".join(lines)
