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


def test_a_stream_held_out_whole_for_validation_is_an_error(tiny_model_dir, text_file, tmp_path, capsys):
    """120 rows without a validation split, streamed: its first --stream-val-rows (1,000) are held out, which is all
    of it; the run trained nothing and saved the model it was given, exit 0. Now said before the model loads."""
    code, _, err = run_main(capsys, "train", "--model", str(tiny_model_dir), "--dataset", str(text_file), "--streaming",
                            "--max-steps", "2", "--output-dir", str(tmp_path / "o"))
    assert code == 2 and "rows were all held out for validation (--stream-val-rows 1000" in err, err
    assert "lower --stream-val-rows" in err and not (tmp_path / "o").exists()


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mixed_streams_take_each_row_once_drawn_by_weight(tmp_path, gpt2_tokenizer):
    """Two streams of other formats at weights 3 and 1: each chunk draws about three rows of the first for one of
    the second until the first runs out; over the epoch every training row of each comes once, tokenized as its
    own dataset alone; a run resumed from a position after the first ran out continues with the same chunks."""
    from sftune.data.streaming import MixedStreams

    reviews = [json.loads(x) for x in (QUICKSTART_DATA / "train.jsonl").read_text().splitlines()[:70]]
    a = _write(tmp_path / "a.jsonl", reviews)  # the first 10 rows held out: 60 to train on
    (tmp_path / "b").mkdir()
    _write(tmp_path / "b" / "train.jsonl", [{"prompt": f"Q: {i} x 3?\nA:", "completion": f" {3 * i}."}
                                            for i in range(200)])
    _write(tmp_path / "b" / "validation.jsonl", [{"prompt": f"Q: {i} x 4?\nA:", "completion": f" {4 * i}."}
                                                 for i in range(5)])
    options = DataOptions("unused", 64, min_tokens=0, stream_val_rows=10,
                          mixture=({"dataset": str(a), "weight": 3.0}, {"dataset": str(tmp_path / "b")}))
    mixed = MixedStreams(options, gpt2_tokenizer)
    assert mixed.validation_groups == [(str(a), 10), (str(tmp_path / "b"), 5)]
    assert mixed.layout.format == "text+prompt_completion"

    def one_step(lengths, key):
        return [[list(range(len(lengths)))]]

    def ids(ex):
        return sorted(tuple(ex.example(i)[0].tolist()) for i in range(len(ex)))

    chunks = list(mixed.steps(0, StreamPosition(), 32, one_step))
    assert sum(len(ex) for ex, _, _ in chunks) == 260 and len(chunks) == 9  # 8 chunks of 32, then 4 rows
    assert 40 <= chunks[2][2].streams[0] <= 56  # (rows read before the third chunk) of the first 64, about 3 in 4 drawn from the first stream
    alone = [prepare(d, gpt2_tokenizer, 64, min_tokens=0, cache_dir=tmp_path / "c", val_fraction=10 / 70)
             for d in (tmp_path / "b",)]
    seen = sorted(t for ex, _, _ in chunks for t in ids(ex))
    assert [t for t in seen if t in set(ids(alone[0].train))] == ids(alone[0].train)  # every row of b, once
    assert len(seen) == 260 and len(set(seen) - set(ids(alone[0].train))) == 60  # and 60 others: a's
    ended_at = next(k for k, (_, _, after) in enumerate(chunks) if after.ended[0])
    assert 0 < ended_at < 8 and chunks[ended_at][2].streams[0] == 60 and not chunks[-1][2].ended[1]
    resumed = list(mixed.steps(0, chunks[ended_at + 1][2], 32, one_step))  # from the first chunk after a ran out
    assert [ids(ex) for ex, _, _ in resumed] == [ids(ex) for ex, _, _ in chunks[ended_at + 2:]]

    # with --val-dataset: every stream's rows are trained on, and validation is that dataset alone, as text
    held = _write(tmp_path / "held.jsonl", [{"text": f"held out sentence number {i}"} for i in range(7)])
    mixed = MixedStreams(DataOptions("unused", 64, min_tokens=0, stream_val_rows=10, val_dataset=str(held),
                                     cache_dir=tmp_path / "c", mixture=options.mixture), gpt2_tokenizer)
    assert len(mixed.validation) == 7 and mixed.validation_groups == [] and mixed.layout.format == "text+prompt_completion"
    assert sum(len(ex) for ex, _, _ in mixed.steps(0, StreamPosition(), 32, one_step)) == 70 + 200


def test_a_streamed_mixture_resumes_exactly_after_sigterm(small_model_dir, tmp_path, capsys):
    """Two streams (30 and 70 training rows, weights 2 and 1, chunks of 64 rows): the first runs out in the
    epoch's first chunk; a run stopped in the second chunk and resumed ends bitwise as an uninterrupted one."""
    lines = (QUICKSTART_DATA / "train.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "a.jsonl").write_text("".join(lines[:40]))
    (tmp_path / "b.jsonl").write_text("".join(lines[40:120]))

    def args(out, *extra):
        return ["train", "--model", str(small_model_dir), "--datasets", f"{{dataset: {tmp_path / 'a.jsonl'}, weight: 2}}",
                str(tmp_path / "b.jsonl"), "--streaming", "--stream-val-rows", "10", "--batch-size", "1",
                "--max-steps", "110", "--lr", "1e-3", "--precision", "fp32", "--log-every", "1", "--eval-every", "60",
                "--save-every", "60", "--no-run-report", "--report-to", "none", "--sample-prompts", "",
                "--output-dir", str(out), *extra]

    full = tmp_path / "full"
    code, _, err = run_main(capsys, *args(full))
    assert code == 0, err
    assert "by dataset:" in err
    out = tmp_path / "run"
    code, err = signal_at(args(out), "step     80/")  # in the epoch's second chunk, the first stream ended
    assert code == 143, err
    from sftune.checkpoint import STATE_FILE

    saved = max((out / "checkpoints").iterdir(), key=lambda p: int(p.name.split("-")[1]))
    position = json.loads((saved / STATE_FILE).read_text())["stream"]
    assert position["chunk"] == 1 and position["ended"] == [True, False] and position["streams"][0] == 30
    code, _, err = run_main(capsys, *args(out, "--resume", "auto"))
    assert code == 0, err
    assert f"resumed from {saved}" in err
    a, b = load_file(full / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[(r["step"], r["loss"]) for r in read_jsonl(o / "metrics.jsonl") if r["type"] == "train"]
              for o in (full, out)]
    assert losses[0] == losses[1] and len(losses[0]) == 110

    code, report, err = run_main(capsys, "data", "--config", str(out / "config.yaml"), "--json")  # the first chunk
    assert code == 0, err
    report = json.loads(report)
    parts = [(d["weight"], d["train_per_epoch"], d["splits"]["train"]["kept"], d["splits"]["validation"]["kept"])
             for d in report["datasets"]]
    assert parts == [(2.0, None, 30, 10), (1.0, None, 34, 10)]  # a's 30 rows ran out in the chunk's 64 draws
    assert report["splits"]["train"]["kept"] == 64 and report["streaming"]
    assert report["splits"]["train"]["examples_per_epoch"] == 64  # (the weights drew the rows: the chunk is planned whole)
