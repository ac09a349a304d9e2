"""Tier 1: the data pipeline, step by step, with exact expected values."""

import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import QUICKSTART_DATA, needs_sst2, prepare
from sftune.batching import epoch_steps
from sftune.data import Examples, count_targets, encode_example
from sftune.data.formats import ROW_COLUMN, find_text_column
from sftune.data.sources import load_rows
from sftune.errors import SftuneError

EOS = 50256


# --- encode_example: one example's fate ---


def text(ids, min_tokens, max_length, overlong):
    """A text-format example: one trained part; (input_ids, status) as the seed's pipeline sees it."""
    ids_out, mask, status = encode_example([ids], [True], EOS, min_tokens, max_length, overlong)
    assert all(mask)
    return ids_out, status


def test_encode_appends_eos():
    assert text([1, 2, 3, 4, 5, 6], min_tokens=5, max_length=10, overlong="drop") == ([1, 2, 3, 4, 5, 6, EOS], "kept")


def test_min_tokens_counts_the_texts_own_tokens():
    # the seed keeps len(input_ids) > 5: five tokens are dropped even though EOS would make six
    assert text([1, 2, 3, 4, 5], 5, 10, "drop") == ([], "too_short")
    assert text([], 0, 10, "drop") == ([], "empty")
    assert text([7], 0, 10, "drop") == ([7, EOS], "kept")


def test_overlong_policies():
    ids = list(range(1, 9))  # 8 tokens + EOS = 9 > max_length 6
    assert text(ids, 0, 6, "drop") == ([], "overlong")
    assert text(ids, 0, 6, "error") == ([], "overlong")
    # truncated: first max_length tokens, and no fake EOS
    assert text(ids, 0, 6, "truncate") == ([1, 2, 3, 4, 5, 6], "truncated")
    # exactly fitting with EOS is kept
    assert text(ids[:5], 0, 6, "drop") == ([1, 2, 3, 4, 5, EOS], "kept")


def test_existing_trailing_eos_is_not_doubled():
    assert text([1, 2, EOS], 0, 10, "drop") == ([1, 2, EOS], "kept")


def test_prefix_is_kept_and_untrained_on_both_truncation_sides():
    parts, trained = [[11, 12, 13], [21, 22, 23]], [False, True]
    right = encode_example(parts, trained, EOS, 0, 5, "truncate", "right", prefix=[1])
    left = encode_example(parts, trained, EOS, 0, 5, "truncate", "left", prefix=[1])
    assert right == ([1, 11, 12, 13, 21], [False, False, False, False, True], "truncated")  # no EOS added back
    assert left == ([1, 21, 22, 23, EOS], [False, True, True, True, True], "truncated")


# --- finding the text column ---

def test_text_column_detection():
    from datasets import Value

    s, i = Value("string"), Value("int64")
    assert find_text_column({"idx": i, "sentence": s, "label": i}, None) == "sentence"
    assert find_text_column({"text": s, "sentence": s}, None) == "text"
    assert find_text_column({"review": s, "stars": i}, None) == "review"
    assert find_text_column({"a": s, "b": s}, "b") == "b"
    with pytest.raises(SftuneError, match="set --text-column"):
        find_text_column({"a": s, "b": s}, None)
    with pytest.raises(SftuneError, match="text column 'c' not in the dataset .* fix --text-column"):
        find_text_column({"a": s, "b": s}, "c")
    # alpaca's and dolly's columns: the mapping that reads them as prompt/completion, named
    alpaca = {"instruction": s, "input": s, "output": s}
    with pytest.raises(SftuneError, match="look like prompt/completion data, --columns "
                                          "prompt=instruction,completion=output,input=input "):
        find_text_column(alpaca, None)
    with pytest.raises(SftuneError, match="--columns prompt=instruction,completion=response,input=context "):
        find_text_column({"instruction": s, "context": s, "response": s, "category": s}, None)


# --- loading every file format ---

ROWS = [{"review": f"row number {i} is a sentence of several words", "stars": i % 5} for i in range(40)]


