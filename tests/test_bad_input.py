"""Tier 2: every user mistake gets exit status 2, a message naming the problem and the fix, and no traceback.

The table runs the CLI's `main` in-process (the same code path, without an interpreter start-up per case);
one case runs as a real subprocess to show that no traceback reaches the terminal."""

import json
import shutil

import pytest

from conftest import FIXTURES, QUICKSTART_DATA, run_main



@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, small_model_dir):
    d = tmp_path_factory.mktemp("bad")
    good = {"text": "a sentence that is long enough to keep", "label": 1}
    (d / "malformed.jsonl").write_text(json.dumps(good) + "\n" + '{"text": "broken\n' + json.dumps(good) + "\n")
    (d / "latin1.txt").write_bytes("a sentence that is long enough to keep\ncaf\xe9 au lait is fine\n".encode("latin-1"))
    (d / "empty.jsonl").write_text("")
    (d / "surrogate.jsonl").write_text(json.dumps(good) + "\n" + '{"text": "half a pair \\ud800 here, long enough"}\n'
                                       + json.dumps(good) + "\n")
    (d / "header.csv").write_text("text,label\n")
    (d / "data.xml").write_text("<rows/>")
    no_tokenizer = d / "model-without-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(small_model_dir / name, no_tokenizer / name)
    (d / "llama-without-tokenizer").mkdir()  # (transformers raises a page on SentencePiece for a Llama config)
    shutil.copy(FIXTURES / "tiny-llama" / "config.json", d / "llama-without-tokenizer")
    (d / "typo.yaml").write_text("learning_rate: 1e-4\n")
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there, how are you?"}]
    (d / "bad_role.jsonl").write_text(json.dumps({"messages": chat}) + "\n" + json.dumps(
        {"messages": [chat[0], {"role": "bot", "content": "hi"}]}) + "\n" + json.dumps({"messages": chat}) + "\n")
    return d


CASES = [
    # (id, extra args (FILES/ and MODEL are substituted), words the message must contain)
    ("missing-path", ["--dataset", "./missing.jsonl"], ["dataset path not found: './missing.jsonl'", "--dataset"]),
    ("unknown-hub-id", ["--dataset", "someone/no-such-dataset"], ["'someone/no-such-dataset' is not a local path",
                                                                  "--dataset PATH"]),
    ("unsupported-type", ["--dataset", "FILES/data.xml"], ["unsupported data file type '.xml'", "--dataset"]),
    ("malformed-jsonl", ["--dataset", "FILES/malformed.jsonl"], ["malformed.jsonl:2: malformed JSON", "fix or remove"]),
    ("not-utf8", ["--dataset", "FILES/latin1.txt"], ["latin1.txt:2: not UTF-8 text", "re-encode"]),
    ("empty-dataset", ["--dataset", "FILES/empty.jsonl"], ["empty.jsonl is empty"]),
    ("lone-surrogate", ["--dataset", "FILES/surrogate.jsonl"], ["surrogate.jsonl:2: a \\u escape of half a surrogate "
                                                                "pair", "fix or remove that line"]),
    ("header-only-csv", ["--dataset", "FILES/header.csv"], ["header.csv holds a header line and no rows"]),
    ("missing-text-column", ["--text-column", "body"], ["text column 'body' not in the dataset (columns: text, label)",
                                                        "--text-column"]),
    ("all-filtered", ["--min-tokens", "500"], ["no train example is left after filtering", "too_short",
                                               "--min-tokens"]),
    ("all-overlong", ["--max-length", "4"], ["no train example is left after filtering", "Raise --max-length (4) or "
                                             "keep them, cut, with --overlong truncate"]),
    ("fewer-rows-than-a-batch", ["--batch-size", "300", "--grad-accum", "2"], ["400 examples", "--batch-size"]),
    ("lr-zero", ["--lr", "0"], ["lr = 0.0: must be a positive, finite number", "--lr"]),
    ("batch-size-zero", ["--batch-size", "0"], ["batch_size = 0: must be at least 1", "--batch-size"]),
    ("negative-steps", ["--max-steps", "-3"], ["max_steps = -3", "--max-steps"]),
    ("wrong-type", ["--epochs", "two"], ["`epochs` must be an integer, got 'two'"]),
    ("config-typo", ["--config", "FILES/typo.yaml"], ["unknown key `learning_rate`"]),
    ("model-without-tokenizer", ["--model", "FILES/model-without-tokenizer"], ["holds no tokenizer files",
                                                                               "it holds config.json", "--tokenizer"]),
    ("llama-without-tokenizer", ["--model", "FILES/llama-without-tokenizer"], ["holds no tokenizer files",
                                                                               "it holds config.json)", "--tokenizer"]),
    ("max-length-too-long", ["--max-length", "4096"], ["exceeds the model's context of 128", "--max-length"]),
    ("chat-unknown-role", ["--dataset", "FILES/bad_role.jsonl"], ["row 2, message 1: unknown role 'bot'",
                                                                  "roles are system, user, assistant"]),
    ("chat-template-missing", ["--chat-template", "FILES/none.jinja"], ["chat_template = ", "no such file",
                                                                        "--chat-template"]),
    ("columns-unknown-part", ["--columns", "answer=text"], ["unknown part 'answer'", "--columns"]),
    ("columns-missing-column", ["--columns", "prompt=text,completion=reply"],
     ["column 'reply' (for completion) is not in the dataset (columns: text, label)", "--columns"]),
]


@pytest.mark.parametrize("args, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(args, words, bad_files, small_model_dir, tmp_path, capfd):
    capsys = capfd  # (the descriptors: a library's logger may hold the stderr of before the test)
    args = [a.replace("FILES", str(bad_files)) for a in args]
    out = tmp_path / "out"
    code, _, err = run_main(capsys, "train", "--model", str(small_model_dir), "--dataset", str(QUICKSTART_DATA),
                            "--output-dir", str(out), *args)
    assert code == 2, err
    for w in words:
        assert w in err, err
    assert "Traceback" not in err and "Failed to load" not in err  # (datasets' own log line of a bad file)
    assert not out.exists()  # nothing written


def test_debug_shows_the_traceback(small_model_dir, tmp_path):
    """--debug lets the error out of `main`, so Python prints its traceback (without --debug a real process prints
    one line: tests/test_cli.py's offline and YAML-typo runs)."""
    from sftune.cli import main
    from sftune.errors import SftuneError

    with pytest.raises(SftuneError, match="dataset path not found: './missing.jsonl'"):
        main(["--debug", "train", "--model", str(small_model_dir), "--dataset", "./missing.jsonl",
              "--output-dir", str(tmp_path / "o")])
