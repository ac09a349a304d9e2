"""Tier 2: what a user watches: TensorBoard curves equal to metrics.jsonl (continued without duplicates after a
resume), the richer log line (token accuracy, tokens seen, ETA), sample generations at each evaluation."""

import json
import shutil

import pytest

from conftest import QUICKSTART_DATA, read_jsonl, run_main

pytestmark = pytest.mark.slow


def tb_args(model_dir, out, *extra):
    return ["train", "--model", str(model_dir), "--dataset", str(QUICKSTART_DATA), "--max-steps", "12",
            "--batch-size", "8", "--lr", "3e-3", "--precision", "fp32", "--eval-every", "6", "--log-every", "1",
            "--save-every", "4", "--keep-last", "3", "--sample-prompts", "the film is", "--sample-max-new-tokens",
            "4", "--output-dir", str(out), *extra]


def events(out):
    """What TensorBoard's own server reads (its plugin accumulator, which drops orphaned events of every kind)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_curves_equal_the_metrics_and_continue_after_a_resume(small_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_main(capsys, *tb_args(small_model_dir, out))
    assert code == 0, err
    rows = read_jsonl(out / "metrics.jsonl")
    train = [r for r in rows if r["type"] == "train"]
    # the log line: loss, token accuracy, throughput, tokens seen, ETA
    assert f"step     12/12 | epoch 0.24 | loss {train[-1]['loss']:.4f} | acc {train[-1]['token_accuracy']:.3f}" in err
    assert f"| {train[-1]['tokens']:,} tokens | eta 0:00:00" in err
    assert all(0 <= r["token_accuracy"] <= 1 for r in train) and train[-1]["token_accuracy"] > 0
    # greedy samples at each evaluation (0, 6, 12), in the metrics and the log
    samples = [r for r in rows if r["type"] == "sample"]
    assert [(r["step"], r["prompt"]) for r in samples] == [(0, "the film is"), (6, "the film is"), (12, "the film is")]
    assert f"sample step 12: 'the film is' -> {samples[-1]['completion']!r}" in err

    def curves(acc):
        from tensorboard.util import tensor_util

        return ({tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
                 for tag in ("train/loss", "eval/loss")}, [e.step for e in acc.Tensors("samples/0/text_summary")])

    (tb, texts) = curves(events(out))
    assert tb["train/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in train]
    assert tb["eval/loss"] == [(r["step"], pytest.approx(r["val_loss"], rel=1e-6)) for r in rows if r["type"] == "eval"]
    assert texts == [0, 6, 12]

    # as if the run had been killed after step 12's events but before its checkpoint: resume from step 8
    shutil.rmtree(out / "checkpoints" / "step-12")
    code, _, err = run_main(capsys, *tb_args(small_model_dir, out, "--resume", "auto"))
    assert code == 0, err
    assert "resumed from" in err and "step-8" in err
    resumed, resumed_texts = curves(events(out))
    assert [s for s, _ in resumed["train/loss"]] == list(range(1, 13))  # steps 9-12 once, not twice
    assert resumed == tb and resumed_texts == texts  # and the same values: the resume is exact


def test_report_to_none_and_a_missing_wandb(small_model_dir, tmp_path, capsys):
    out = tmp_path / "none"
    code, _, err = run_main(capsys, *tb_args(small_model_dir, out, "--max-steps", "2", "--report-to", "none"))
    assert code == 0, err
    assert not (out / "tensorboard").exists()
    try:
        import wandb  # noqa: F401
    except ImportError:
        code, _, err = run_main(capsys, *tb_args(small_model_dir, tmp_path / "w", "--report-to", "wandb"))
        assert code == 2 and "needs the wandb package: pip install wandb" in err
        assert not (tmp_path / "w").exists()


def test_the_run_report_and_loss_png(small_model_dir, tmp_path, capsys):
    """`sftune train` writes report.html and loss.png; their images decode, their numbers are metrics.jsonl's;
    `sftune report` overlays several runs. (The page was also opened in headless Chromium: benchmarks/NOTES.md.)"""
    import base64
    import io
    import re

    from PIL import Image

    runs = [tmp_path / "a", tmp_path / "b"]
    for out, lr in zip(runs, ("3e-3", "1e-3")):
        code, _, err = run_main(capsys, *tb_args(small_model_dir, out, "--max-steps", "6", "--eval-every", "3",
                                                 "--lr", lr, "--report-to", "none"))
        assert code == 0, err
        assert f"report: {out / 'report.html'} and {out / 'loss.png'}" in err
    out = runs[0]
    assert Image.open(out / "loss.png").size[0] > 300
    page = (out / "report.html").read_text()
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert images and all(Image.open(io.BytesIO(base64.b64decode(i))).size[0] > 300 for i in images)
    assert (out / "loss.png").read_bytes() == base64.b64decode(images[0])  # the same curves, drawn once
    rows = read_jsonl(out / "metrics.jsonl")
    for e in (r for r in rows if r["type"] == "eval"):  # the evaluations table
        assert (f"<td>{e['step']:,}</td><td>{e['val_loss']:.4f}</td><td>{e['val_ppl']:,.2f}</td>"
                f"<td>{e['val_token_accuracy']:.3f}</td>") in page
    evals = [r for r in rows if r["type"] == "eval"]
    assert (f"<td>val token accuracy: first -&gt; last</td><td>{evals[0]['val_token_accuracy']:.3f} -&gt; "
            f"{evals[-1]['val_token_accuracy']:.3f}</td>") in page
    for s in (r for r in rows if r["type"] == "sample"):
        assert f"<td>{s['step']:,}</td><td>{html_escape(s['completion'])}</td>" in page
    data = json.loads((out / "data.json").read_text())
    assert data["splits"]["train"]["kept"] == 400 and "<td>train</td><td>400</td><td>400</td>" in page
    assert "<pre>model: " in page and "<script" not in page  # the config; nothing to run or fetch

    code, stdout, err = run_main(capsys, "report", *map(str, runs), "--output", str(tmp_path / "both.html"))
    assert code == 0, err
    both = (tmp_path / "both.html").read_text()
    assert "<h2>a</h2>" in both and "<h2>b</h2>" in both
    code, _, err = run_main(capsys, "report", str(tmp_path))
    assert code == 2 and "not an sftune run directory" in err
    code, _, err = run_main(capsys, "report", str(runs[0]), "--output", str(tmp_path / "nowhere" / "r.html"))
    assert code == 2 and f"could not write the report to {tmp_path / 'nowhere' / 'r.html'}: No such file" in err


def html_escape(text: str) -> str:
    import html

    return html.escape(text)