def write_format(path, suffix):
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS))
    elif suffix in (".csv", ".tsv"):
        sep = "," if suffix == ".csv" else "\t"
        path.write_text("review" + sep + "stars\n" + "".join(f"{r['review']}{sep}{r['stars']}\n" for r in ROWS))
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    elif suffix == ".txt":
        path.write_text("".join(r["review"] + "\n" for r in ROWS))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt"])
def test_every_file_format_loads_with_a_held_out_validation_split(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    write_format(path, suffix)
    rows = load_rows(str(path), seed=1, val_fraction=0.25)
    assert (len(rows["train"]), len(rows["validation"])) == (30, 10)
    expected_column = "text" if suffix == ".txt" else "review"
    assert find_text_column(rows["train"].features, None) == expected_column
    texts = set(rows["train"][expected_column]) | set(rows["validation"][expected_column])
    assert texts == {r["review"] for r in ROWS}  # nothing lost or duplicated by the hold-out


def test_a_dataset_saved_with_save_to_disk_reads_as_its_splits(tmp_path):
    """`Dataset.save_to_disk` writes what `datasets.load_dataset` refuses ("use load_from_disk"): read it so,
    as its one split (a validation split held out of it); a saved DatasetDict keeps its splits."""
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "one")
    rows = load_rows(str(tmp_path / "one"), seed=1, val_fraction=0.25)
    assert (len(rows["train"]), len(rows["validation"])) == (30, 10)
    datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS[:30]),
                         validation=datasets.Dataset.from_list(ROWS[30:])).save_to_disk(tmp_path / "both")
    rows = load_rows(str(tmp_path / "both"), seed=1, val_fraction=0.25)
    assert (len(rows["train"]), len(rows["validation"])) == (30, 10)
    assert rows["validation"][0]["review"] == ROWS[30]["review"]


def test_a_json_object_holding_its_rows_under_a_key_reads_as_those_rows(tmp_path):
    """{"version": ..., "data": [rows]} (SQuAD's layout, many exports') was read by `datasets` as one row of one
    column; an object of columns is refused (it is read as one row too)."""
    from sftune.errors import SftuneError

    path = tmp_path / "export.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"version": "1.1", "data": ROWS}).encode())
    rows = load_rows(str(path), seed=1, val_fraction=0.25)
    assert (len(rows["train"]), len(rows["validation"])) == (30, 10)
    assert set(rows["train"]["review"]) | set(rows["validation"]["review"]) == {r["review"] for r in ROWS}
    path.write_text(json.dumps({"review": [r["review"] for r in ROWS], "stars": [r["stars"] for r in ROWS]}))
    with pytest.raises(SftuneError, match=r"export.json holds columns \(review, stars: lists of 40 values\), which "
                                          r"are read as one row; write its rows as a JSON array"):
        load_rows(str(path), seed=1, val_fraction=0.25)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".txt"])
def test_a_file_that_starts_with_a_byte_order_mark_reads_as_without(tmp_path, suffix):
    """Excel's "CSV UTF-8" and Notepad write a UTF-8 byte-order mark first: a CSV's first column was then not found
    (its name began with U+FEFF), and a text file's first row began with it (a token trained on)."""
    path = tmp_path / f"data{suffix}"
    write_format(path, suffix)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    rows = load_rows(str(path), seed=1, val_fraction=0.25)
    column = "text" if suffix == ".txt" else "review"
    assert find_text_column(rows["train"].features, None) == column
    assert set(rows["train"][column]) | set(rows["validation"][column]) == {r["review"] for r in ROWS}


def test_a_csv_separated_by_semicolons_reads_as_its_columns(tmp_path, capsys):
    """Spreadsheets in many locales write CSV with ';': read with ',' its one column held whole lines ("text;label"),
    labels trained as text. A header without a comma and with semicolons is read with ';', and said."""
    path = tmp_path / "data.csv"
    path.write_text("review;stars\r\n" + "".join(f"{r['review']};{r['stars']}\r\n" for r in ROWS))
    rows = load_rows(str(path), seed=1, val_fraction=0.25)
    assert rows["train"].column_names[:2] == ["review", "stars"]
    assert set(rows["train"]["review"]) | set(rows["validation"]["review"]) == {r["review"] for r in ROWS}
    assert "its fields are read as separated by ';'" in capsys.readouterr().err
    # quoted cells holding the delimiter: the quoting check reads the file with ';' too (with ',' it refused it)
    path.write_text('review;stars\n"long; and dull";0\n"a clever, tender film";1\n"fine";1\n"a gem";1\n')
    rows = load_rows(str(path), seed=1, val_fraction=0.25)
    assert set(rows["train"]["review"]) | set(rows["validation"]["review"]) == {
        "long; and dull", "a clever, tender film", "fine", "a gem"}


