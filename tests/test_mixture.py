"""Several datasets trained together (`datasets`): each prepared as if alone, their examples concatenated."""

from __future__ import annotations

import json
import re
from itertools import islice

import numpy as np
import pytest
import torch
from conftest import QUICKSTART_DATA, assert_resumes_bitwise, prepare, read_jsonl, run_main

from sftune.config import resolve_config
from sftune.errors import SftuneError


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def three_datasets(tmp_path):
    """A text directory with its own validation split, a chat file under another column name, a prompt/completion
    file (the last two held out)."""
    lines = [json.loads(x) for x in QUICKSTART_DATA.joinpath("train.jsonl").read_text().splitlines()]
    text = tmp_path / "reviews"
    write_jsonl(text / "train.jsonl", lines[:40])
    write_jsonl(text / "validation.jsonl", lines[40:46])
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"conversation": [{"role": "user", "content": f"Is film {i} good?"},
                          {"role": "assistant", "content": f"Film {i} is {'good' if i % 2 else 'dull'}."}]}
        for i in range(30)])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"q": f"Rate film {i}:", "a": f" {i % 5} stars"} for i in range(30)])
    entries = ({"dataset": str(text)}, {"dataset": str(chat), "columns": {"messages": "conversation"}},
               {"dataset": str(pairs), "format": "prompt_completion", "columns": {"prompt": "q", "completion": "a"}})
    return entries


def test_a_mixture_is_its_datasets_each_prepared_alone(tmp_path, gpt2_tokenizer, three_datasets):
    """Train and validation are the datasets' own examples one after the other (each read with its entry's format
    and columns, each held out on its own); the counts add up; each dataset has its own cache entry, so a change
    to one re-tokenizes it alone."""
    from sftune.data import DataOptions, prepare_data

    options = dict(min_tokens=0, cache_dir=tmp_path / "cache", val_fraction=0.2)
    data = prepare_data(DataOptions("unused", 64, mixture=three_datasets, **options), gpt2_tokenizer)
    alone = [prepare(entry.pop("dataset"), gpt2_tokenizer, 64, **options, **entry)
             for entry in [dict(e) for e in three_datasets]]
    for split in ("train", "validation"):
        ours, theirs = getattr(data, split), [getattr(a, split) for a in alone]
        assert len(ours) == sum(map(len, theirs)) and len(ours) > 0
        np.testing.assert_array_equal(ours.input_ids, np.concatenate([t.input_ids for t in theirs]))
        np.testing.assert_array_equal(ours.supervised, np.concatenate([t.supervised for t in theirs]))
        np.testing.assert_array_equal(ours.lengths, np.concatenate([t.lengths for t in theirs]))
        stats = data.stats[split]
        for key in ("rows", "kept", "tokens", "supervised_tokens", "untrained_tokens"):
            assert getattr(stats, key) == sum(getattr(a.stats[split], key) for a in alone), key
        assert stats.length["max"] == max(a.stats[split].length["max"] for a in alone)
    assert len(data.validation) == 6 + 6 + 6  # its own split, then a fifth of each file held out
    assert [p.layout.format for _, p in data.parts] == ["text", "chat", "prompt_completion"]
    assert data.layout.format == "text+chat+prompt_completion" and data.layout.is_chat
    assert data.fingerprint and not any(p.from_cache for _, p in data.parts)
    again = prepare_data(DataOptions("unused", 64, mixture=three_datasets, **options), gpt2_tokenizer)
    assert all(p.from_cache for _, p in again.parts) and again.fingerprint == data.fingerprint

    write_jsonl(tmp_path / "pairs.jsonl", [{"q": f"Rate film {i}:", "a": f" {i % 4} stars"} for i in range(30)])
    again = prepare_data(DataOptions("unused", 64, mixture=three_datasets, **options), gpt2_tokenizer)
    assert [p.from_cache for _, p in again.parts] == [True, True, False]
    assert again.fingerprint != data.fingerprint


