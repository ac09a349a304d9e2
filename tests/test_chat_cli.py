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

    from sftune.data.templates import DEFAULT_CHAT_TEMPLATE

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
    assert "trained on chat data" not in err
    # --prompt on a chat run continues the text as written, and says how to ask it as a user turn
    code, _, err = run_main(capsys, "generate", "--model", str(out), "--prompt", "Should I", "--max-new-tokens", "4")
    assert code == 0 and "was trained on chat data; --prompt continues the text as written, --chat MESSAGE" in err


def test_generate_shows_the_model_its_tools(chat_run, tmp_path, capsys):
    from transformers import AutoTokenizer

    from sftune.generate import render_chat_prompt

    out, _ = chat_run
    schema = {"type": "function", "function": {"name": "find_film", "description": "Find a film.",
                                               "parameters": {"type": "object", "properties": {}}}}
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([schema]))
    text, _ = render_chat_prompt(AutoTokenizer.from_pretrained(out), "Find Heat.", tools=[schema])
    assert text == f"<|tools|>\n{json.dumps(schema)}<|endoftext|><|user|>\nFind Heat.<|endoftext|><|assistant|>\n"
    code, stdout, err = run_main(capsys, "generate", "--model", str(out), "--chat", "Find Heat.", "--tools",
                                 str(tools), "--temperature", "0", "--max-new-tokens", "4", "--json")
    assert code == 0, err
    bad, nameless = tmp_path / "bad.json", tmp_path / "nameless.json"
    bad.write_text('["find_film"]')
    nameless.write_text('{"not": "a schema"}')
    for args, message in ((["--chat", "Hi", "--tools", str(tmp_path / "none.json")], "--tools: cannot read"),
                          (["--prompt", "Hi", "--tools", str(tools)], "--tools goes with --chat"),
                          (["--chat", "Hi", "--tools", str(bad)], "tools must be a list of JSON schemas"),
                          (["--chat", "Hi", "--tools", str(nameless)], "tool 0 has no name")):
        code, _, err = run_main(capsys, "generate", "--model", str(out), *args)
        assert code == 2 and message in err and "Traceback" not in err, err


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
    """Said before the model is loaded (minutes for a large one), as an empty prompt is."""
    code, _, err = run_main(capsys, "generate", "--model", str(tiny_model_dir), "--chat", "hi")
    assert code == 2 and "has no chat template" in err and "Traceback" not in err
    assert "activation:" not in err  # (the model's load line)
    code, _, err = run_main(capsys, "generate", "--model", str(tiny_model_dir), "--prompt", "")
    assert code == 2 and "the prompt is empty" in err and "activation:" not in err
    # the model in front (as export, report and push take their run) or with --model: one, not none, not two
    code, _, err = run_main(capsys, "generate", str(tiny_model_dir), "--prompt", "")
    assert code == 2 and "the prompt is empty" in err
    code, _, err = run_main(capsys, "generate", "--prompt", "the film")
    assert code == 2 and "which model? give it first (sftune generate runs/quickstart" in err
    code, _, err = run_main(capsys, "generate", str(tiny_model_dir), "--model", "gpt2", "--prompt", "the film")
    assert code == 2 and f"two models: {tiny_model_dir} in front and --model gpt2; give one" in err
    assert "Traceback" not in err


