"""The benchmark scripts CI never runs in full (they need a GPU or minutes): each parses its flags, and the GPU
session script is valid bash with the phases its header names. A broken script would cost a GPU session's
scarce device time to find."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", ["throughput.py", "gpu_check.py", "trl_baseline.py", "memory.py",
                                    "resume_memory.py", "chat_templates.py", "blocks_probe.py", "samples.py",
                                    "data_workers.py"])
def test_a_benchmark_script_answers_help(script):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


def test_the_gpu_session_script_is_valid_and_runs_every_phase_it_names():
    script = BENCHMARKS / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    named = set(re.findall(r"^#   ([\w-]+) +\(\d+\)", text, flags=re.M))
    cases = {case for cases in re.findall(r"^    ([\w|-]+)\)", text, flags=re.M) for case in cases.split("|")}
    assert named == cases == {"check", "loss", "startup", "speed", "speed-steps", "whole-job", "blocks", "blocks-1b", "runs", "runs-lora", "probe",
                              "samples", "workers", "fusion", "fusion-seed", "peers", "peers-1b", "memory",
                              "profile"}


def test_no_undefined_or_unused_names_anywhere():
    """pyflakes' checks (ruff's F rules) over the package, the tests and the benchmarks: the benchmark scripts'
    GPU-only functions run nowhere in CI, so a misspelt name there would first fail on a GPU."""
    root = BENCHMARKS.parent
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F", "--no-cache", "src", "tests",
                           "benchmarks"], capture_output=True, text=True, cwd=root, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_chat_template_survey_tells_rendered_generated_and_refused(tmp_path):
    from test_formats import CHATML, DROPS_OLD_THINKING

    (tmp_path / "chatml.jinja").write_text(CHATML)
    (tmp_path / "drops_thinking.jinja").write_text(DROPS_OLD_THINKING)
    (tmp_path / "no_system.jinja").write_text("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System "
                                              "role not supported') }}{% endif %}" + CHATML)
    (tmp_path / "chatml_training.jinja").write_text(CHATML)  # skipped without --all
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "chat_templates.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split(" | ")[0].strip("| "): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert rows["chatml"].count("rendered") == 3
    assert "generated" in rows["drops_thinking"]
    assert "error: System role not supported" in rows["no_system"] and "chatml_training" not in rows
    assert "3 templates x 3 conversations" in proc.stdout
