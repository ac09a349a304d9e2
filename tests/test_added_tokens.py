"""--add-tokens: new tokens in the tokenizer, embeddings grown to fit (new rows at the mean of the old ones), and under
LoRA the new rows trained as peft trainable tokens, so that the adapter holds them and loads on any copy of the base
grown to the tokenizer's length (the "adapter size mismatch after added tokens" trap, and its quieter sibling: a
new row of an untied head left at a random value that a reload draws again, differently).

The fast tests work on models directly; the slow ones train through the CLI (a ChatML template on a base model whose
tokenizer lacks its markers), resume, evaluate, generate and merge.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICKSTART_DATA, ROOT, make_tiny_gpt2, read_jsonl, run_main

MARKERS = ["<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHAT_DATA = ROOT / "examples" / "chat" / "data"


def fresh_tokenizer():
    from conftest import load_gpt2_tokenizer

    return load_gpt2_tokenizer()


def llama():
    from test_families import family_model

    return family_model("tiny-llama")


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- fast: the tokenizer and the embeddings -------------------------------------------------


def test_added_tokens_are_single_special_tokens_and_known_ones_are_kept():
    from sftune.vocab import add_tokens, token_ids

    tokenizer = fresh_tokenizer()
    before = len(tokenizer)
    assert add_tokens(tokenizer, [*MARKERS, "<|endoftext|>"]) == MARKERS  # EOS is in the vocabulary already
    assert len(tokenizer) == before + 2 and token_ids(tokenizer, MARKERS) == [before, before + 1]
    ids = tokenizer("hi<|im_start|>user\nyo<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[1] == before and ids[-1] == before + 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hiuser\nyo"  # special: out of decoded text
    assert add_tokens(tokenizer, MARKERS) == [] and len(tokenizer) == before + 2  # twice: nothing more


@pytest.mark.parametrize("make", [make_tiny_gpt2, llama], ids=["gpt2-tied", "llama-untied"])
def test_grown_embeddings_keep_the_old_rows_and_start_new_ones_at_their_mean(make):
    from sftune.vocab import fit_embeddings

    model = make()
    embedding, head = model.get_input_embeddings().weight.detach().clone(), model.lm_head.weight.detach().clone()
    tied = model.config.tie_word_embeddings
    assert fit_embeddings(model, 50257) == 0  # fits already: untouched
    assert fit_embeddings(model, 50260) == 3
    grown, grown_head = model.get_input_embeddings().weight, model.lm_head.weight
    assert grown.shape == (50260, 64) and model.config.vocab_size == 50260
    assert torch.equal(grown[:50257], embedding) and torch.equal(grown_head[:50257], head)
    for weight, old in ((grown, embedding), (grown_head, head)):
        assert torch.equal(weight[50257:], old.mean(0).expand(3, -1))  # the same row on every load: no RNG
    assert (grown_head is grown) == tied  # GPT-2's head stays the embedding; Llama's grows on its own


def test_a_tokenizer_larger_than_the_model_is_only_accepted_for_tokens_it_adds():
    from sftune.build import check_model_fits
    from sftune.config import resolve_config
    from sftune.errors import SftuneError
    from sftune.vocab import add_tokens

    config = make_tiny_gpt2().config
    tokenizer = fresh_tokenizer()
    add_tokens(tokenizer, MARKERS)
    check_model_fits(resolve_config({"add_tokens": MARKERS}), tokenizer, config)  # rows for these are added
    with pytest.raises(SftuneError, match="50,259 tokens but the model's vocabulary only 50,257") as e:
        check_model_fits(resolve_config({"add_tokens": MARKERS[:1]}), tokenizer, config)
    assert "1 token past id 50,256 ('<|im_end|>') has no embedding" in str(e.value)
    assert str(e.value).endswith("--add-tokens '<|im_end|>'")  # a few tokens: their rows can be added
    # tokens a tokenizer already has beyond the model's rows (an instruct model's tokenizer on its base) get rows too
    check_model_fits(resolve_config({"add_tokens": MARKERS[1:], "pad_token": MARKERS[0]}), tokenizer, config)


def test_add_tokens_mistakes_are_named(capsys, tmp_path):
    for flags, problem in [(["--add-tokens", "<a>", "<a>"], "names a token twice"),
                           (["--add-tokens", "<a>", " <b>"], "without leading or trailing"),
                           (["--pad-token", "<pad> "], "without leading or trailing")]:
        code, _, err = run_main(capsys, "train", "--dataset", str(QUICKSTART_DATA), "--output-dir",
                                str(tmp_path / "run"), *flags)
        assert code == 2 and problem in err and flags[0] in err and "Traceback" not in err, err
        assert not (tmp_path / "run").exists()


def test_a_template_whose_markers_the_tokenizer_splits_suggests_adding_them(capsys):
    from sftune.data.templates import ChatTemplate
    from sftune.data.tokenize import warn_about_split_markers

    tokenizer = fresh_tokenizer()
    warn_about_split_markers(ChatTemplate(CHATML, tokenizer), tokenizer)
    assert "--add-tokens '<|im_end|>' '<|im_start|>'" in capsys.readouterr().err
    tokenizer.add_tokens(MARKERS, special_tokens=True)
    warn_about_split_markers(ChatTemplate(CHATML, tokenizer), tokenizer)
    assert "--add-tokens" not in capsys.readouterr().err


# --- fast: LoRA trains the new rows, and the adapter holds them ------------------------------------


@pytest.mark.parametrize("make", [make_tiny_gpt2, llama], ids=["gpt2-tied", "llama-untied"])
def test_a_lora_adapter_holds_the_new_rows_and_loads_on_any_grown_base(make, tmp_path):
    """The new tokens' rows train (in the embedding, and in an untied head) and nothing else of the base; the fused
    loss keeps working through peft's wrapper and equals the plain one; the saved adapter gives the same logits
    merged by sftune, through `PeftModel.from_pretrained` on a base grown by transformers' own (random) resize,
    and through `AutoPeftModelForCausalLM`, which grows the base from the adapter's tokenizer itself."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    from sftune.config import resolve_config
    from sftune.loss import CausalLMLoss
    from sftune.lora import add_lora, load_adapter_model, save_adapter
    from sftune.modeling import save_model
    from sftune.vocab import add_tokens, fit_embeddings, token_ids

    base_dir = tmp_path / "base"
    save_model(make(), fresh_tokenizer(), base_dir)  # the base: 50,257 rows, its tokenizer without the markers
    tokenizer = fresh_tokenizer()
    add_tokens(tokenizer, MARKERS)
    new = token_ids(tokenizer, MARKERS)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    fit_embeddings(model, len(tokenizer))
    peft_model = add_lora(model, resolve_config({"lora_r": 4, "add_tokens": MARKERS}), new)
    trained = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    rows = {n: p for n, p in trained.items() if "trainable_tokens" in n}
    assert len(rows) == (1 if model.config.tie_word_embeddings else 2)  # a tied head shares the embedding's rows
    assert all(p.shape == (2, 64) for p in rows.values()) and all("lora_" in n for n in trained.keys() - rows.keys())

    inner = peft_model.get_base_model()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trained.values():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    batch = {"input_ids": torch.tensor([[new[0], 6, 7, new[1]], [9, new[0], 11, 12]]),
             "target_positions": torch.tensor([0, 1, 2, 4, 5]), "targets": torch.tensor([6, 7, new[1], new[0], 11])}
    results = []
    for fused in (True, False):
        loss_model = CausalLMLoss(inner, fused=fused)
        assert CausalLMLoss(inner).fused  # the default keeps the fused loss
        peft_model.zero_grad()
        loss = loss_model(batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in rows.items()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name in rows:
        assert results[0][1][name].abs().sum() > 0
        torch.testing.assert_close(results[0][1][name], results[1][1][name], rtol=1e-4, atol=1e-6)

    # the rows merge as peft's own method merges them, and the step makes no tensor from a Python list in peft's
    # layer (a host-to-device copy on a GPU, which a CUDA graph capture refuses): the index is kept on the device
    import sys

    import peft.tuners.trainable_tokens.layer as peft_layer

    layers = [m for m in peft_model.modules() if isinstance(m, peft_layer.TrainableTokensLayer)]
    assert layers
    for layer in layers:
        assert torch.equal(layer.get_merged_weights(layer.active_adapters),
                           peft_layer.TrainableTokensLayer.get_merged_weights(layer, layer.active_adapters))
    made, real = [], torch.tensor

    def recorded(*args, **kwargs):
        made.append(sys._getframe(1).f_globals.get("__name__"))
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "tensor", recorded)
        CausalLMLoss(inner)(batch).backward()
    assert peft_layer.__name__ not in made

    ids = torch.tensor([[new[0], 15, 16, new[1], 17, new[0]]])
    expected = logits(peft_model, ids)
    adapter_dir = tmp_path / "adapter"
    save_adapter(peft_model, tokenizer, adapter_dir, str(base_dir))
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    assert all(t.shape[0] < 1000 for t in saved.values())  # rows, never a whole (50,259-row) matrix
    merged = load_adapter_model(adapter_dir)
    assert merged.get_input_embeddings().weight.shape[0] == 50259
    torch.testing.assert_close(logits(merged, ids), expected, rtol=0, atol=1e-5)
    torch.manual_seed(123)  # transformers' resize draws the new rows at random: the adapter's rows replace them
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base.resize_token_embeddings(len(tokenizer))
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base, adapter_dir), ids), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(AutoPeftModelForCausalLM.from_pretrained(adapter_dir), ids), expected, rtol=0,
                               atol=1e-5)


