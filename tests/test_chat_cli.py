"""Tier 2: chat data through the CLI (in-process `main`): train, see the masks, generate with the same template.
Needs nothing from ../shared: configs/chat.yaml builds its model from a config and uses the bundled tokenizer."""

import contextlib
import io
import json

import pytest

from conftest import ROOT, read_jsonl, run_main

CHAT_CONFIG = str(ROOT / "configs" / "chat.yaml")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """configs/chat.yaml (tiny GPT-2 from a config, bundled GPT-2 tokenizer), shortened to 24 steps."""
    out = tmp_path_factory.mktemp("chat") / "out"
    from sftune.cli import main

    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # the config's paths are relative to the repository
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["train", "--config", CHAT_CONFIG, "--max-steps", "24", "--eval-every", "24",
                         "--sample-max-new-tokens", "8", "--output-dir", str(out)])
    assert code == 0, err.getvalue()
    return out, err.getvalue()


def test_chat_training_learns_and_saves_its_template(chat_run):
    from transformers import AutoTokenizer

    from sftune.data.formats import DEFAULT_CHAT_TEMPLATE

    out, err = chat_run
    assert "format chat (messages=messages)" in err
    assert "using sftune's default" in err
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "eval"]
    assert evals[-1]["val_loss"] < 0.5 * evals[0]["val_loss"]
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE  # the next RLHF stage renders chats the same way
    # at each evaluation: the 2 sample prompts (as user turns) and the first 2 validation prompts, rendered
    samples = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "sample"]
    assert [(r["step"], r["index"]) for r in samples] == [(e["step"], i) for e in evals for i in range(4)]
    assert all("<|user|>\n" in r["prompt"] and r["prompt"].endswith("<|assistant|>\n")
               for r in samples if r["index"] >= 2)
    assert samples[-1]["completion"] != samples[3]["completion"]  # the model changed in between


def test_generate_renders_the_chat_with_the_same_template(chat_run, capsys):
    from transformers import AutoTokenizer

    from sftune.generate import render_chat_prompt

    out, _ = chat_run
    text, stop = render_chat_prompt(AutoTokenizer.from_pretrained(out), "Should I see the remake?")
    assert text == "<|user|>\nShould I see the remake?<|endoftext|><|assistant|>\n"  # what training rendered
    code, stdout, err = run_main(capsys, "generate", "--model", str(out), "--chat", "Should I see the remake?",
                                 "--temperature", "0", "--max-new-tokens", "12", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["chat"] == "Should I see the remake?" and result["completions"][0].strip()


def test_data_show_marks_the_trained_tokens(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, stdout, err = run_main(capsys, "data", "--config", CHAT_CONFIG, "--show", "1")
    assert code == 0, err
    first = json.loads((ROOT / "examples/chat/data/train.jsonl").read_text().splitlines()[0])["messages"]
    user, answer = first[0]["content"], first[1]["content"]
    assert f"<|user|>\n{user}<|endoftext|><|assistant|>\n[[{answer}<|endoftext|>]]" in stdout
    assert "trained" in stdout and "untrained" in stdout

    code, stdout, err = run_main(capsys, "data", "--config", CHAT_CONFIG, "--show", "2", "--json")
    report = json.loads(stdout)
    ex = report["examples"][0]
    assert len(ex["input_ids"]) == len(ex["labels"]) and -100 in ex["labels"]
    assert ex["labels"][-1] == 50256  # the end-of-turn (EOS) of the answer is trained
    split = report["splits"]["train"]
    assert split["supervised_tokens"] > 0 and split["untrained_tokens"] > split["supervised_tokens"]


def test_generate_without_a_template_is_a_clear_error(tiny_model_dir, capsys):
    code, _, err = run_main(capsys, "generate", "--model", str(tiny_model_dir), "--chat", "hi")
    assert code == 2 and "has no chat template" in err and "Traceback" not in err
