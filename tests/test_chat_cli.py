"""Tier 2: chat data through the real CLI: train, see the masks, generate with the same template."""

import json

import pytest

from conftest import ROOT, read_jsonl, run_cli

CHAT_CONFIG = str(ROOT / "configs" / "chat.yaml")


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """configs/chat.yaml (tiny GPT-2 from a config, bundled GPT-2 tokenizer), shortened to 40 steps."""
    out = tmp_path_factory.mktemp("chat") / "out"
    proc = run_cli("train", "--config", CHAT_CONFIG, "--max-steps", "40", "--eval-every", "20",
                   "--sample-max-new-tokens", "8", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_chat_training_learns_and_saves_its_template(chat_run):
    from transformers import AutoTokenizer

    from sftune.data.formats import DEFAULT_CHAT_TEMPLATE

    out, proc = chat_run
    assert "format chat (messages=messages)" in proc.stderr
    assert "using sftune's default" in proc.stderr
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "eval"]
    assert evals[-1]["val_loss"] < 0.5 * evals[0]["val_loss"]
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE  # the next RLHF stage renders chats the same way


def test_generate_renders_the_chat_with_the_same_template(chat_run):
    from transformers import AutoTokenizer

    from sftune.generate import render_chat_prompt

    out, _ = chat_run
    text, stop = render_chat_prompt(AutoTokenizer.from_pretrained(out), "Should I see the remake?")
    assert text == "<|user|>\nShould I see the remake?<|endoftext|><|assistant|>\n"  # what training rendered
    proc = run_cli("generate", "--model", str(out), "--chat", "Should I see the remake?", "--temperature", "0",
                   "--max-new-tokens", "12", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["chat"] == "Should I see the remake?" and result["completions"][0].strip()


def test_data_show_marks_the_trained_tokens():
    proc = run_cli("data", "--config", CHAT_CONFIG, "--show", "1")
    assert proc.returncode == 0, proc.stderr
    first = json.loads((ROOT / "examples/chat/data/train.jsonl").read_text().splitlines()[0])["messages"]
    user, answer = first[0]["content"], first[1]["content"]
    assert f"<|user|>\n{user}<|endoftext|><|assistant|>\n[[{answer}<|endoftext|>]]" in proc.stdout
    assert "trained" in proc.stdout and "untrained" in proc.stdout

    proc = run_cli("data", "--config", CHAT_CONFIG, "--show", "2", "--json")
    report = json.loads(proc.stdout)
    ex = report["examples"][0]
    assert len(ex["input_ids"]) == len(ex["labels"]) and -100 in ex["labels"]
    assert ex["labels"][-1] == 50256  # the end-of-turn (EOS) of the answer is trained
    split = report["splits"]["train"]
    assert split["supervised_tokens"] > 0 and split["untrained_tokens"] > split["supervised_tokens"]


def test_generate_without_a_template_is_a_clear_error(tiny_model_dir):
    proc = run_cli("generate", "--model", str(tiny_model_dir), "--chat", "hi")
    assert proc.returncode == 2 and "has no chat template" in proc.stderr and "Traceback" not in proc.stderr
