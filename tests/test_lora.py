"""LoRA with peft: options and their errors, adapter outputs that peft loads, a merge that computes what the
adapter does (GPT-2's tied head included), adapter-only checkpoints that resume bitwise after SIGTERM and kill -9.

The fast tests build adapters directly (random adapter weights, so a merge that dropped them would show); the
slow ones train a tiny GPT-2 (Conv1D layers; a 512-token vocabulary, `small_model_dir`) through the CLI.
"""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import QUICKSTART_DATA, assert_ordinary_modes, assert_same_losses, ROOT, make_tiny_gpt2, read_jsonl, run_captured, run_main, signal_at


def lora_cfg(**overrides):
    from sftune.config import resolve_config

    return resolve_config({"lora_r": 4, **overrides})


def randomize_adapter(peft_model, seed: int = 1) -> None:
    """LoRA's B starts at zero (the adapter adds nothing): give every trained tensor random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def llama():
    from test_families import family_model

    return family_model("tiny-llama")


def mixtral():
    from test_families import family_model

    return family_model("tiny-mixtral")


# --- fast: building, saving, loading and merging adapters --------------------------------


@pytest.mark.parametrize("make, save, variant", [
    (make_tiny_gpt2, ["lm_head"], {}), (make_tiny_gpt2, ["wte"], {}), (make_tiny_gpt2, [], {}),
    (llama, ["embed_tokens", "lm_head"], {}), (make_tiny_gpt2, [], {"lora_use_dora": True}),
    (llama, [], {"lora_use_dora": True, "lora_use_rslora": True}), (mixtral, [], {})],
    ids=["gpt2-head", "gpt2-embedding", "gpt2", "llama", "gpt2-dora", "llama-dora-rslora", "mixtral"])
def test_the_merged_model_computes_what_the_adapter_does(make, save, variant, gpt2_tokenizer, tmp_path):
    """Saved adapter -> base + strict load -> merge -> save_pretrained -> from_pretrained: the logits of the
    adapter model, within 1e-5 in fp32, and not the base's. GPT-2's tied wte/lm_head, named either way, trains
    as one matrix and stays one after the merge. DoRA (its magnitudes saved and merged too) and rsLoRA's scale.
    Mixtral's fused experts (3-D tensors, which peft adapts as parameters, not modules) too."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sftune.lora import add_lora, load_adapter_model, save_adapter
    from sftune.modeling import save_model

    base_dir = tmp_path / "base"
    save_model(make(), gpt2_tokenizer, base_dir)
    peft_model = add_lora(AutoModelForCausalLM.from_pretrained(base_dir), lora_cfg(lora_modules_to_save=save,
                                                                                   **variant))
    assert all(getattr(peft_model.peft_config["default"], k.removeprefix("lora_")) for k in variant)
    randomize_adapter(peft_model)
    inner = peft_model.get_base_model()
    if make is mixtral:  # all-linear reaches the experts and the router
        adapted = {n for n, p in peft_model.named_parameters() if p.requires_grad}
        assert any(".experts." in n for n in adapted) and any(".mlp.gate." in n for n in adapted), adapted
    if make is make_tiny_gpt2 and save:  # one trained matrix is both the embedding and the head
        trained = [p for p in inner.get_input_embeddings().parameters() if p.requires_grad]
        assert len(trained) == 1 and any(p is trained[0] for p in inner.get_output_embeddings().parameters())
    ids = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = logits(peft_model, ids)

    save_adapter(peft_model, gpt2_tokenizer, tmp_path / "adapter", str(base_dir))
    merged_dir = tmp_path / "merged"
    save_model(load_adapter_model(tmp_path / "adapter"), gpt2_tokenizer, merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    torch.testing.assert_close(logits(merged, ids), expected, rtol=0, atol=1e-5)
    by_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    torch.testing.assert_close(logits(by_peft, ids), expected, rtol=0, atol=1e-6)  # peft's own loading, too
    assert (logits(AutoModelForCausalLM.from_pretrained(base_dir), ids) - expected).abs().max() > 1e-3
    if make is make_tiny_gpt2:
        assert merged.config.tie_word_embeddings and merged.lm_head.weight is merged.transformer.wte.weight


def test_an_adapter_that_does_not_fit_the_base_is_an_error(gpt2_tokenizer, tmp_path):
    """peft only warns about missing or mismatched adapter tensors, leaving a model equal to its base."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sftune.errors import SftuneError
    from sftune.lora import add_lora, load_adapter_model, save_adapter
    from sftune.modeling import save_model

    peft_model = add_lora(make_tiny_gpt2(), lora_cfg())
    save_adapter(peft_model, gpt2_tokenizer, tmp_path / "adapter", "unused-hub-id")
    wider = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=96, n_head=2, n_positions=128, vocab_size=50257))
    save_model(wider, gpt2_tokenizer, tmp_path / "wider")
    with pytest.raises(SftuneError, match="does not fit this base model .*other shapes.*--base"):
        load_adapter_model(tmp_path / "adapter", base=str(tmp_path / "wider"))
    save_model(make_tiny_gpt2(), gpt2_tokenizer, tmp_path / "right")
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    dropped = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.raises(SftuneError, match=f"missing: {dropped}"):  # a file short of tensors: not quietly zero
        load_adapter_model(tmp_path / "adapter", base=str(tmp_path / "right"))
    config = tmp_path / "adapter" / "adapter_config.json"  # a base that was moved away
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(SftuneError, match="not found at .*gone; give it with --base"):
        load_adapter_model(tmp_path / "adapter")
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": "gpt2"}))  # the Hub
    with pytest.raises(SftuneError, match="(?s)base model 'gpt2' of the adapter .* could not be loaded.*--base"):
        load_adapter_model(tmp_path / "adapter")


def test_the_fused_loss_reaches_a_head_peft_trains_in_full():
    """`--lora-modules-to-save lm_head` wraps the head in peft's ModulesToSaveWrapper; the fused loss uses the
    trained copy inside it (3x faster than the logits path on the chat example) and equals the plain loss."""
    from sftune.loss import CausalLMLoss, output_head
    from sftune.lora import add_lora

    peft_model = add_lora(make_tiny_gpt2(), lora_cfg(lora_modules_to_save=["lm_head"]))
    inner = peft_model.get_base_model()
    assert output_head(inner) is not inner.get_output_embeddings() and output_head(inner).weight.requires_grad
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]), "attention_mask": torch.ones(2, 4, dtype=torch.long),
             "target_positions": torch.tensor([0, 1, 2, 4, 5]), "targets": torch.tensor([6, 7, 8, 10, 11])}
    grads = []
    for fused in (True, False):
        loss_model = CausalLMLoss(inner, fused=fused)
        assert CausalLMLoss(inner).fused
        peft_model.zero_grad()
        loss = loss_model(batch)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in peft_model.parameters() if p.requires_grad]))
    (fused_loss, fused_grads), (plain_loss, plain_grads) = grads
    torch.testing.assert_close(fused_loss, plain_loss)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "tiny-llama"])
def test_a_frozen_base_kept_in_bf16_gives_the_fp32_bases_loss_and_gradients_bitwise(family):
    """`--lora-base-dtype auto` under bf16: the frozen matrices that only products read (Conv1D/Linear weights, an
    untied head) are kept in bf16, half their memory; a tied embedding, layer norms, biases and the adapter stay
    fp32. Autocast casts an fp32 weight to bf16 where a product reads it, rounding as `.to` does, so the loss and
    every adapter gradient are the fp32 base's, bitwise."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import FIXTURES
    from sftune.loss import CausalLMLoss
    from sftune.casts import keep_frozen_matrices_in
    from sftune.lora import add_lora

    def build():
        torch.manual_seed(0)
        model = make_tiny_gpt2() if family == "gpt2" else \
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(FIXTURES / family))
        peft_model = add_lora(model, lora_cfg(), quiet=True)
        randomize_adapter(peft_model)
        return peft_model

    kept, cast = build(), build()
    saved = keep_frozen_matrices_in(cast, torch.bfloat16)
    dtypes = {n: p.dtype for n, p in cast.named_parameters()}
    frozen_matrices = [n for n in dtypes if n.endswith("base_layer.weight")]
    assert frozen_matrices and all(dtypes[n] == torch.bfloat16 for n in frozen_matrices)
    assert saved == sum(p.numel() * 2 for p in cast.parameters() if p.dtype == torch.bfloat16)
    assert all(dtypes[n] == torch.float32 for n in dtypes if "lora_" in n or "norm" in n or "ln_" in n
               or n.endswith("bias") or "wte" in n or "embed_tokens" in n)
    head = cast.get_base_model().get_output_embeddings().weight  # (GPT-2's is its embedding: fp32)
    assert head.dtype == (torch.float32 if family == "gpt2" else torch.bfloat16)
    vocab = cast.get_base_model().config.vocab_size
    batch = {"input_ids": torch.arange(16).reshape(2, 8) % vocab, "attention_mask": torch.ones(2, 8, dtype=torch.long),
             "target_positions": torch.tensor([0, 1, 2, 8, 9, 10]), "targets": torch.tensor([1, 2, 3, 9, 10, 11])}
    results = []
    for peft_model in (kept, cast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = CausalLMLoss(peft_model.get_base_model())(batch)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in peft_model.parameters() if p.requires_grad]))
    (loss_kept, grads_kept), (loss_cast, grads_cast) = results
    assert torch.equal(loss_kept, loss_cast) and len(grads_kept) == len(grads_cast)
    assert all(torch.equal(a, b) for a, b in zip(grads_kept, grads_cast))


