"""A run's report: one self-contained HTML page (curves as an embedded PNG image) and `loss.png` (the same curves).

    sftune report runs/quickstart                       # writes runs/quickstart/report.html
    sftune report runs/a runs/b --output compare.html   # several runs overlaid on the same axes

`sftune train` writes `report.html` and `loss.png` into the run directory at the end of each run. Everything
comes from what the run wrote: `metrics.jsonl` (curves, evaluations, samples), `config.yaml` (the resolved
config) and `data.json` (rows kept and dropped by reason, lengths). The page has no scripts and loads nothing:
it opens from a file, offline, and can be mailed as it is.
"""

from __future__ import annotations

import base64
import html
import io
import json
from datetime import datetime
from pathlib import Path

from sftune.errors import SftuneError

DATA_FILE = "data.json"  # the data summary `sftune train` writes at the start of a run


def data_summary(data, dataset: str, max_length: int) -> dict:
    """What `data.json` holds: the data's layout and, per split, rows kept and dropped by reason and lengths
    (a stream: its validation split only; the training rows are counted as they stream)."""
    from dataclasses import asdict

    summary = {"dataset": dataset, "format": data.layout.format, "columns": data.layout.columns,
               "max_length": max_length, "splits": {name: asdict(split) for name, split in data.stats.items()}}
    if len(getattr(data, "parts", None) or []) > 1:  # a mixture: each dataset's own layout and counts, the totals above
        summary["datasets"] = [data_summary(part, name, max_length) for name, part in data.parts]
        for part, weight in zip(summary["datasets"], getattr(data, "weights", None) or []):
            part["weight"] = weight
    if getattr(data, "held_out", None):  # datasets validated on alone (val_dataset, val_datasets)
        summary["validation_datasets"] = [data_summary(part, name, max_length) for name, part in data.held_out]
    return summary


def read_run(run_dir: Path) -> dict:
    """What a report shows of one run directory."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise SftuneError(f"{run_dir} has no metrics.jsonl: give the output directory of an sftune run")
    rows = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line torn by a kill mid-write
            continue
    by_type = {kind: [r for r in rows if r.get("type") == kind] for kind in ("train", "eval", "sample", "early_stop")}
    config = (run_dir / "config.yaml").read_text(encoding="utf-8") if (run_dir / "config.yaml").is_file() else ""
    data = json.loads((run_dir / DATA_FILE).read_text()) if (run_dir / DATA_FILE).is_file() else None
    return {"name": run_dir.name or str(run_dir), "dir": run_dir, **by_type, "config": config, "data": data}


def tokens_at(run: dict) -> dict[int, int]:
    """Tokens trained on by each logged step (evaluations are placed on the token axis by these)."""
    return {r["step"]: r["tokens"] for r in run["train"]}


PANELS = ("loss_step", "loss_tokens", "lr", "throughput")


def figure_png(runs: list[dict], panels: tuple[str, ...] = PANELS, width: float = 11.0) -> bytes:
    """PNG of the given panels ('loss_step', 'loss_tokens', 'lr', 'throughput'), every run overlaid."""
    from matplotlib.figure import Figure  # (not pyplot: no GUI backend, half the import time)

    columns = min(len(panels), 2)
    rows = -(-len(panels) // columns)
    # fixed margins: matplotlib's constrained layout measures every label and took a third of the time (0.25 s)
    fig = Figure(figsize=(width, 3.6 * rows), dpi=90)
    fig.subplots_adjust(left=0.85 / width, right=1 - 0.15 / width, bottom=0.6 / (3.6 * rows),
                        top=1 - 0.3 / (3.6 * rows), wspace=1.1 / (width / columns), hspace=0.8 / 3.6)
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    for ax, panel in zip(axes, panels):
        for i, run in enumerate(runs):
            color = f"C{i}"
            label = run["name"] if len(runs) > 1 else None
            steps = [r["step"] for r in run["train"]]
            evals = [r for r in run["eval"]]
            if panel in ("loss_step", "loss_tokens"):
                if panel == "loss_step":
                    x_train, x_eval = steps, [e["step"] for e in evals]
                else:
                    at = tokens_at(run)
                    x_train = [r["tokens"] for r in run["train"]]
                    x_eval = [at.get(e["step"], 0) for e in evals]
                ax.plot(x_train, [r["loss"] for r in run["train"]], color=color, alpha=0.75,
                        label=f"{label + ': ' if label else ''}train")
                ax.plot(x_eval, [e["val_loss"] for e in evals], "o--", color=color, markersize=4,
                        label=f"{label + ': ' if label else ''}validation")
                for j, name in enumerate(evals[0].get("val_loss_by_dataset", {}) if evals else []):
                    ax.plot(x_eval, [e.get("val_loss_by_dataset", {}).get(name, float("nan")) for e in evals], ":", color=color,
                            marker="xs^v<>"[j % 6], markersize=4, alpha=0.7,
                            label=f"{label + ': ' if label else ''}validation, {name}")
                ax.set_xlabel("optimizer step" if panel == "loss_step" else "tokens trained on")
                ax.set_ylabel("loss (token-weighted)")
            elif panel == "lr":
                ax.plot(steps, [r["lr"] for r in run["train"]], color=color, label=label)
                ax.set_xlabel("optimizer step")
                ax.set_ylabel("learning rate")
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))  # (1e-4 as 1.0 and 1e-4 above)
            elif panel == "throughput":
                ax.plot(steps, [r["tokens_per_s"] for r in run["train"]], color=color, label=label)
                ax.set_xlabel("optimizer step")
                ax.set_ylabel("tokens / s")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _table(header: list[str] | None, rows: list[list]) -> str:
    head = "<thead><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _summary(run: dict) -> list[list]:
    train, evals = run["train"], run["eval"]
    rows = [["optimizer steps", f"{train[-1]['step']:,}" if train else "0"],
            ["tokens trained on", f"{train[-1]['tokens']:,}" if train else "0"]]
    if train:
        seconds = train[-1]["elapsed_s"]
        rows += [["training time", f"{seconds:,.1f} s"], ["tokens / s (whole run)", f"{train[-1]['tokens'] / max(seconds, 1e-9):,.0f}"],
                 ["last train loss", f"{train[-1]['loss']:.4f}"]]
        if "token_accuracy" in train[-1]:
            rows.append(["last token accuracy", f"{train[-1]['token_accuracy']:.3f}"])
    if evals:
        best = min((e for e in evals if e["step"] > 0), key=lambda e: e["val_loss"], default=evals[0])
        rows += [["val loss: first -> last", f"{evals[0]['val_loss']:.4f} -> {evals[-1]['val_loss']:.4f}"],
                 ["best val loss", f"{best['val_loss']:.4f} (step {best['step']:,})"]]
        if "val_token_accuracy" in evals[-1]:
            rows.append(["val token accuracy: first -> last",
                         f"{evals[0].get('val_token_accuracy', 0):.3f} -> {evals[-1]['val_token_accuracy']:.3f}"])
    for stop in run["early_stop"]:
        rows.append(["early stopping", f"at step {stop['step']:,} (best: step {stop['best_step']:,})"])
    return rows


def _data_section(data: dict | None) -> str:
    if not data:
        return "<p>No data summary (data.json) in this run directory.</p>"
    rows = []
    for split, stats in data.get("splits", {}).items():
        dropped = ", ".join(f"{k} {v:,}" for k, v in stats.get("dropped", {}).items() if v) or "none"
        length = stats.get("length", {})
        rows.append([split, f"{stats.get('rows', 0):,}", f"{stats.get('kept', 0):,}", dropped,
                     f"{stats.get('truncated', 0):,}", f"{stats.get('tokens', 0):,}",
                     f"{stats.get('supervised_tokens', 0):,}",
                     " / ".join(f"{length[k]:,.0f}" for k in ("mean", "p50", "p90", "max") if k in length)])
    header = ["split", "rows", "kept", "dropped (by reason)", "truncated", "tokens", "trained tokens",
              "length mean / p50 / p90 / max"]
    return (f"<p>{html.escape(str(data.get('dataset', '')))}: format {html.escape(str(data.get('format', '')))}, "
            f"max_length {data.get('max_length', '')}</p>" + _table(header, rows))


def _samples_section(run: dict) -> str:
    if not run["sample"]:
        return "<p>No sample prompts (set <code>sample_prompts</code>).</p>"
    prompts = sorted({r["index"]: r["prompt"] for r in run["sample"]}.items())
    parts = []
    for index, prompt in prompts:
        rows = [[f"{r['step']:,}", r["completion"]] for r in run["sample"] if r["index"] == index]
        parts.append(f"<h4>{html.escape(prompt)}</h4>" + _table(["step", "greedy completion"], rows))
    return "".join(parts)


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f3f3f3}pre{background:#f7f7f7;padding:1em;overflow-x:auto;font-size:.85em}
img{max-width:100%}h2{border-bottom:1px solid #ddd;padding-bottom:.2em}"""