def test_generate_with_a_system_message_the_template_refuses_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}" + CHATML)
    tok.save_pretrained(model)
    code, _, err = run_main(capsys, "generate", "--model", str(model), "--chat", "hi", "--system", "Be brief.")
    assert code == 2 and "Traceback" not in err
    assert "the model's chat template refuses this prompt: System role not supported; leave out --system" in err


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_a_saved_chat_model_stops_at_its_templates_end_of_turn(tmp_path, capsys):
    """A base model whose chat template ends turns with its own special token (Qwen2.5 base: <|im_end|>, EOS
    <|endoftext|>): the saved generation config stops at both, so transformers' generate and vLLM end the answer."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, GenerationConfig
    from transformers import LogitsProcessor, LogitsProcessorList

    from conftest import small_vocab_tokenizer

    tok = small_vocab_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    base = tmp_path / "base"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=128, vocab_size=len(tok),
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(base)
    tok.save_pretrained(base)
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"messages": [{"role": "user", "content": f"Film {i}?"}, {"role": "assistant", "content": "Fine."}]}
            for i in range(8)]
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run_main(capsys, "train", "--no-run-report", "--model", str(base), "--dataset", str(data),
                            "--max-steps", "1", "--batch-size", "4", "--min-tokens", "0", "--sample-prompts", "",
                            "--output-dir", str(tmp_path / "out"))
    assert code == 0, err
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    assert GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id == [tok.eos_token_id, end_of_turn]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Film 1?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)

    class EndTheTurn(LogitsProcessor):  # the model answers at once and ends its turn: generation must stop there
        def __call__(self, input_ids, scores):
            scores[:, end_of_turn] = scores.max() + 100.0
            return scores

    out = model.generate(**prompt, max_new_tokens=5, do_sample=False, logits_processor=LogitsProcessorList([EndTheTurn()]))
    assert out[0, prompt["input_ids"].shape[1]:].tolist() == [end_of_turn]


def test_generate_renders_with_a_tokenizers_named_templates(gpt2_tokenizer):
    """Several named templates (Hermes, Command R): `default`, or `tool_use` when tools are given."""
    import copy

    from sftune.generate import end_of_turn_ids, render_chat_prompt
    from test_formats import TOOLS_CHATML

    tok = copy.deepcopy(gpt2_tokenizer)
    tok.chat_template = {"default": CHATML, "tool_use": TOOLS_CHATML}
    schema = {"type": "function", "function": {"name": "f", "description": "F.", "parameters": {}}}
    assert render_chat_prompt(tok, "Hi")[0] == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat_prompt(tok, "Hi", tools=[schema])[0].startswith(f"<|im_start|>system\nTools:\n{json.dumps(schema)}")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    assert end_of_turn_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_chat_template_from_another_models_tokenizer(small_model_dir, tmp_path, capsys, monkeypatch):
    """`--chat-template DIR_OR_HUB_ID` takes that tokenizer's template (an instruct model's, for its base)."""
    from transformers import AutoTokenizer

    instruct = tmp_path / "instruct"
    tok = AutoTokenizer.from_pretrained(small_model_dir)
    tok.chat_template = CHATML.replace("<|im_start|>", "<|endoftext|>").replace("<|im_end|>", "<|endoftext|>")
    tok.save_pretrained(instruct)
    data = tmp_path / "chat.jsonl"
    data.write_text((json.dumps({"messages": [{"role": "user", "content": "a film"},
                                              {"role": "assistant", "content": "a fine film"}]}) + "\n") * 20)
    code, stdout, err = run_main(capsys, "data", "--model", str(small_model_dir), "--dataset", str(data),
                                 "--chat-template", str(instruct), "--min-tokens", "0", "--show", "1")
    assert code == 0, err
    assert "<|endoftext|>user\na film<|endoftext|>\n<|endoftext|>assistant\n[[a fine film<|endoftext|>\n]]" in stdout
    assert "splits into several tokens" not in err  # its markers are this tokenizer's tokens
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_main(capsys, "data", "--model", str(small_model_dir), "--dataset", str(data),
                            "--chat-template", "some-org/some-instruct-model")
    assert code == 2 and "--chat-template" in err and "Traceback" not in err, err


def test_a_template_whose_markers_the_tokenizer_splits_is_warned_about(small_model_dir, tmp_path, capsys):
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    data = tmp_path / "chat.jsonl"
    data.write_text((json.dumps({"messages": [{"role": "user", "content": "a film"},
                                              {"role": "assistant", "content": "a fine film"}]}) + "\n") * 20)
    code, _, err = run_main(capsys, "data", "--model", str(small_model_dir), "--dataset", str(data),
                            "--chat-template", str(template), "--min-tokens", "0")
    assert code == 0, err
    assert "the chat template writes <|im_end|>, <|im_start|>, which this tokenizer splits into several" in err


def test_the_tool_calling_example_trains_the_calls_and_answers(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, stdout, err = run_main(capsys, "data", "--config", str(ROOT / "configs" / "chat-tools.yaml"), "--show", "1")
    assert code == 0, err
    assert "format chat (messages=messages, tools=tools)" in err
    shown = stdout[stdout.index("--- train example 0"):]
    assert '<|tools|>\n{"type": "function", "function": {"name": "showtimes"' in shown
    assert '[[<tool_call>{"name": "showtimes", "arguments": {"film": ' in shown  # the call is trained
    assert "<|tool|>\n" in shown and "[[<|tool|>" not in shown  # the tool's answer is not