def test_loraplus_gives_the_b_matrices_their_own_learning_rate():
    from sftune.update import param_groups
    from sftune.lora import add_lora

    peft_model = add_lora(make_tiny_gpt2(), lora_cfg(loraplus_lr_ratio=16))
    groups = param_groups(peft_model, 0.1, 1e-3, 16)
    names = {id(p): n for n, p in peft_model.named_parameters()}
    assert [g.get("lr") for g in groups] == [None, None, 1.6e-2]
    assert groups[2]["weight_decay"] == 0.1 and all(".lora_B." in names[id(p)] for p in groups[2]["params"])
    assert groups[0]["params"] and all(".lora_A." in names[id(p)] for p in groups[0]["params"])
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in peft_model.parameters())
    assert len(param_groups(peft_model, 0.1, 1e-3)) == 2  # without LoRA+: one learning rate


def mistake(capsys, tiny_model_dir, out, *flags):
    code, _, err = run_main(capsys, "train", "--model", str(tiny_model_dir), "--dataset", str(QUICKSTART_DATA),
                            "--max-steps", "2", "--output-dir", str(out), *flags)
    assert code == 2 and "Traceback" not in err and err.count("error:") == 1, err
    assert not out.exists()  # nothing written
    return err


def test_lora_mistakes_are_clear_errors_that_write_nothing(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    err = mistake(capsys, tiny_model_dir, out, "--lora-r", "4", "--lora-targets", "q_proj", "v_proj")
    assert "q_proj" in err and "not found" in err and "c_attn, c_fc, c_proj" in err and "all-linear" in err
    err = mistake(capsys, tiny_model_dir, out, "--lora-r", "4", "--lora-targets", "ln_f")  # a layer peft cannot adapt
    assert "LayerNorm" in err and "is not supported" in err and "c_attn" in err
    err = mistake(capsys, tiny_model_dir, out, "--merge")
    assert "LoRA is off (set --lora-r)" in err
    err = mistake(capsys, tiny_model_dir, out, "--lora-r", str(10**9))  # (its A matrices: terabytes, never made)
    assert "lora_r 1,000,000,000 is larger than any adapted layer can use" in err and "lower --lora-r" in err
    for flags, key in [(("--lora-r", "0"), "lora_r"), (("--lora-r", "4", "--lora-dropout", "1"), "lora_dropout"),
                       (("--lora-r", "4", "--lora-alpha", "-1"), "lora_alpha"),
                       (("--loraplus-lr-ratio", "16",), "loraplus_lr_ratio")]:
        assert f"--{key.replace('_', '-')}" in mistake(capsys, tiny_model_dir, out, *flags)
    for flags in (("--lora-targets", "c_attn"), ("--lora-alpha", "16"), ("--lora-dropout", "0.1"),
                  ("--lora-modules-to-save", "lm_head")):  # (without --lora-r: a full fine-tune, unnoticed)
        key = flags[0][2:].replace("-", "_")
        assert f"{key} = " in (err := mistake(capsys, tiny_model_dir, out, *flags)) and "LoRA is off (set --lora-r)" \
            in err and f"--{flags[0][2:]}" in err
    code, _, err = run_main(capsys, "export", str(tiny_model_dir), "--merge", str(out))
    assert code == 2 and "holds a full model" in err and "--save-dtype bf16 for a copy" in err and not out.exists()
    code, _, err = run_main(capsys, "export", str(tmp_path / "nowhere"), "--merge", str(out))
    assert code == 2 and "not a directory" in err


# --- slow: training through the CLI, checkpoints, resume ------------------------------


def train_args(model_dir, out, *extra):
    return ["train", "--model", str(model_dir), "--dataset", str(QUICKSTART_DATA), "--lora-r", "8",
            "--lora-dropout", "0.1", "--batch-size", "8", "--grad-accum", "2", "--max-steps", "16", "--lr", "3e-3",
            "--weight-decay", "0.1", "--lr-schedule", "cosine", "--precision", "fp32", "--log-every", "1",
            "--eval-every", "8", "--save-every", "4", "--no-run-report", "--output-dir", str(out), *extra]


def adapter_of(run_dir):
    return load_file(run_dir / "adapter_model.safetensors")


def same_adapter(a_dir, b_dir) -> bool:
    a, b = adapter_of(a_dir), adapter_of(b_dir)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def lora_run(small_model_dir, tmp_path_factory):
    """16 LoRA steps (dropout on, weight decay on, checkpoints every 4), merged."""
    out = tmp_path_factory.mktemp("lora") / "run"
    code, stdout, err = run_captured(*train_args(small_model_dir, out, "--merge", "--sample-prompts", "the film is"))
    assert code == 0, err
    return out, stdout + err


@pytest.mark.slow
def test_a_lora_run_trains_only_the_adapter_and_writes_what_peft_loads(lora_run, small_model_dir, tmp_path, capsys):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    out, log = lora_run
    assert "LoRA: r 8, alpha 16, dropout 0.1 on c_attn, c_fc, c_proj: trains 16,384 of 157,440 parameters" in log
    assert "sample: 'the film is' ->" in log
    rows = read_jsonl(out / "metrics.jsonl")
    evals = [r["val_loss"] for r in rows if r["type"] == "eval"]
    assert evals[-1] < evals[0] - 0.05  # it learned

    # outputs: the adapter and tokenizer, no copy of the base; each checkpoint the same plus the training state
    assert not (out / "model.safetensors").exists()
    adapter = adapter_of(out)
    assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(small_model_dir)
    ckpt = out / "checkpoints" / "step-16"
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "config.yaml", "state.json", "tokenizer.json",
                                                      "tokenizer_config.json", "training_state.pt"]
    assert_ordinary_modes(out, out / "merged", ckpt)
    optimizer = torch.load(ckpt / "training_state.pt", weights_only=True)["optimizer"]
    assert len(optimizer["state"]) == len(adapter)  # the optimizer holds the adapter's tensors, nothing of the base

    # the base is untouched: every tensor the adapter does not change is bitwise the base's in the merged model,
    # and each adapted one is the base's plus the low-rank update
    base, merged = load_file(small_model_dir / "model.safetensors"), load_file(out / "merged" / "model.safetensors")
    adapted = {k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight") for k in adapter
               if "lora_A" in k}
    assert adapted and base.keys() == merged.keys()
    for key in base:
        if key in adapted:
            prefix = "base_model.model." + key.removesuffix(".weight")
            delta = (adapter[prefix + ".lora_B.weight"] @ adapter[prefix + ".lora_A.weight"]) * (16 / 8)
            torch.testing.assert_close(merged[key], base[key] + delta.T, rtol=0, atol=1e-6)  # Conv1D: (in, out)
            assert not torch.equal(merged[key], base[key])
        else:
            assert torch.equal(merged[key], base[key]), key

    # peft loads it both ways, and computes what the merged model does
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = logits(AutoModelForCausalLM.from_pretrained(out / "merged"), ids)
    by_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(small_model_dir), out)
    torch.testing.assert_close(logits(by_peft, ids), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(AutoPeftModelForCausalLM.from_pretrained(out), ids), expected, rtol=0, atol=1e-5)

    # eval and generate take the run directory as it is; export writes what --merge wrote
    code, stdout, err = run_main(capsys, "eval", "--model", str(out), "--dataset", str(QUICKSTART_DATA), "--json")
    assert code == 0, err
    assert json.loads(stdout)["val_loss"] == pytest.approx(evals[-1], abs=1e-6)  # fp32, as trained
    code, stdout, err = run_main(capsys, "generate", "--model", str(out), "--prompt", "the film is",
                                 "--temperature", "0", "--max-new-tokens", "4")
    assert code == 0 and stdout.startswith("[0] the film is"), err
    code, stdout, err = run_main(capsys, "export", str(out), "--output-dir", str(tmp_path / "exported"))
    assert code == 0, err
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    assert all(torch.equal(exported[k], merged[k]) for k in merged)
    assert (tmp_path / "exported" / "tokenizer.json").is_file()
    code, _, err = run_main(capsys, "export", str(out), "--output-dir", str(small_model_dir), "--overwrite")
    assert code == 2 and "is the adapter's base model directory" in err  # (written over the base it is made from)
    code, stdout, err = run_main(capsys, "export", str(out), "--output-dir", str(tmp_path / "bf16"), "--save-dtype",
                                 "bf16")
    assert code == 0, err
    exported = load_file(tmp_path / "bf16" / "model.safetensors")
    assert all(torch.equal(exported[k], merged[k].to(torch.bfloat16)) for k in merged)
    code, _, err = run_main(capsys, "export", str(out), "--merge", str(tmp_path / "exported"))  # again: refused
    assert code == 2 and "choose another --merge or pass --overwrite" in err and "--resume" not in err
    # a merged model is evaluated as its adapter is: in the run's precision (its config.yaml beside it), the same loss
    for model in (out / "merged", tmp_path / "exported"):
        code, stdout, err = run_main(capsys, "eval", "--model", str(model), "--dataset", str(QUICKSTART_DATA), "--json")
        assert code == 0 and json.loads(stdout)["precision"] == "fp32", err
        assert json.loads(stdout)["val_loss"] == pytest.approx(evals[-1], abs=1e-5)