def test_rows_of_a_matrix_trained_in_full_are_not_trained_twice():
    """`--lora-modules-to-save` trains a whole matrix: its new rows need no trainable tokens (GPT-2's tied
    embedding/head named either way is one such matrix; peft failed in the forward when given both)."""
    from sftune.config import resolve_config
    from sftune.lora import add_lora, trainable_tokens
    from sftune.vocab import fit_embeddings

    gpt2, llama_model = make_tiny_gpt2(), llama()
    for model in (gpt2, llama_model):
        fit_embeddings(model, 50259)
    assert trainable_tokens(gpt2, [50257, 50258], []) == {"wte": [50257, 50258]}
    assert trainable_tokens(gpt2, [50257], ["lm_head"]) is None and trainable_tokens(gpt2, [50257], ["wte"]) is None
    assert trainable_tokens(llama_model, [50258, 50257], []) == {"embed_tokens": [50257, 50258],
                                                                 "lm_head": [50257, 50258]}
    assert trainable_tokens(llama_model, [50257], ["lm_head"]) == {"embed_tokens": [50257]}
    for model, full in ((gpt2, ["lm_head"]), (llama_model, ["lm_head"])):
        peft_model = add_lora(model, resolve_config({"lora_r": 4, "lora_modules_to_save": full}), [50257, 50258])
        assert logits(peft_model, torch.tensor([[50257, 5, 50258]])).shape == (1, 3, 50259)


