"""Tier 2: --streaming tokenizes on the fly with the same masks, and resumes at the right position."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICKSTART_DATA, prepare, read_jsonl, run_main, signal_at
from sftune.data import DataOptions
from sftune.data.streaming import StreamedData, StreamPosition

pytestmark = pytest.mark.slow


def test_streamed_examples_have_the_in_memory_masks(tmp_path, gpt2_tokenizer):
    d = tmp_path / "qa"
    d.mkdir()
    rows = [{"prompt": f"Q: what is {i} times three?\nA:", "completion": f" {3 * i}."} for i in range(90)]
    for split, part in (("train", rows[:80]), ("validation", rows[80:])):
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    memory = prepare(str(d), gpt2_tokenizer, 64, min_tokens=0, cache_dir=tmp_path / "c")
    stream = StreamedData(DataOptions(str(d), 64, min_tokens=0), gpt2_tokenizer)

    def as_set(ex):
        return sorted((tuple(ex.example(i)[0].tolist()), tuple(ex.example(i)[1].tolist())) for i in range(len(ex)))

    seen = [ex for ex, _, _ in stream.steps(0, StreamPosition(), 32, lambda lengths, key: [[list(range(len(lengths)))]])]
    assert sum(len(ex) for ex in seen) == 80  # 3 chunks of 32, 32, 16 rows
    assert sorted(t for ex in seen for t in as_set(ex)) == as_set(memory.train)  # same ids, same trained tokens
    assert as_set(stream.validation) == as_set(memory.validation)
    assert stream.layout == memory.layout


def test_streamed_tool_calls_keep_only_their_own_keys(tmp_path, gpt2_tokenizer):
    """A stream's chunks become tables: the tool rows' arguments and schemas must not gain each other's keys."""
    from test_formats import TOOL_ROWS

    d = tmp_path / "tools"
    d.mkdir()
    for split in ("train", "validation"):
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TOOL_ROWS))
    memory = prepare(str(d), gpt2_tokenizer, 512, min_tokens=0, cache_dir=tmp_path / "c")
    stream = StreamedData(DataOptions(str(d), 512, min_tokens=0), gpt2_tokenizer)
    chunk, _ = stream.first_chunk(8)

    def texts(ex):
        return sorted(gpt2_tokenizer.decode(ex.example(i)[0]) for i in range(len(ex)))

    assert texts(chunk) == texts(stream.validation) == texts(memory.train)
    assert not any("null" in t for t in texts(chunk))


def stream_args(model_dir, data, out, *extra):
    # 90 rows: the first 20 held out for validation, 70 streamed in chunks of 1 x 64 rows, so an epoch
    # is 64 + 6 steps; 76 steps cross a chunk boundary and an epoch boundary
    return ["train", "--model", str(model_dir), "--dataset", str(data), "--streaming", "--stream-val-rows", "20",
            "--batch-size", "1", "--epochs", "2", "--max-steps", "76", "--lr", "1e-3", "--precision", "fp32",
            "--log-every", "1", "--eval-every", "40", "--save-every", "40", "--no-run-report", "--output-dir", str(out),
            *extra]


def test_streaming_resume_equals_an_uninterrupted_run(small_model_dir, tmp_path, capsys):
    data = tmp_path / "reviews.jsonl"
    data.write_text("\n".join((QUICKSTART_DATA / "train.jsonl").read_text().splitlines()[:90]) + "\n")
    full = tmp_path / "full"
    code, _, err = run_main(capsys, *stream_args(small_model_dir, data, full))
    assert code == 0, err
    assert "first 20 rows are held out for validation" in err

    out = tmp_path / "run"
    code, err = signal_at(stream_args(small_model_dir, data, out), "step     67/")  # in the epoch's second chunk
    assert code == 143, err
    code, _, err = run_main(capsys, *stream_args(small_model_dir, data, out, "--resume", "auto"))
    assert code == 0, err
    assert "resumed from" in err

    a, b = load_file(full / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise: the same rows in the same steps
    losses = [[(r["step"], r["loss"]) for r in read_jsonl(o / "metrics.jsonl") if r["type"] == "train"]
              for o in (full, out)]
    assert losses[0] == losses[1] and len(losses[0]) == 76


def test_streaming_needs_max_steps(tiny_model_dir, tmp_path, capsys):
    code, _, err = run_main(capsys, "train", "--model", str(tiny_model_dir), "--dataset", str(QUICKSTART_DATA),
                            "--streaming", "--output-dir", str(tmp_path / "o"))
    assert code == 2 and "must be set with streaming" in err and "--max-steps" in err
