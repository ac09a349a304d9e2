"""Host memory of the ranks when a whole model's checkpoint (one process or DDP) resumes under FSDP.

    python benchmarks/resume_memory.py               # GPT-2 small (random init), 2 ranks on this CPU

A one-process run of GPT-2 small writes its step-1 checkpoint (the model, ~0.5 GB, and AdamW's state by parameter
index, ~1 GB); `torchrun --nproc-per-node 2 ... --strategy fsdp --resume` then continues it. Every 0.1 s the
script reads each rank's anonymous resident memory (`RssAnon` in /proc: memory the process owns, not file pages
it maps and shares with the other ranks through the page cache) and prints the ranks' peaks until the resume is
logged, and over the whole run. benchmarks/NOTES.md try 43 holds the figures.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPT2 = ROOT.parent / "shared" / "models" / "gpt2"
COMMON = ["--model", str(GPT2), "--init", "random", "--dataset", str(ROOT / "examples" / "quickstart" / "data"),
          "--max-steps", "2", "--save-every", "1", "--precision", "fp32"]


def descendants(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [p for child in children for p in (int(child), *descendants(int(child)))]


def rss_anon_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one = subprocess.run([sys.executable, "-m", "sftune", "train", *COMMON, "--batch-size", "4",
                              "--output-dir", str(tmp / "one")], capture_output=True, text=True)
        assert one.returncode == 0, one.stderr
        log = tmp / "fsdp.log"
        with open(log, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc-per-node", "2", "-m", "sftune", "train", *COMMON, "--batch-size", "2",
                                     "--strategy", "fsdp", "--output-dir", str(tmp / "fsdp"),
                                     "--resume", str(tmp / "one" / "checkpoints" / "step-1")],
                                    stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"})
            peak, at_resume = {}, None
            while proc.poll() is None:
                for pid in descendants(proc.pid):
                    peak[pid] = max(peak.get(pid, 0.0), rss_anon_mib(pid))
                if at_resume is None and "resumed from" in log.read_text():
                    at_resume = dict(peak)
                time.sleep(0.1)
        assert proc.returncode == 0, log.read_text()
    ranks = sorted(peak, key=peak.get, reverse=True)[:2]  # (torchrun itself and pgrep hold far less)
    print("| when | rank peaks, MiB (RssAnon) | sum |\n| --- | --- | ---: |")
    for when, values in (("until the resume is logged", at_resume or {}), ("whole run", peak)):
        figures = [values.get(pid, 0.0) for pid in ranks]
        print(f"| {when} | {' / '.join(f'{v:,.0f}' for v in figures)} | {sum(figures):,.0f} |")


if __name__ == "__main__":
    main()