def test_a_mixture_validates_on_val_dataset_once(tmp_path, gpt2_tokenizer, three_datasets):
    from sftune.data import DataOptions, prepare_data

    held = write_jsonl(tmp_path / "held.jsonl", [{"text": f"held out sentence number {i}"} for i in range(7)])
    data = prepare_data(DataOptions("unused", 64, mixture=three_datasets[:2], min_tokens=0, val_dataset=str(held),
                                    cache_dir=tmp_path / "cache"), gpt2_tokenizer)
    assert len(data.validation) == 7 and data.stats["validation"].rows == 7  # read as text, the chat entry aside
    assert len(data.train) == 40 + 30  # the training splits whole
    np.testing.assert_array_equal(data.validation.input_ids, prepare(held, gpt2_tokenizer, 64, min_tokens=0,
                                                                     val_fraction=0.5).train.input_ids[:0].tolist()
                                  + [t for i in range(7) for t in gpt2_tokenizer(f"held out sentence number {i}")
                                     ["input_ids"] + [gpt2_tokenizer.eos_token_id]])


def _epoch_rows(source, epoch: int) -> list[int]:
    """Every example index the epoch's steps hold (packed rows and micro-batches flattened)."""
    return [int(i) for step in source.plan(epoch) for micro in step for item in micro for i in np.atleast_1d(item)]


@pytest.mark.parametrize("packing", [False, True])
def test_weights_give_each_dataset_its_share_of_an_epoch(tmp_path, gpt2_tokenizer, three_datasets, packing):
    """`weight` 2: each example twice an epoch; 0.5: half of them, the other half the next epoch; 1: once. The
    validation is unchanged, and a resumed epoch continues with the same steps."""
    from sftune.checkpoint import TrainState
    from sftune.data import DataOptions, prepare_data
    from sftune.dist import Dist
    from sftune.steps import InMemorySteps

    entries = tuple({**e, "weight": w} for e, w in zip(three_datasets, (2, 0.5, 1)))
    options = dict(min_tokens=0, cache_dir=tmp_path / "cache", val_fraction=0.2)
    data = prepare_data(DataOptions("unused", 64, mixture=entries, **options), gpt2_tokenizer)
    plain = prepare_data(DataOptions("unused", 64, mixture=three_datasets, **options), gpt2_tokenizer)
    np.testing.assert_array_equal(data.train.input_ids, plain.train.input_ids)  # (the same examples, the same cache)
    np.testing.assert_array_equal(data.validation.input_ids, plain.validation.input_ids)
    sizes = [len(p.train) for _, p in data.parts]
    assert sizes == [40, 24, 24]
    cfg = resolve_config({"batch_size": 4, "packing": packing, "epochs": 2})
    source = InMemorySteps(cfg, data, 64, gpt2_tokenizer.eos_token_id, Dist())
    starts = np.cumsum([0] + sizes)
    epochs = [np.bincount(_epoch_rows(source, e), minlength=starts[-1]) for e in (0, 1)]
    for counts in epochs:
        assert (counts[: starts[1]] == 2).all() and (counts[starts[2]:] == 1).all()
        assert counts[starts[1]: starts[2]].sum() == 12 and counts[starts[1]: starts[2]].max() == 1
    assert (epochs[0] + epochs[1])[starts[1]: starts[2]].tolist() == [1] * 24  # the other half the next epoch
    if not packing:
        assert source.steps_per_epoch == (80 + 12 + 24) // 4 and source.total_steps == 2 * source.steps_per_epoch
    # a resumed run continues with the steps the straight run takes
    straight = [s.micro_batches[0]["input_ids"] for s in islice(source.remaining(TrainState()), source.total_steps)]
    again = InMemorySteps(cfg, data, 64, gpt2_tokenizer.eos_token_id, Dist())
    resumed = again.remaining(TrainState(epoch=1, step_in_epoch=3, step=len(source.plan(0)) + 3))
    for ours, theirs in zip(resumed, straight[len(source.plan(0)) + 3:]):
        assert torch.equal(ours.micro_batches[0]["input_ids"], theirs)