@pytest.mark.slow
def test_a_bf16_run_keeps_its_frozen_base_in_bf16_and_trains_what_the_fp32_base_trains(small_model_dir, tmp_path,
                                                                                      capsys):
    """`--precision bf16` LoRA: the frozen base's matrices kept in bf16 by default (said), against
    `--lora-base-dtype fp32`: every loss and evaluation, the adapter and the merged model (merged into the fp32
    base read from disk), bitwise; `sftune eval` of each run (the base read in fp32, the run's bf16 products, its
    validation batches of the run's batch_size rows) gives its last evaluation's val loss, to the bit."""
    runs = {}
    for dtype in ("auto", "fp32"):
        out = tmp_path / dtype
        code, _, err = run_main(capsys, *train_args(small_model_dir, out, "--max-steps", "6", "--eval-every", "3",
                                                    "--precision", "bf16", "--lora-base-dtype", dtype, "--merge",
                                                    "--sample-prompts", ""))
        assert code == 0, err
        runs[dtype] = out
        assert ("LoRA: the frozen base's matrices kept in bf16" in err) is (dtype == "auto")
    assert_same_losses(runs["auto"], runs["fp32"])
    assert same_adapter(runs["auto"], runs["fp32"])
    merged = [load_file(runs[d] / "merged" / "model.safetensors") for d in runs]
    assert all(torch.equal(merged[0][k], merged[1][k]) for k in merged[1])
    evaluated = []
    for out in runs.values():
        code, printed, err = run_main(capsys, "eval", "--model", str(out), "--json")
        assert code == 0, err
        evaluated.append(json.loads(printed)["val_loss"])
    last = [r["val_loss"] for r in read_jsonl(runs["auto"] / "metrics.jsonl") if r["type"] == "eval"][-1]
    assert evaluated[0] == evaluated[1] == last


