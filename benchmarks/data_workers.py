"""Tokenizing in several processes (`--data-workers`): `prepare_data` with an empty cache, for each count of
processes, on chat data (the example conversations repeated, numbered) and on SST-2's plain text.

    python benchmarks/data_workers.py                         # 1 and 2 processes, 40,000 chat rows and SST-2
    python benchmarks/data_workers.py --workers 1 4 8 --rows 100000

Prints each run's seconds (the best of --repeats) and whether every count gives the same examples as one process.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "examples" / "chat" / "data"
SST2 = ROOT.parent / "shared" / "data" / "sst2"


def chat_rows(path: Path, n: int) -> Path:
    rows = [json.loads(line) for line in (CHAT / "train.jsonl").read_text().splitlines()]
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "train.jsonl", "w") as f:
        for i in range(n):
            row = json.loads(json.dumps(rows[i % len(rows)]))
            row["messages"][-1]["content"] += f" ({i})"  # (no two rows alike)
            f.write(json.dumps(row) + "\n")
    (path / "validation.jsonl").write_text((CHAT / "validation.jsonl").read_text())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, default=40_000, help="chat rows")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tokenizer", default="bundled:gpt2")
    args = parser.parse_args()

    from sftune.data import DataOptions, prepare_data
    from sftune.modeling import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        data = {"chat": (chat_rows(Path(tmp) / "chat", args.rows), {})}
        if SST2.is_dir():
            data["sst2"] = (SST2, {"text_column": "sentence"})
        table = []
        for name, (path, options) in data.items():
            first = None
            for workers in args.workers:
                times = []
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    prepared = prepare_data(DataOptions(str(path), 1024, cache_dir=tempfile.mkdtemp(dir=tmp),
                                                        workers=workers, **options), tokenizer)
                    times.append(time.perf_counter() - started)
                arrays = [getattr(getattr(prepared, s), k) for s in ("train", "validation")
                          for k in ("input_ids", "supervised", "offsets")]
                first = first or arrays
                same = all(np.array_equal(a, b) for a, b in zip(arrays, first))
                table.append((name, len(prepared.train), workers, min(times), same))
    print(f"\n{os.cpu_count()} cores")
    print("| data | examples | processes | seconds | the same as 1 |\n| --- | ---: | ---: | ---: | --- |")
    for name, rows, workers, seconds, same in table:
        print(f"| {name} | {rows:,} | {workers} | {seconds:.2f} | {same} |")


if __name__ == "__main__":
    main()