def report_html(runs: list[dict], png: bytes | None = None) -> str:
    """The page; `png`: the curves (`figure_png` of these runs), when already drawn."""
    figure = base64.b64encode(png or figure_png(runs)).decode()
    names = ", ".join(run["name"] for run in runs)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>sftune report: {html.escape(names)}"
             f"</title><style>{STYLE}</style></head><body>",
             f"<h1>sftune report: {html.escape(names)}</h1>",
             f"<p>Written {datetime.now():%Y-%m-%d %H:%M} from {len(runs)} run director{'y' if len(runs) == 1 else 'ies'}"
             f": {html.escape(', '.join(str(run['dir']) for run in runs))}.</p>",
             f"<img alt='loss per step and per token, learning rate, throughput' src='data:image/png;base64,{figure}'>"]
    for run in runs:
        parts.append(f"<h2>{html.escape(run['name'])}</h2>")
        parts.append("<h3>Summary</h3>" + _table(None, _summary(run)))
        parts.append("<h3>Evaluations</h3>" + _table(
            ["step", "val loss", "val perplexity", "val token accuracy"],
            [[f"{e['step']:,}", f"{e['val_loss']:.4f}", f"{e['val_ppl']:,.2f}",
              f"{e['val_token_accuracy']:.3f}" if "val_token_accuracy" in e else "-"] for e in run["eval"]]))
        parts.append("<h3>Sample generations</h3>" + _samples_section(run))
        parts.append("<h3>Data</h3>" + _data_section(run["data"]))
        parts.append(f"<h3>Config</h3><pre>{html.escape(run['config'])}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dirs: list[Path], output: Path) -> Path:
    runs = [read_run(Path(d)) for d in run_dirs]
    output.write_text(report_html(runs), encoding="utf-8")
    return output


def write_run_files(run_dir: Path) -> None:
    """What `sftune train` writes at the end of a run: `report.html`, and its curves as `loss.png` (drawn once)."""
    runs = [read_run(run_dir)]
    png = figure_png(runs)
    (run_dir / "loss.png").write_bytes(png)
    (run_dir / "report.html").write_text(report_html(runs, png), encoding="utf-8")