def test_hold_out_is_deterministic(tmp_path):
    path = tmp_path / "d.jsonl"
    write_format(path, ".jsonl")
    a = load_rows(str(path), seed=3, val_fraction=0.2)["validation"]["review"]
    b = load_rows(str(path), seed=3, val_fraction=0.2)["validation"]["review"]
    c = load_rows(str(path), seed=4, val_fraction=0.2)["validation"]["review"]
    assert list(a) == list(b) and list(a) != list(c)


def test_val_split_names_the_split_to_validate_on(tmp_path, gpt2_tokenizer, capsys):
    """A dataset whose held-out split is `test` (trl-lib/Capybara, ultrachat's test_sft): by default it is not a
    validation name, so a part of train is held out; --val-split test validates on it, in memory and streamed."""
    from sftune.data import DataOptions
    from sftune.data.streaming import StreamedData

    d = tmp_path / "data"
    d.mkdir()
    for split, n in (("train", 30), ("test", 7)):
        (d / f"{split}.jsonl").write_text("".join(json.dumps({"text": f"{split} row {i} of the set"}) + "\n"
                                                  for i in range(n)))
    held = load_rows(str(d), seed=1, val_fraction=0.2)
    assert (len(held["train"]), len(held["validation"])) == (24, 6)  # test is not a validation name: held out
    rows = load_rows(str(d), seed=1, val_fraction=0.2, val_split="test")
    assert (len(rows["train"]), len(rows["validation"])) == (30, 7) and rows.sources["validation"] == "test"
    data = prepare(d, gpt2_tokenizer, 64, min_tokens=0, val_split="test", cache_dir=tmp_path / "c")
    assert len(data.validation) == 7 and len(data.train) == 30
    assert len(prepare(d, gpt2_tokenizer, 64, min_tokens=0, val_fraction=0.2, cache_dir=tmp_path / "c").validation) \
        == 6  # (its own cache entry)
    stream = StreamedData(DataOptions(str(d), 64, min_tokens=0, val_split="test"), gpt2_tokenizer)
    assert len(stream.validation) == 7
    with pytest.raises(SftuneError, match=r"has no 'dev' split to validate on \(it has: train, test\).*--val-split"):
        load_rows(str(d), 1, 0.2, val_split="dev")
    with pytest.raises(SftuneError, match="files given as --dataset are one split"):
        load_rows(str(d / "train.jsonl"), 1, 0.2, val_split="test")


def test_val_dataset_validates_on_another_dataset(tmp_path, gpt2_tokenizer):
    """--val-dataset: a file (all of it), or a directory (its validation split, or --val-split); the training split
    is used whole; in memory and streamed; a change to either file is a new cache entry."""
    from sftune.data import DataOptions
    from sftune.data.streaming import StreamedData

    def write(path, name, n):
        path.write_text("".join(json.dumps({"text": f"{name} row {i} of the set"}) + "\n" for i in range(n)))

    write(tmp_path / "train.jsonl", "train", 30)
    write(tmp_path / "held.jsonl", "held", 5)
    other = tmp_path / "other"
    other.mkdir()
    write(other / "train.jsonl", "other train", 9)
    write(other / "validation.jsonl", "other validation", 4)
    write(other / "test.jsonl", "other test", 3)
    train = str(tmp_path / "train.jsonl")
    rows = load_rows(train, 1, 0.2, val_dataset=str(tmp_path / "held.jsonl"))
    assert (len(rows["train"]), len(rows["validation"])) == (30, 5)
    assert rows.sources["validation"] == f"train of {tmp_path / 'held.jsonl'}"
    assert len(load_rows(train, 1, 0.2, val_dataset=str(other))["validation"]) == 4
    assert len(load_rows(train, 1, 0.2, val_dataset=str(other), val_split="test")["validation"]) == 3
    options = dict(min_tokens=0, cache_dir=tmp_path / "c", val_dataset=str(tmp_path / "held.jsonl"))
    data = prepare(train, gpt2_tokenizer, 64, **options)
    assert (len(data.train), len(data.validation)) == (30, 5)
    write(tmp_path / "held.jsonl", "held", 6)
    again = prepare(train, gpt2_tokenizer, 64, **options)
    assert not again.from_cache and len(again.validation) == 6
    stream = StreamedData(DataOptions(train, 64, min_tokens=0, val_dataset=str(other)), gpt2_tokenizer)
    assert len(stream.validation) == 4
    with pytest.raises(SftuneError, match=r"\(check --val-dataset\)"):
        load_rows(train, 1, 0.2, val_dataset=str(tmp_path / "missing.jsonl"))