def test_weight_two_trains_the_steps_of_a_dataset_listed_twice(tmp_path, gpt2_tokenizer, three_datasets):
    from sftune.checkpoint import TrainState
    from sftune.data import DataOptions, prepare_data
    from sftune.dist import Dist
    from sftune.steps import InMemorySteps

    options = dict(min_tokens=0, cache_dir=tmp_path / "cache", val_fraction=0.2)
    cfg = resolve_config({"batch_size": 8, "epochs": 2})
    steps = []
    for entries in ((three_datasets[0], three_datasets[0], three_datasets[1]),
                    ({**three_datasets[0], "weight": 2.0}, three_datasets[1])):
        data = prepare_data(DataOptions("unused", 64, mixture=entries, **options), gpt2_tokenizer)
        source = InMemorySteps(cfg, data, 64, gpt2_tokenizer.eos_token_id, Dist())
        steps.append([(s.micro_batches[0]["input_ids"], s.micro_batches[0]["labels"])
                      for s in islice(source.remaining(TrainState()), source.total_steps)])
    assert len(steps[0]) == len(steps[1]) == 2 * (80 + 24) // 8
    for (ids, labels), (ids2, labels2) in zip(*steps):
        assert torch.equal(ids, ids2) and torch.equal(labels, labels2)


def test_an_entry_that_fails_is_named(tmp_path, gpt2_tokenizer, three_datasets):
    from sftune.data import DataOptions, prepare_data

    entries = (three_datasets[0], {"dataset": str(tmp_path / "missing.jsonl")})
    with pytest.raises(SftuneError, match=r"^datasets entry 1 \(.*missing.jsonl\): dataset path not found"):
        prepare_data(DataOptions("unused", 64, mixture=entries, cache_dir=tmp_path / "cache"), gpt2_tokenizer)


def test_a_weight_that_makes_an_epoch_too_large_to_plan_is_named(tmp_path, gpt2_tokenizer, three_datasets):
    """An epoch is planned as one array of indices: weight 1e9 on 40-odd rows asked numpy for hundreds of GiB (a
    traceback); said with the entry, the count and the fix."""
    from sftune.data import DataOptions, prepare_data

    entries = (three_datasets[0], {**three_datasets[1], "weight": 1e9})
    with pytest.raises(SftuneError, match=r"the datasets' weights make an epoch of [\d,]+ examples \(.*: weight "
                                          r"1e\+09 x [\d,]+\); an epoch is planned whole, so at most 1,073,741,824"):
        prepare_data(DataOptions("unused", 64, mixture=entries, cache_dir=tmp_path / "cache"), gpt2_tokenizer)


def test_datasets_config():
    """Entries are datasets or mappings (a flag's entry may be a YAML mapping); each value is checked as the top-level
    key of its name; a later layer's `dataset` or `datasets` replaces an earlier one's; both in one layer is an
    error, and so is streaming them."""
    cfg = resolve_config({"datasets": ["a.jsonl", "{dataset: b, split: all, columns: prompt=q, weight: '0.5'}"]})
    assert cfg.datasets == [{"dataset": "a.jsonl"},
                            {"dataset": "b", "split": "all", "columns": {"prompt": "q"}, "weight": 0.5}]
    assert cfg.data_name == "a.jsonl + b"
    assert resolve_config({"dataset": "x.jsonl"}, {"datasets": ["a.jsonl"]}).data_name == "a.jsonl"
    assert resolve_config({"datasets": ["a.jsonl"]}, {"dataset": "x.jsonl"}).data_name == "x.jsonl"
    problems = {
        "unknown key `path` (did you mean `dataset`?)": {"datasets": [{"path": "a.jsonl"}]},
        "entry 0: unknown key `dataset:b.jsonl`: YAML needs a space after each colon, e.g. {dataset: b.jsonl}":
            {"datasets": ["{dataset:b.jsonl,weight:0.5}"]},
        "entry 1 (b): `format` must be one of": {"datasets": ["a", {"dataset": "b", "format": "chatml"}]},
        "entry 0: names no `dataset`": {"datasets": [{"split": "train"}]},
        "`dataset` and `datasets` are both set": {"dataset": "x", "datasets": ["a"]},
        "entry 0 (a) has a slice as its split, which needs the data in memory":
            {"datasets": [{"dataset": "a", "split": "train[:10]"}], "streaming": True, "max_steps": 5},
        "entry 0 (a) validates on its training split 'train'": {"datasets": [{"dataset": "a", "val_split": "train"}]},
        "must be a list of datasets or mappings": {"datasets": 3},
        "entry 1 (b): `weight` must be a positive number (2: its examples twice an epoch, 0.5: half of them), got 0":
            {"datasets": ["a", {"dataset": "b", "weight": 0}]},
        "`weight` must be a positive number (2: its examples twice an epoch, 0.5: half of them), got 'lots'":
            {"datasets": ["{dataset: b, weight: lots}"]},
        "`weight` must be a positive number (2: its examples twice an epoch, 0.5: half of them), got True":
            {"datasets": [{"dataset": "b", "weight": True}]},
    }
    for message, layer in problems.items():
        with pytest.raises(SftuneError, match=re.escape(message)):
            resolve_config(layer)


