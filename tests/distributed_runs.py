"""Run several `sftune` commands one after another in each process of one torchrun launch, in one process group
(made here, so the runs use it and leave it open), so a test pays torchrun's start-up once:

    torchrun --standalone --nproc-per-node 2 tests/distributed_runs.py RUNS.json

RUNS.json is a list of argument lists for `sftune`, or of {"argv": [...], "exit": N} for a run that must exit N (a
refusal); the exit status is the first unexpected one, else 0.
"""

import json
import sys

import torch.distributed

from sftune.cli import main

if __name__ == "__main__":
    torch.distributed.init_process_group("gloo")
    try:
        for run in json.loads(open(sys.argv[1]).read()):
            argv, expected = (run["argv"], run["exit"]) if isinstance(run, dict) else (run, 0)
            code = main(argv)
            if code != expected:
                sys.exit(code or 1)
    finally:
        torch.distributed.destroy_process_group()