# --- slow: through the CLI --------------------------------------------------------------------


def chat_args(model_dir, out, template, *extra):
    return ["train", "--model", str(model_dir), "--dataset", str(CHAT_DATA), "--chat-template", str(template),
            "--add-tokens", *MARKERS, "--min-tokens", "0", "--batch-size", "8", "--max-steps", "4", "--lr", "3e-3",
            "--precision", "fp32", "--log-every", "1", "--save-every", "2", "--keep-last", "2", "--no-run-report",
            "--report-to", "none", "--sample-prompts", "", "--output-dir", str(out), *extra]  # ("": no samples, not even
    # chat's validation prompts)


def resumed_from_step_2(capsys, args, out, tmp_path):
    """A copy of the finished run `out` cut back to its step-2 checkpoint, resumed: its directory."""
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoints" / "step-4")
    for name in ("model.safetensors", "adapter_model.safetensors"):
        (copy / name).unlink(missing_ok=True)
    args = list(args)
    args[args.index("--output-dir") + 1] = str(copy)
    code, _, err = run_main(capsys, *args, "--resume", "auto")
    assert code == 0 and f"resumed from {copy / 'checkpoints' / 'step-2'}" in err, err
    return copy


@pytest.fixture
def chatml(tmp_path):
    path = tmp_path / "chatml.jinja"
    path.write_text(CHATML)
    return path