def test_a_bad_entry_on_the_command_line_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_main(capsys, "train", "--datasets", "a.jsonl", "{path: b.jsonl}", "--output-dir", str(out))
    assert code == 2 and "Traceback" not in err
    assert "`datasets` entry 1: unknown key `path` (did you mean `dataset`?)" in err
    assert not out.exists()


@pytest.mark.slow
def test_a_mixture_trains_as_its_rows_in_one_dataset(tmp_path, small_model_dir, capsys):
    """Two datasets trained together = one dataset holding their rows in the same order (weights bitwise equal,
    the same losses); the run's data.json and `sftune data` show each dataset; the saved config reads back and
    resumes."""
    import torch
    from safetensors.torch import load_file

    lines = QUICKSTART_DATA.joinpath("train.jsonl").read_text().splitlines(keepends=True)
    val = QUICKSTART_DATA.joinpath("validation.jsonl").read_text().splitlines(keepends=True)
    parts = {"a": (lines[:120], val[:10]), "b": (lines[120:200], val[10:20]), "ab": (lines[:200], val[:20])}
    for name, (train, validation) in parts.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.jsonl").write_text("".join(train))
        (tmp_path / name / "validation.jsonl").write_text("".join(validation))

    def run(name, *data_flags):
        out = tmp_path / f"run-{name}"
        code, _, err = run_main(capsys, "train", "--model", str(small_model_dir), *data_flags, "--batch-size", "16",
                                "--max-steps", "8", "--lr", "1e-2", "--precision", "fp32", "--log-every", "1",
                                "--save-every", "4", "--no-run-report", "--report-to", "none", "--sample-prompts", "",
                                "--output-dir", str(out))
        assert code == 0, err
        return out, err

    mixed, err = run("mixed", "--datasets", str(tmp_path / "a"), str(tmp_path / "b"))
    assert "data: 2/2" in err and "200 train / 20 validation examples" in err
    one, _ = run("one", "--dataset", str(tmp_path / "ab"))
    ours, theirs = load_file(mixed / "model.safetensors"), load_file(one / "model.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    rows = [read_jsonl(d / "metrics.jsonl") for d in (mixed, one)]
    assert [r["loss"] for r in rows[0] if r["type"] == "train"] == [r["loss"] for r in rows[1] if r["type"] == "train"]
    evals = [[r for r in run if r["type"] == "eval"] for run in rows]
    for mixed_eval, one_eval in zip(*evals):  # (each dataset's validation batched apart: the same sum, another order)
        assert mixed_eval["val_loss"] == pytest.approx(one_eval["val_loss"], rel=1e-6)
        assert list(mixed_eval["val_loss_by_dataset"]) == [str(tmp_path / "a"), str(tmp_path / "b")]
    # each dataset's val loss is what `sftune eval` gives on that dataset alone
    for name in ("a", "b"):
        code, out, err = run_main(capsys, "eval", "--model", str(mixed), "--dataset", str(tmp_path / name),
                                  "--precision", "fp32", "--json")
        assert code == 0, err
        assert json.loads(out)["val_loss"] == evals[0][-1]["val_loss_by_dataset"][str(tmp_path / name)]
    summary = json.loads((mixed / "data.json").read_text())
    assert [d["splits"]["train"]["kept"] for d in summary["datasets"]] == [120, 80]
    assert summary["splits"]["train"]["kept"] == 200

    code, out, err = run_main(capsys, "data", "--config", str(mixed / "config.yaml"), "--json")
    assert code == 0, err
    report = json.loads(out)
    code, out, err = run_main(capsys, "eval", "--config", str(mixed / "config.yaml"), "--model", str(mixed), "--json")
    assert code == 0, err
    assert json.loads(out)["val_loss_by_dataset"] == evals[0][-1]["val_loss_by_dataset"]
    assert [d["dataset"] for d in report["datasets"]] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert report["dataset"] == f"{tmp_path / 'a'} + {tmp_path / 'b'}"

    import shutil

    (mixed / "model.safetensors").unlink()
    shutil.rmtree(mixed / "checkpoints" / "step-8")
    code, _, err = run_main(capsys, "train", "--config", str(mixed / "config.yaml"), "--resume", "auto")
    assert code == 0, err
    assert f"resumed from {mixed / 'checkpoints' / 'step-4'}" in err
    assert all(torch.equal(load_file(mixed / "model.safetensors")[k], theirs[k]) for k in theirs)


def test_the_shipped_mixture_config_reads_both_datasets(capsys):
    code, out, err = run_main(capsys, "data", "--config", "configs/mixture.yaml", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert [d["dataset"] for d in report["datasets"]] == ["examples/chat/data", "examples/tools/data"]
    assert [d["splits"]["train"]["kept"] for d in report["datasets"]] == [400, 320]
    assert report["format"] == "chat" and report["splits"]["validation"]["kept"] == 60 + 40


@pytest.mark.slow
def test_a_weighted_mixture_trains_reports_and_resumes_exactly(tmp_path, small_model_dir, capsys):
    """`weight: 0.5` on one of two datasets: the log and `sftune data` say how many examples an epoch takes, and a
    run resumed in its second epoch (where the other half of that dataset is drawn) ends bitwise as the straight
    run."""
    lines = [json.loads(r) for r in QUICKSTART_DATA.joinpath("train.jsonl").read_text().splitlines()]
    for name, train, validation in (("a", lines[:120], lines[200:206]), ("b", lines[120:200], lines[206:210])):
        write_jsonl(tmp_path / name / "train.jsonl", train)
        write_jsonl(tmp_path / name / "validation.jsonl", validation)
    out = tmp_path / "run"
    flags = ("train", "--model", str(small_model_dir), "--datasets", str(tmp_path / "a"),
             f"{{dataset: {tmp_path / 'b'}, weight: 0.5}}", "--batch-size", "16", "--max-steps", "14",
             "--lr", "1e-2", "--precision", "fp32", "--save-every", "6", "--no-run-report", "--report-to", "none",
             "--sample-prompts", "", "--output-dir", str(out))
    code, _, err = run_main(capsys, *flags)
    assert code == 0, err
    assert "80 train (weight 0.5: 40 an epoch)" in err
    assert "data: 200 train (160 an epoch, as the datasets' weights take them) / 10 validation examples" in err
    code, report, err = run_main(capsys, "data", "--config", str(out / "config.yaml"), "--json")
    assert code == 0, err
    report = json.loads(report)
    assert [(d["weight"], d["train_per_epoch"]) for d in report["datasets"]] == [(1.0, 120), (0.5, 40)]
    assert report["splits"]["train"]["examples_per_epoch"] == 160
    assert report["splits"]["train"]["optimizer_steps_per_epoch"] == 10
    assert [d.get("weight") for d in json.loads((out / "data.json").read_text())["datasets"]] == [1.0, 0.5]
    code, text, err = run_main(capsys, "data", "--config", str(out / "config.yaml"))
    assert "weight 0.5: 40 train examples an epoch" in text
    assert_resumes_bitwise(capsys, out, "step-12")  # (the checkpoints: steps 6, 10 at the epoch's end, and 12)


def test_val_datasets_are_each_validated_alone(tmp_path, gpt2_tokenizer, three_datasets):
    """`val_datasets`: the training split is used whole; the validation is each dataset's own (its validation split,
    else all of it), read with the top-level format, in order, each a group of its own; a change to one of them
    changes the data's fingerprint."""
    from sftune.data import DataOptions, prepare_data

    held = write_jsonl(tmp_path / "held.jsonl", [{"text": f"held out sentence number {i}"} for i in range(7)])
    text = three_datasets[0]["dataset"]  # (a directory with a validation split of 6)
    options = dict(min_tokens=0, cache_dir=tmp_path / "cache")
    pairs = three_datasets[2]  # (its own format and columns: an entry's keys)
    data = prepare_data(DataOptions(text, 64, val_datasets=({"dataset": str(held)}, {"dataset": text}, pairs),
                                    **options), gpt2_tokenizer)
    assert len(data.train) == 40 and len(data.validation) == 7 + 6 + 30  # (pairs has no validation split: all)
    assert data.validation_groups == [(str(held), 7), (text, 6), (pairs["dataset"], 30)]
    assert [n for n, _ in data.held_out] == [str(held), text, pairs["dataset"]]
    assert [p.layout.format for _, p in data.held_out] == ["text", "text", "prompt_completion"]
    alone = prepare(text, gpt2_tokenizer, 64, **options)
    np.testing.assert_array_equal(data.validation.input_ids[7 * 6: 7 * 6 + len(alone.validation.input_ids)],
                                  alone.validation.input_ids)  # (after the 7 held-out sentences of 6 tokens)
    two = ({"dataset": str(held)}, {"dataset": text})
    mixed = prepare_data(DataOptions("unused", 64, mixture=three_datasets[:2], val_datasets=two, **options),
                         gpt2_tokenizer)
    assert len(mixed.train) == 40 + 30 and mixed.validation_groups == [(str(held), 7), (text, 6)]
    write_jsonl(held, [{"text": f"held out sentence number {i}"} for i in range(8)])
    again = prepare_data(DataOptions("unused", 64, mixture=three_datasets[:2], val_datasets=two, **options),
                         gpt2_tokenizer)
    assert len(again.validation) == 8 + 6 and again.fingerprint != mixed.fingerprint

    assert resolve_config({"val_datasets": ["a", "{dataset: b, format: chat}"]}).val_datasets == [
        {"dataset": "a"}, {"dataset": "b", "format": "chat"}]
    with pytest.raises(SftuneError, match=re.escape("`val_datasets` entry 0: unknown key `split` (did you mean "
                                                    "`val_split`?)")):
        resolve_config({"val_datasets": [{"dataset": "a", "split": "test"}]})
    assert resolve_config({"val_dataset": "x"}, {"val_datasets": ["a", "b"]}).val_dataset is None
    assert resolve_config({"val_datasets": ["a", "b"]}, {"val_dataset": "x"}).val_datasets == []
    with pytest.raises(SftuneError, match=re.escape("`val_dataset` and `val_datasets` are both set: give one dataset "
                                                    "(`val_dataset`, --val-dataset) or a list of them")):
        resolve_config({"val_dataset": "x", "val_datasets": ["a"]})


@pytest.mark.slow
def test_val_datasets_in_a_run_match_sftune_eval_on_each(tmp_path, small_model_dir, capsys):
    lines = [json.loads(x) for x in QUICKSTART_DATA.joinpath("train.jsonl").read_text().splitlines()]
    paths = [write_jsonl(tmp_path / f"{name}.jsonl", rows)
             for name, rows in (("train", lines[:200]), ("b", lines[200:230]), ("c", lines[230:250]))]
    out = tmp_path / "run"
    common = ("--model", str(small_model_dir), "--batch-size", "16", "--precision", "fp32", "--report-to", "none",
              "--no-run-report", "--sample-prompts", "")
    code, _, err = run_main(capsys, "train", *common, "--dataset", str(paths[0]), "--val-datasets", str(paths[1]),
                            str(paths[2]), "--max-steps", "4", "--output-dir", str(out))
    assert code == 0, err
    assert "data: 200 train / 50 validation examples" in err
    last = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "eval"][-1]
    assert list(last["val_loss_by_dataset"]) == [str(paths[1]), str(paths[2])]
    for path in paths[1:]:
        code, text, err = run_main(capsys, "eval", "--model", str(out), "--dataset", str(paths[0]), "--val-dataset",
                                   str(path), "--precision", "fp32", "--batch-size", "16", "--json")
        assert code == 0, err
        assert json.loads(text)["val_loss"] == last["val_loss_by_dataset"][str(path)]  # (the same batches)
    code, text, err = run_main(capsys, "eval", "--config", str(out / "config.yaml"), "--model", str(out), "--json")
    assert code == 0, err
    assert json.loads(text)["val_loss_by_dataset"] == last["val_loss_by_dataset"]
    code, _, err = run_main(capsys, "train", *common, "--dataset", str(paths[0]), "--val-datasets", str(paths[1]),
                            str(paths[2]), "--streaming", "--max-steps", "3", "--output-dir", str(tmp_path / "s"))
    assert code == 0, err
    assert "by dataset:" in err and "50 validation examples" in err