def test_bad_inputs_are_clear_errors(tmp_path):
    bad = tmp_path / "data.xml"
    bad.write_text("<x/>")
    with pytest.raises(SftuneError, match="unsupported data file type '.xml'"):
        load_rows(str(bad), 0, 0.1)
    with pytest.raises(SftuneError, match=r"dataset path not found: './missing.jsonl' \(check --dataset\)"):
        load_rows("./missing.jsonl", 0, 0.1)


def test_hub_dataset_offline_fails_fast_and_names_the_flag():
    """One refused connection decides that the Hub is out of reach; the dataset is then looked up in the local
    cache only (datasets' offline mode, so no retries), and the offline flag is restored afterwards."""
    import datasets

    from sftune.hub import hub_reachable

    assert not hub_reachable()  # the test endpoint refuses connections
    offline = datasets.config.HF_HUB_OFFLINE
    with pytest.raises(SftuneError) as e:
        load_rows("stanfordnlp/sst2", 0, 0.1)
    assert "cannot be reached" in str(e.value) and "--dataset PATH" in str(e.value)
    assert datasets.config.HF_HUB_OFFLINE == offline


def test_a_weight_or_split_after_a_colon_is_said_the_way_sftune_takes_it(tmp_path, monkeypatch):
    """`data.jsonl:2` and `data.jsonl:validation` (how some tools write a weight or a split) where data.jsonl exists:
    the error says how to write them here."""
    (tmp_path / "data.jsonl").write_text(json.dumps({"text": "a row of text"}) + "\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SftuneError, match=r"'data.jsonl' exists: a dataset of --datasets is weighted by writing it as "
                                          r"a mapping, '\{dataset: data.jsonl, weight: 2\}'"):
        load_rows("data.jsonl:2", 0, 0.1)
    with pytest.raises(SftuneError, match="'data.jsonl' exists: its split is chosen with --split validation"):
        load_rows("data.jsonl:validation", 0, 0.1)
    with pytest.raises(SftuneError) as e:
        load_rows("missing.jsonl:2", 0, 0.1)
    assert "exists" not in str(e.value)


# --- the whole pipeline ---

def test_the_rows_left_out_are_said_with_why(tmp_path, gpt2_tokenizer, capsys):
    """Rows dropped by the filters were counted in data.json and `sftune data` only; the log now says how many of
    each split's rows were left out, and why (the seed's SST-2 job leaves out a quarter of its rows)."""
    (tmp_path / "d").mkdir()
    good = "a sentence that is long enough to keep"
    train = [good] * 4 + [""] * 2 + ["one two"] * 3 + ["x " * 40]
    (tmp_path / "d" / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in train))
    (tmp_path / "d" / "validation.jsonl").write_text("".join(json.dumps({"text": good}) + "\n" for _ in range(3)))
    prepare(tmp_path / "d", gpt2_tokenizer, max_length=20, cache_dir=tmp_path / "c")
    err = capsys.readouterr().err
    assert ("data: 6 of 10 train rows left out: 2 empty, 3 under --min-tokens 5, 1 over --max-length 20 "
            "(--overlong drop)") in err
    assert "validation rows left out" not in err