@pytest.mark.slow
def test_a_full_fine_tune_with_added_tokens_saves_a_grown_model_and_resumes_exactly(tiny_model_dir, chatml, tmp_path,
                                                                                   capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    args = chat_args(tiny_model_dir, out, chatml)
    code, _, err = run_main(capsys, *args)
    assert code == 0, err
    assert "tokens: <|im_start|>, <|im_end|> added; 50,259 in all" in err and "splits" not in err
    assert "embeddings: 2 rows added for the new tokens" in err and "output projection fused" in err
    assert "sample step" not in err and "sample" not in {r["type"] for r in read_jsonl(out / "metrics.jsonl")}
    tokenizer, model = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)
    assert len(tokenizer) == model.config.vocab_size == model.get_input_embeddings().weight.shape[0] == 50259
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in json.loads((out / "generation_config.json").read_text())["eos_token_id"]  # generation stops there
    base = load_file(tiny_model_dir / "model.safetensors")["transformer.wte.weight"]
    trained = load_file(out / "model.safetensors")["transformer.wte.weight"]
    start = base.mean(0)
    assert not torch.allclose(trained[50257:], start.expand(2, -1))  # the new rows trained

    copy = resumed_from_step_2(capsys, args, out, tmp_path)
    a, b = load_file(out / "model.safetensors"), load_file(copy / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_lora_run_with_added_tokens_resumes_evaluates_generates_and_merges(tiny_model_dir, chatml, tmp_path,
                                                                            capsys):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    args = chat_args(tiny_model_dir, out, chatml, "--lora-r", "4", "--eval-every", "4")
    code, _, err = run_main(capsys, *args)
    assert code == 0, err
    assert "the rows of 2 tokens (--add-tokens) in wte" in err and "output projection fused" in err
    settings = json.loads((out / "adapter_config.json").read_text())
    assert settings["trainable_token_indices"] == {"wte": [50257, 50258]}
    assert not (out / "model.safetensors").exists() and not (out / "base").exists()  # the base is --model's
    assert load_file(tiny_model_dir / "model.safetensors")["transformer.wte.weight"].shape[0] == 50257  # untouched

    copy = resumed_from_step_2(capsys, args, out, tmp_path)
    a, b = load_file(out / "adapter_model.safetensors"), load_file(copy / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("trainable_tokens" in k for k in a)

    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r["val_loss"] for r in evals if r["type"] == "eval"][-1]
    code, stdout, err = run_main(capsys, "eval", "--model", str(out), "--dataset", str(CHAT_DATA), "--min-tokens", "0",
                                 "--json")
    assert code == 0, err
    assert json.loads(stdout)["val_loss"] == pytest.approx(last, abs=1e-6)
    code, stdout, err = run_main(capsys, "generate", "--model", str(out), "--chat", "Is it good?", "--temperature",
                                 "0", "--max-new-tokens", "4")
    assert code == 0 and stdout.startswith("[0] user: Is it good?"), err
    code, _, err = run_main(capsys, "export", str(out), "--merge", str(tmp_path / "merged"))
    assert code == 0, err
    ids = torch.tensor([[50257, 882, 198, 50258, 50257]])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert len(AutoTokenizer.from_pretrained(tmp_path / "merged")) == merged.config.vocab_size == 50259
    torch.testing.assert_close(logits(merged, ids), logits(AutoPeftModelForCausalLM.from_pretrained(out), ids),
                               rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_pad_token_of_its_own_is_what_the_saved_config_names(tmp_path, capsys):
    """--pad-token on a Llama-shaped model: added, the embeddings grown, and the saved config names it, so that the
    Llama class built from it (as the next RLHF stage builds it) freezes the pad row (padding_idx), not EOS's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftune.modeling import save_model

    base = tmp_path / "llama"
    save_model(llama(), fresh_tokenizer(), base)
    assert AutoModelForCausalLM.from_pretrained(base).model.embed_tokens.padding_idx == 50256  # EOS's row: frozen
    out = tmp_path / "run"
    capsys.readouterr()
    code, _, err = run_main(capsys, "train", "--model", str(base), "--dataset", str(QUICKSTART_DATA), "--pad-token",
                            "<|pad|>", "--max-steps", "2", "--batch-size", "4", "--output-dir", str(out),
                            "--no-run-report", "--report-to", "none")
    assert code == 0, err
    assert "pad token: '<|pad|>' (id 50257, added; --pad-token)" in err and "padding with EOS" not in err
    assert "embeddings: 1 row added" in err
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token == "<|pad|>" and model.config.pad_token_id == 50257
    assert model.model.embed_tokens.padding_idx == 50257 and model.config.vocab_size == 50258
