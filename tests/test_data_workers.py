"""--data-workers: several processes tokenize a split, each a contiguous share of its rows; the result, the errors
and a signal's stop are one process's."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import QUICKSTART_DATA, ROOT, prepare, run_main
from sftune.data.tokenize import tokenizing_processes, usable_cores

CHAT = ROOT / "examples" / "chat" / "data"


def write_rows(path, source, n: int, bad_at: int | None = None):
    """`n` rows of `source`'s train split repeated (a validation split as `source`'s), row `bad_at` a mistake."""
    path.mkdir(parents=True, exist_ok=True)
    rows = (source / "train.jsonl").read_text().splitlines()
    lines = [rows[i % len(rows)] for i in range(n)]
    if bad_at is not None:
        lines[bad_at] = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}]})
    (path / "train.jsonl").write_text("\n".join(lines) + "\n")
    (path / "validation.jsonl").write_text((source / "validation.jsonl").read_text())
    return path


@pytest.mark.parametrize("source", [CHAT, QUICKSTART_DATA], ids=["chat", "text"])
def test_several_processes_tokenize_what_one_does(source, tmp_path, gpt2_tokenizer, capsys):
    data = write_rows(tmp_path / "data", source, 1_100)
    one = prepare(data, gpt2_tokenizer, 128, cache_dir=tmp_path / "one")
    two = prepare(data, gpt2_tokenizer, 128, cache_dir=tmp_path / "two", workers=2)
    assert "data: train: 1,100 rows tokenized by 2 processes (--data-workers)" in capsys.readouterr().err
    for split in ("train", "validation"):
        a, b = getattr(one, split), getattr(two, split)
        for key in ("input_ids", "supervised", "offsets"):
            assert np.array_equal(getattr(a, key), getattr(b, key)), (split, key)
        assert one.stats[split] == two.stats[split]
    assert len(two.train) > 1_000


def test_a_mistake_in_a_workers_rows_is_said_as_in_one_process(tmp_path, small_model_dir, capsys):
    """Row 1,051 is in the second process's share: the same message, the same row number, no traceback."""
    data = write_rows(tmp_path / "data", CHAT, 1_100, bad_at=1_050)
    said = []
    for workers in ("1", "2", None):  # (None: the default, auto: one process a core for chat rows)
        asked = () if workers is None else ("--data-workers", workers)
        code, _, err = run_main(capsys, "data", "--model", str(small_model_dir), "--dataset", str(data),
                                "--cache-dir", str(tmp_path / f"cache-{workers}"), *asked)
        assert code == 2 and "Traceback" not in err, err
        said.append(err.strip().splitlines()[-1])
        if workers is None and usable_cores() > 1:
            assert "1,100 rows tokenized by 2 processes (--data-workers auto; 1 for one process)" in err
    assert said[0] == said[1] == said[2] and "train row 1051, message 1: unknown role 'wizard'" in said[1]
    for wrong, said_back in (("0", "must be at least 1 (1: tokenize in this process), or auto"),
                             ("many", "must be an integer or 'auto', got 'many'"),
                             ("2.5", "must be an integer or 'auto', got '2.5'")):
        code, _, err = run_main(capsys, "data", "--model", str(small_model_dir), "--dataset", str(data),
                                "--data-workers", wrong)
        assert code == 2 and "data_workers" in err and said_back in err and "Traceback" not in err, err


@pytest.mark.parametrize("workers, rows, chat, cores, processes", [
    (2, 1_100, True, 2, 2), (4, 1_100, False, 16, 2), (2, 1_000, True, 2, 1), (1, 100_000, True, 16, 1),
    ("auto", 1_100, True, 2, 2), ("auto", 100_000, True, 16, 16), ("auto", 600, True, 16, 1),
    ("auto", 67_349, False, 2, 1), ("auto", 67_349, False, 16, 8), ("auto", 67_349, False, 64, 8),
    ("auto", 10_000, False, 16, 1), ("auto", 1_000_000, False, 16, 8), ("auto", 5_000, True, 1, 1),
    ("auto", 1_000_000, True, 64, 16), ("auto", 1_000_000, False, 64, 8), (32, 1_000_000, True, 64, 32),
])
def test_auto_takes_a_process_a_core_for_chat_rows_and_few_for_plain_ones(workers, rows, chat, cores, processes):
    """Measured on the GPU machine's 16 cores (NOTES try 146): chat rows 4.9x faster in 16 processes, SST-2's plain
    rows 1.6x in 8 and slower in 16; on 2 cores plain rows are slower in 2 (try 132)."""
    assert tokenizing_processes(workers, rows, chat, cores) == processes


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_a_signal_while_workers_tokenize_stops_the_run_and_its_workers(how, tmp_path, small_model_dir):
    """SIGTERM to sftune, or Ctrl-C (SIGINT to the whole process group), while two processes tokenize 40,000 chat
    rows: the run stops at once with its usual message and exit status, and no tokenizing process is left."""
    data = write_rows(tmp_path / "data", CHAT, 40_000)
    out = tmp_path / "stopped-run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sftune", "train", "--model", str(small_model_dir), "--dataset", str(data),
         "--max-steps", "1", "--data-workers", "2", "--output-dir", str(out)],
        stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
    for line in proc.stderr:
        if line.startswith("data: train: 40,000 rows tokenized by 2 processes"):
            time.sleep(0.5)
            if how == "SIGTERM":
                proc.send_signal(signal.SIGTERM)
            else:
                os.killpg(proc.pid, signal.SIGINT)
            break
    err = proc.stderr.read()
    code = proc.wait(timeout=60)
    number = signal.SIGTERM if how == "SIGTERM" else signal.SIGINT
    assert code == 128 + number, err
    assert f"stopped by {signal.Signals(number).name}; before the first step" in err and "Traceback" not in err
    left = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(out) not in left  # (the workers are forks: the same command line)


def test_a_containers_cpu_quota_bounds_the_cores_auto_counts(tmp_path):
    """A container limited to fewer CPUs than its host (`docker --cpus 2`, a Kubernetes CPU limit) still lists every
    host core in its affinity: the cgroup's quota (v2's cpu.max, v1's cfs quota and period) is the bound."""
    from sftune.data.tokenize import cpu_quota, usable_cores

    v2, v1, none, unlimited = (tmp_path / name for name in ("v2", "v1", "none", "unlimited"))
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: 2 processes' worth
    (v1 / "cpu,cpuacct").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    none.mkdir()
    unlimited.mkdir()
    (unlimited / "cpu.max").write_text("max 100000\n")
    assert (cpu_quota(v2), cpu_quota(v1), cpu_quota(none), cpu_quota(unlimited)) == (1.5, 1.0, None, None)
    cores = len(os.sched_getaffinity(0))
    assert usable_cores(v2) == min(cores, 2) and usable_cores(v1) == 1
    assert usable_cores(none) == usable_cores(unlimited) == cores