def test_prepare_data_keeps_and_counts(tmp_path, gpt2_tokenizer):
    path = tmp_path / "d.jsonl"
    texts = ["one two", "", "a sentence that is long enough to keep", "x " * 40, "another sentence that is long enough here"]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts * 4))
    data = prepare(str(path), gpt2_tokenizer, max_length=20, val_fraction=0.25, seed=0, cache_dir=tmp_path / "c")
    stats = data.stats.values()
    total = {k: sum(getattr(s, k) for s in stats) for k in ("rows", "kept", "truncated")}
    dropped = {r: sum(s.dropped[r] for s in stats) for r in ("empty", "too_short", "overlong")}
    assert total == {"rows": 20, "kept": 8, "truncated": 0}
    assert dropped == {"empty": 4, "too_short": 4, "overlong": 4}
    ids, supervised = data.train.example(0)
    assert ids[-1] == EOS and supervised.all()
    assert data.stats["train"].tokens == int(data.train.lengths.sum())
    assert data.stats["train"].supervised_tokens == int(data.train.lengths.sum()) - len(data.train)


def test_the_tokenizers_threads_tokenize_as_one_thread_does(tmp_path, gpt2_tokenizer, monkeypatch):
    """Where the user has not set TOKENIZERS_PARALLELISM, sftune sets it false (no warning from `tokenizers` at a
    later fork) and turns the tokenizer's threads on while a dataset is tokenized: the same examples as one thread
    makes, and the variable false again after. A user's own setting is left alone."""
    from sftune import console

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"sentence number {i} " + "word " * (i % 37)}) + "\n"
                            for i in range(3000)))
    serial = prepare(str(path), gpt2_tokenizer, cache_dir=tmp_path / "serial")
    monkeypatch.delenv(console.PARALLELISM)
    monkeypatch.setattr(console, "_parallelism_ours", False)
    console.quiet_tokenizers()
    assert console._parallelism_ours and os.environ[console.PARALLELISM] == "false"
    seen = []
    real_call = type(gpt2_tokenizer).__call__
    monkeypatch.setattr(type(gpt2_tokenizer), "__call__",
                        lambda self, *a, **k: seen.append(os.environ[console.PARALLELISM]) or real_call(self, *a, **k))
    threaded = prepare(str(path), gpt2_tokenizer, cache_dir=tmp_path / "threaded")
    assert "true" in seen and os.environ[console.PARALLELISM] == "false"  # (the batches; small calls outside)
    for split in ("train", "validation"):
        a, b = getattr(serial, split), getattr(threaded, split)
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.supervised, b.supervised)
        assert np.array_equal(a.lengths, b.lengths)
    monkeypatch.setenv(console.PARALLELISM, "false")  # the user's own setting: untouched, no threads
    monkeypatch.setattr(console, "_parallelism_ours", False)
    console.quiet_tokenizers()
    seen.clear()
    prepare(str(path), gpt2_tokenizer, cache_dir=tmp_path / "user")
    assert "true" not in seen and not console._parallelism_ours