@pytest.mark.slow
def test_the_shipped_lora_config_trains_and_merges(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """configs/chat-lora.yaml (its model is the quick start's output; here the tiny model stands in), 4 steps."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "chat-lora"
    code, _, err = run_main(capsys, "train", "--config", "configs/chat-lora.yaml", "--model", str(tiny_model_dir),
                            "--max-steps", "4", "--output-dir", str(out))
    assert code == 0, err
    assert "(tied to the input embedding: one matrix)" in err and "output projection fused" in err
    assert (out / "adapter_model.safetensors").is_file() and (out / "merged" / "model.safetensors").is_file()
    assert "transformer.wte.weight" in load_file(out / "merged" / "model.safetensors")


@pytest.mark.slow
def test_sigterm_and_kill_9_then_resume_equal_an_uninterrupted_lora_run(lora_run, small_model_dir, tmp_path,
                                                                        capsys):
    """The adapter, its optimizer state, the data position and the RNG (the LoRA dropout draws from it) all come
    back: after a SIGTERM, and after a kill -9 past a checkpoint, the adapter ends bitwise the uninterrupted one's."""
    uninterrupted, _ = lora_run
    out = tmp_path / "run"
    code, err = signal_at(train_args(small_model_dir, out), "step      5/")
    assert code == 143, err
    assert "stopped by SIGTERM" in err

    code, _ = signal_at(train_args(small_model_dir, out, "--resume", "auto"), "step     10/",  # past step 8's checkpoint
                        signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not (out / "adapter_model.safetensors").exists()

    code, _, err = run_main(capsys, *train_args(small_model_dir, out, "--resume", "auto"))
    assert code == 0, err
    assert f"resumed from {out / 'checkpoints' / 'step-8'}" in err
    assert same_adapter(uninterrupted, out)
    assert_same_losses(out, uninterrupted)
    # resuming as a full fine-tune is refused, even forced: the checkpoint holds an adapter, not a model
    code, _, err = run_main(capsys, *train_args(small_model_dir, out, "--resume", "auto", "--lora-r", "null",
                                                "--lora-dropout", "0", "--resume-force"))  # (LoRA's options off too)
    assert code == 2 and "lora_r 8 -> None changes the shapes of the trained tensors" in err, err


@pytest.mark.slow
def test_a_lora_resume_on_changed_base_weights_is_refused(small_model_dir, tmp_path, capsys):
    """The adapter is only meaningful on the weights it was trained on: a base rewritten since the checkpoint is
    named as the reason, and --resume-force overrides."""
    import shutil

    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    shutil.copytree(small_model_dir, base)
    out = tmp_path / "run"
    code, _, err = run_main(capsys, *train_args(base, out, "--max-steps", "4", "--report-to", "none"))
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(1.01)
    model.save_pretrained(base)  # (the same shapes: only the values changed)
    code, _, err = run_main(capsys, *train_args(base, out, "--max-steps", "4", "--report-to", "none", "--resume", "auto"))
    assert code == 2 and "the base model's weights (--model) changed" in err and "--resume-force" in err
    code, _, err = run_main(capsys, *train_args(base, out, "--max-steps", "4", "--report-to", "none", "--resume", "auto",
                                                "--resume-force"))
    assert code == 0 and "resuming although the base model's weights (--model) changed" in err, err


def test_a_resume_that_changes_the_adapters_shapes_is_refused_even_forced(small_model_dir, tmp_path, capsys):
    """--lora-r (and the other keys that set a checkpoint's tensors' shapes) cannot change on a resume, even with
    --resume-force: before, the forced resume failed while loading, blaming the base ("trained on another base"),
    having rewritten the run's config.yaml to the new settings. A forced resume that fails while loading (onto a
    narrower base) leaves config.yaml as it was."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM
    out = tmp_path / "run"
    args = train_args(small_model_dir, out, "--max-steps", "4", "--report-to", "none")
    code, _, err = run_main(capsys, *args)
    assert code == 0, err
    written = (out / "config.yaml").read_text()
    code, _, err = run_main(capsys, *args, "--lora-r", "4", "--resume", "auto", "--resume-force")
    assert code == 2 and "lora_r 8 -> 4 changes the shapes of the trained tensors" in err, err
    assert "restore --lora-r 8 as the checkpoint has them" in err
    other = tmp_path / "narrower"  # the same tokenizer, a base 32 wide: the adapter's matrices do not fit it
    shutil.copytree(small_model_dir, other)
    config = AutoConfig.from_pretrained(small_model_dir)
    config.n_embd = 32
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    code, _, err = run_main(capsys, *train_args(other, out, "--max-steps", "4", "--report-to", "none", "--resume",
                                                "auto", "--resume-force"))
    assert code == 2 and "does not fit this base model" in err, err
    assert (out / "config.yaml").read_text() == written


@pytest.mark.slow
def test_a_full_fine_tune_starts_from_a_lora_runs_merged_model(lora_run, tmp_path, capsys):
    """`--model` a LoRA run's directory without --lora-r: every weight of its merged model trains (peft had frozen
    them: the first backward failed, "does not require grad"); it starts where the LoRA run ended."""
    out, _ = lora_run
    code, _, err = run_main(capsys, "train", "--model", str(out), "--dataset", str(QUICKSTART_DATA), "--max-steps", "2",
                            "--batch-size", "8", "--precision", "fp32", "--no-run-report", "--sample-prompts", "",
                            "--output-dir", str(tmp_path / "full"))
    assert code == 0, err
    merged, trained = load_file(out / "merged" / "model.safetensors"), load_file(tmp_path / "full" / "model.safetensors")
    assert merged.keys() == trained.keys()
    assert all(not torch.equal(trained[k], merged[k]) for k in merged if k.endswith("c_attn.weight"))  # all trained
    lora_evals, full_evals = ([r["val_loss"] for r in read_jsonl(d / "metrics.jsonl") if r["type"] == "eval"]
                              for d in (out, tmp_path / "full"))
    assert full_evals[0] == pytest.approx(lora_evals[-1], abs=1e-5)
