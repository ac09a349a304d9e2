"""Run several `sftune` commands one after another in each process of one torchrun launch, in one process group
(made here, so the runs use it and leave it open), so a test pays torchrun's start-up once:

    torchrun --standalone --nproc-per-node 2 tests/distributed_runs.py RUNS.json

RUNS.json is a list of argument lists for `sftune`, or of {"argv": [...], "exit": N, "late": [RANK, SECONDS]} for a
run that must exit N (a refusal) and, with "late", whose rank RANK starts it SECONDS after the others; the exit
status is the first unexpected one, else 0.
"""

import json
import os
import sys
import time

import torch.distributed

import sftune.cli
from sftune.cli import main, quick_exit

if __name__ == "__main__":
    torch.distributed.init_process_group("gloo")
    # a refusal's quiet ranks wait for torchrun to end them once rank 0 has said it (`cli.said_by_another_rank`); here
    # every process goes on to the next run instead, and rank 0 has said it by the time all meet there
    sftune.cli.QUIET_RANK_WAIT_S = 0.0
    status = 1
    try:
        for run in json.loads(open(sys.argv[1]).read()):
            argv, expected = (run["argv"], run.get("exit", 0)) if isinstance(run, dict) else (run, 0)
            if isinstance(run, dict) and "late" in run and int(os.environ["RANK"]) == run["late"][0]:
                time.sleep(run["late"][1])
            code = main(argv)
            if code != expected:
                status = code or 1
                break
        else:
            status = 0
    finally:
        torch.distributed.destroy_process_group()
    # as `python -m sftune` ends (`cli.quick_exit`): without the interpreter's teardown of every object, which
    # `python -m sftune` never does. (A rank aborted in 3 of ~60 launches of one test, "terminate called without an
    # active exception", exit -6, after the last run's final evaluation: a C++ thread destroyed unjoined, as at a
    # teardown; not seen again in 46 launches, so where exactly is not known: NOTES try 94)
    quick_exit(status)