def test_overlong_error_names_the_fix(tmp_path, gpt2_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": "word " * n}) + "\n" for n in (8, 30, 9, 10)))
    with pytest.raises(SftuneError, match=r"1 example\(s\) are longer than max_length 16 .*--overlong truncate"):
        prepare(str(path), gpt2_tokenizer, max_length=16, overlong="error", val_fraction=0.25, cache_dir=tmp_path)


def test_truncate_keeps_max_length_tokens_without_eos(tmp_path, gpt2_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": "word " * 30}) + "\n" for _ in range(4)))
    data = prepare(str(path), gpt2_tokenizer, max_length=16, overlong="truncate", val_fraction=0.25, cache_dir=tmp_path)
    assert data.train.lengths.tolist() == [16, 16, 16]
    assert EOS not in data.train.input_ids
    assert data.stats["train"].truncated == 3


def test_nothing_left_is_a_clear_error(tmp_path, gpt2_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": "short"}) + "\n" for _ in range(10)))
    with pytest.raises(SftuneError, match="no train example is left after filtering .* Lower --min-tokens"):
        prepare(str(path), gpt2_tokenizer, max_length=64, cache_dir=tmp_path)


def test_a_datasets_cache_that_cannot_be_written_is_not_blamed_on_the_data(tmp_path, monkeypatch):
    """HF_HOME (or HF_DATASETS_CACHE) where no directory can be made: `datasets` fails before it reads a row, and the
    message said "could not read a dataset from directory ... (check --dataset)". It now names the cache and its
    setting, for a directory and for files."""
    import datasets

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(blocker / "datasets"))  # (as HF_HOME=a-file sets it)
    for source in (QUICKSTART_DATA, QUICKSTART_DATA / "train.jsonl"):
        with pytest.raises(SftuneError) as e:
            load_rows(str(source), seed=1, val_fraction=0.25)
        assert f"the datasets library cannot write its cache at {blocker / 'datasets'}" in str(e.value)
        assert "HF_DATASETS_CACHE (or HF_HOME)" in str(e.value) and "check --dataset" not in str(e.value)


def test_a_full_datasets_cache_disk_is_not_blamed_on_the_data(tmp_path, monkeypatch):
    """`datasets` writes an Arrow copy of what it reads into its cache: on a full disk the message said "could not
    read a dataset from directory ...: No space left on device (check --dataset)"."""
    import subprocess

    import datasets

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(disk))
        with pytest.raises(SftuneError) as e:
            load_rows(str(QUICKSTART_DATA), seed=1, val_fraction=0.25)
        assert f"no space left on the disk that holds the datasets library's cache ({disk}" in str(e.value)
        assert "check --dataset" not in str(e.value)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_signal_inside_a_library_call_is_not_taken_for_its_failure(tmp_path, monkeypatch):
    """While one process prepares, a signal stops it where it is (`StopFlag.stops_at_once`): inside `datasets`' load
    the handler's exception went through sftune's `except Exception` around it, and a SIGTERM read "could not read
    ...: Preempted" (exit 2, blaming the data). Here a real SIGTERM arrives while the load runs Python code."""
    import signal

    import datasets

    from sftune.signals import Preempted, stop_on_signals

    def load_dataset(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # (the handler runs between two bytecodes of this loop)
            pass
        raise AssertionError("the signal did not stop the load")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with stop_on_signals() as stop, pytest.raises(Preempted) as e:
        with stop.stops_at_once():
            load_rows(str(QUICKSTART_DATA / "train.jsonl"), seed=1, val_fraction=0.25)
    assert e.value.code == 143


def test_cache_hit_and_invalidation(tmp_path, gpt2_tokenizer, text_file):
    cache = tmp_path / "cache"
    first = prepare(str(text_file), gpt2_tokenizer, 64, cache_dir=cache)
    second = prepare(str(text_file), gpt2_tokenizer, 64, cache_dir=cache)
    assert (first.from_cache, second.from_cache) == (False, True)
    assert np.array_equal(first.train.input_ids, second.train.input_ids)
    assert np.array_equal(first.validation.offsets, second.validation.offsets)
    assert first.stats == second.stats
    # a setting, the tokenizer's output, or the file changing gives a new entry
    assert not prepare(str(text_file), gpt2_tokenizer, 64, min_tokens=3, cache_dir=cache).from_cache
    text_file.write_text(text_file.read_text() + json.dumps({"text": "one more line to change the file"}) + "\n")
    changed = prepare(str(text_file), gpt2_tokenizer, 64, cache_dir=cache)
    assert not changed.from_cache and len(changed.train) + len(changed.validation) == 121


def test_a_cache_entry_interrupted_while_it_is_written_leaves_nothing(tmp_path):
    """A signal (here Ctrl-C's KeyboardInterrupt) in the middle of writing an entry: no temporary directory stays
    beside the entries, no entry is there, and the interruption goes on up (an OSError is said and skipped)."""
    from sftune.data.cache import read_entry, write_entry

    class Interrupted(Examples):
        def save(self, prefix):
            super().save(prefix)
            raise KeyboardInterrupt

    ex = Examples.from_lists([[1, 2, 3]], [[False, True, True]])
    interrupted = Interrupted(ex.input_ids, ex.supervised, ex.offsets)
    with pytest.raises(KeyboardInterrupt):
        write_entry(tmp_path / "entry", {"train": ex, "validation": interrupted}, {}, None)
    assert list(tmp_path.iterdir()) == [] and read_entry(tmp_path / "entry", 10) is None


def test_examples_round_trip(tmp_path):
    ex = Examples.from_lists([[1, 2, 3], [4]], [[False, True, True], [True]])
    ex.save(tmp_path / "x")
    back = Examples.load(tmp_path / "x")
    assert back.lengths.tolist() == [3, 1]
    assert back.example(0)[1].tolist() == [False, True, True]
    assert count_targets(back) == 2  # targets need a previous token: positions 1 and 2 of example 0


@needs_sst2
def test_seed_fidelity_on_sst2(sst2_prepared, gpt2_tokenizer):
    """The seed notebook's numbers: 49,401 train and 867 validation rows, 1,544 batches of 32."""
    data = sst2_prepared
    assert (len(data.train), len(data.validation)) == (49_401, 867)
    assert (data.stats["train"].rows, data.stats["validation"].rows) == (67_349, 872)
    assert data.stats["train"].dropped["too_short"] == 67_349 - 49_401
    assert len(epoch_steps(data.train.lengths, 32, 1, seed=42, epoch=0)) == 1_544
    assert data.text_column == "sentence"
    # 759,966 text tokens (REFERENCE.md) plus one EOS per kept row
    assert data.stats["train"].tokens == 759_966 + 49_401
    # the tokenizer check from REFERENCE.md
    assert gpt2_tokenizer("Hello, this is the first step of RLHF training.")["input_ids"] == [
        15496, 11, 428, 318, 262, 717, 2239, 286, 45715, 29567, 3047, 13]


def test_examples_without_targets_are_dropped_and_counted():
    from sftune.data import drop_untrained

    ex = Examples.from_lists([[1], [2, 3], [4, 5, 6], [7, 8]],
                             [[True], [False, False], [True, False, True], [False, True]])
    kept, dropped = drop_untrained(ex)
    assert dropped == 2
    assert [kept.example(i)[0].tolist() for i in range(len(kept))] == [[4, 5, 6], [7, 8]]
    assert [kept.example(i)[1].tolist() for i in range(len(kept))] == [[True, False, True], [False, True]]
    assert count_targets(kept) == 2


def test_split_slices_as_datasets_writes_them(tmp_path, gpt2_tokenizer):
    """--split / --val-split take slices (train[:80%], train[80%:], train[:10]+validation): the rows they name, with
    their numbers in the source split; a dataset's own validation split is still found beside a slice of train (not
    when the slice trains on it); a bad slice, or one that selects nothing, is an error naming the flag; streaming refuses slices."""
    from sftune.config import resolve_config

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"row number {i} of the set"}) + "\n" for i in range(100)))
    rows = load_rows(str(data), 0, 0.1, split="train[:80%]", val_split="train[80%:]")
    assert (len(rows["train"]), len(rows["validation"])) == (80, 20)
    assert rows["validation"][0] == {"text": "row number 80 of the set", ROW_COLUMN: 80}
    held = load_rows(str(data), 0, 0.2, split="train[-50:]")  # no validation split: a fifth of the slice held out
    assert (len(held["train"]), len(held["validation"])) == (40, 10)
    assert min([*held["train"][ROW_COLUMN], *held["validation"][ROW_COLUMN]]) == 50
    some = load_rows(str(QUICKSTART_DATA), 0, 0.1, split="train[:10]")
    assert len(some["train"]) == 10 and len(some["validation"]) == 60  # the directory's validation split, whole
    both = load_rows(str(QUICKSTART_DATA), 0, 0.2, split="train[:10]+validation[:5]")
    assert (len(both["train"]), len(both["validation"])) == (12, 3)  # validation is trained on: a hold-out instead
    for spec, message in (("train[:x]", "not a split of"), ("tain[:5]", "not a split of"),
                          ("train[200:]", "selects no row")):
        with pytest.raises(SftuneError, match=re.escape(f"--split {spec!r}") + ".*" + message):
            load_rows(str(data), 0, 0.1, split=spec)
    prepared = prepare(str(data), gpt2_tokenizer, 64, split="train[:30]", val_split="train[30:40]", min_tokens=0,
                       cache_dir=tmp_path / "c")
    assert (len(prepared.train), len(prepared.validation)) == (30, 10)
    with pytest.raises(SftuneError, match="split = 'train\\[:10\\]': is a slice, which needs the data in memory"):
        resolve_config({"split": "train[:10]", "streaming": True, "max_steps": 3})
