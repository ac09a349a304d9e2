"""Tier 2: any causal-LM family goes through the same path: tiny Llama-, Qwen2-, Mistral- and Mixtral-shaped models
(random init from the `config.json` files in tests/fixtures, GPT-2's tokenizer) train with the fused loss,
evaluate, generate, checkpoint and resume exactly; the fused loss equals the plain one for each, and for every
model type it is used for, the loss on that type's own logits (scaled and soft-capped ones included). A mixture
of experts' load-balancing loss equals its class's own, with padding left out."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, QUICKSTART_DATA, read_jsonl, run_main
from sftune.loss import LOGIT_MAPS

FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-mixtral"]  # (the Mixtral with its router loss)


def family_model(name: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(FIXTURES / name), dtype=torch.float32)


@pytest.mark.parametrize("name", FAMILIES)
def test_the_fused_loss_equals_the_plain_one(name):
    import numpy as np

    from sftune.batching import collate
    from sftune.data import Examples
    from sftune.loss import CausalLMLoss, supports_fused_ce

    model = family_model(name)
    assert supports_fused_ce(model)
    rng = np.random.default_rng(0)
    ex = Examples.from_lists([rng.integers(0, 50_000, n).tolist() for n in (5, 17, 30)])
    batch = collate(ex, [0, 1, 2], 50256)
    grads = []
    for fused in (False, True):
        model.zero_grad()
        loss = CausalLMLoss(model, fused)(batch)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-6, atol=1e-4)
    for a, b in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# tiny shapes every model type below accepts, and its logit maps made to matter (a cap of 0.5 bends tiny logits)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=256, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            logit_scale=0.25, logits_scaling=8.0, final_logit_softcapping=0.5, lm_head_multiplier=2.5)


SHAPES = {  # a tiny config's own sizes, where a type's defaults do not fit TINY's
    "deepseek_v3": dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=16, v_head_dim=16, qk_nope_head_dim=8,
                        num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                        n_group=1, topk_group=1),  # (multi-head latent attention: as many key/value heads as heads)
    "falcon_h1": dict(mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1),
    "falcon": dict(head_dim=None, num_kv_heads=2),  # (None: a key the type computes itself)
}


@pytest.mark.parametrize("model_type", sorted(LOGIT_MAPS))
def test_each_fused_model_type_computes_its_own_logits_loss(model_type):
    """The fused loss is used for a model type only where its map from hidden states to logits is known
    (`loss.LOGIT_MAPS`: plain, scaled as Cohere's and Granite's, soft-capped as Gemma 2's and 3's): for each, on a
    tiny random model of that type, the fused loss and its gradients equal cross-entropy on the model's own logits
    (fp32). A type whose head changed in transformers, or one listed by mistake, fails here."""
    import torch.nn.functional as F
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftune.batching import collate
    from sftune.data import Examples
    from sftune.loss import CausalLMLoss

    config = (AutoConfig.for_model("gpt2", n_embd=64, n_layer=1, n_head=4, vocab_size=256) if model_type == "gpt2"
              else AutoConfig.for_model(model_type, **{k: v for k, v in {**TINY, **SHAPES.get(model_type, {})}.items()
                                                       if v is not None}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()  # (eval: no dropout)
    loss_model = CausalLMLoss(model)
    assert loss_model.fused
    ex = Examples.from_lists([torch.randint(3, 256, (n,)).tolist() for n in (5, 17, 30)])
    batch = collate(ex, [0, 1, 2], 2)
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits
    want = F.cross_entropy(logits.flatten(0, 1)[batch["target_positions"]], batch["targets"], reduction="sum")
    want_grads = torch.autograd.grad(want, list(model.parameters()), allow_unused=True)
    got = loss_model(batch)
    got_grads = torch.autograd.grad(got, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-4)
    for (name, _), a, b in zip(model.named_parameters(), got_grads, want_grads):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "gpt_oss", "minimax",
                                        "qwen3_next"])
def test_the_router_load_balancing_loss_is_hugging_faces_with_padding_left_out(model_type):
    """A mixture-of-experts config with `output_router_logits`: the step's gradient is that of Hugging Face's own
    loss (token mean + coefficient x the load-balancing loss over the real tokens: its `attention_mask`), while the
    value returned is the token loss alone, bitwise what the routers-off model returns (the router loss is counted
    apart). The batch is padded, and the padding would change the routers' statistics."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftune.batching import collate
    from sftune.data import Examples
    from sftune.loss import CausalLMLoss

    experts = dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32) \
        if model_type in ("qwen2_moe", "qwen3_moe", "olmoe", "qwen3_next") else dict(num_local_experts=4)
    config = AutoConfig.for_model(model_type, **TINY, num_experts_per_tok=2, output_router_logits=True,
                                  router_aux_loss_coef=0.5, **experts)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()
    loss_model = CausalLMLoss(model)
    assert loss_model.router is not None and loss_model.router.coefficient == 0.5
    ex = Examples.from_lists([torch.randint(3, 256, (n,)).tolist() for n in (5, 17, 30)])
    batch = collate(ex, [0, 1, 2], 2)
    targets = int((batch["targets"] != -100).sum())
    got = loss_model(batch)
    got_grads = torch.autograd.grad(got / targets, list(model.parameters()), allow_unused=True)
    balance = loss_model.take_router_loss() / targets

    if not model.base_model(input_ids=batch["input_ids"], output_router_logits=True, use_cache=False).router_logits:
        assert loss_model.router is None  # a release whose class records no router logits (Granite-MoE in
        return  # transformers 5.17, whose own loss then fails): said once, then the token loss alone
    hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
               use_cache=False)
    want_grads = torch.autograd.grad(hf.loss, list(model.parameters()), allow_unused=True)
    assert balance == pytest.approx(float(hf.aux_loss.detach()), rel=1e-6)
    unmasked = model(input_ids=batch["input_ids"], use_cache=False).aux_loss.detach()
    assert abs(float(unmasked) - balance) > 1e-4  # (the padding would have counted)
    for (name, _), a, b in zip(model.named_parameters(), got_grads, want_grads):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")

    model.config.output_router_logits = False
    plain = CausalLMLoss(model)
    assert plain.router is None and torch.equal(plain(batch), got.detach())
    loss_model.eval()  # the validation loss is the token loss, and the routers' logits are not even asked for
    assert torch.equal(loss_model(batch), plain.eval()(batch)) and loss_model.take_router_loss() == 0.0


def test_the_eos_row_of_a_model_sftune_saved_trains(tmp_path):
    """A saved model's config names its pad token, EOS where the tokenizer had none; a Llama-family class then
    builds its embedding with `padding_idx` EOS, which freezes EOS's row (zero gradient) though EOS is a real input
    (the end of each chat turn). `train_every_embedding_row` (what every run does on loading) lets it train, as
    it did in the run that saved the model: without it, a resumed run diverged from the uninterrupted one."""
    from sftune.batching import collate
    from sftune.data import Examples
    from sftune.loss import CausalLMLoss
    from sftune.modeling import load_model
    from sftune.vocab import train_every_embedding_row

    eos = 50256
    model = family_model("tiny-llama")
    model.config.pad_token_id = eos  # as `save_model` writes it
    model.save_pretrained(tmp_path)
    batch = collate(Examples.from_lists([[5, 6, eos, 7, 8, 9], [10, 11, 12]]), [0, 1], eos)  # EOS mid-row, and pad
    rows = []
    for release in (False, True):
        model = load_model(str(tmp_path)).train()
        if release:
            train_every_embedding_row(model)
        CausalLMLoss(model)(batch).backward()
        rows.append(model.get_input_embeddings().weight.grad[eos].abs().max().item())
    assert rows[0] == 0.0 and rows[1] > 0  # (transformers' trap, then the row trains)


def test_a_router_loss_that_cannot_be_computed_is_said_to_be_left_out():
    """A model class without Hugging Face's load-balancing function (here a Llama config given
    `output_router_logits`, as a remote-code MoE may be) trains on the token loss, and says so with the override
    that turns the routers' logits off; that override, applied as given, silences it. A config that does not
    ask gets no notice; one that can be computed gets a line naming it."""
    import shlex

    from transformers import AutoConfig, AutoModelForCausalLM

    from sftune.config_values import parse_overrides
    from sftune.modeling import override_config, router_loss_notice

    def notice(model_type, **settings):
        with torch.device("meta"):
            return router_loss_notice(AutoModelForCausalLM.from_config(
                AutoConfig.for_model(model_type, **{**TINY, "num_local_experts": 4, **settings})))

    assert notice("mixtral") is None and notice("llama") is None  # (off by default, as in transformers)
    assert notice("mixtral", output_router_logits=True).startswith(
        "router load-balancing loss: coefficient 0.001 x the mixtral routers' loss (4 experts, 2 a token)")
    said = notice("llama", output_router_logits=True, router_aux_loss_coef=0.02)
    assert "llama" in said and "output_router_logits, coefficient 0.02" in said and "token loss only" in said
    flag, value = shlex.split(said.split("computing the routers' logits: ")[1])
    assert flag == "--model-config-overrides"
    config = override_config(AutoConfig.for_model("llama", **TINY, output_router_logits=True), parse_overrides(value))
    with torch.device("meta"):
        assert router_loss_notice(AutoModelForCausalLM.from_config(config)) is None


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_a_family_trains_evaluates_generates_and_resumes_exactly(name, tmp_path, capsys):
    """Mixtral with its routers' load-balancing loss too (`output_router_logits`, coefficient 0.02), logged apart
    and continued exactly from a checkpoint in the middle of a log window. With a 512-token vocabulary (the BPE of `conftest.small_vocab_tokenizer`): the family's layers are what
    is tested here, and a 50,257-row head would be most of the compute."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import small_vocab_tokenizer

    tokenizer = small_vocab_tokenizer()
    config = AutoConfig.from_pretrained(FIXTURES / name)
    config.vocab_size, config.bos_token_id, config.eos_token_id = len(tokenizer), tokenizer.eos_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    model_dir = tmp_path / "base"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    argv = ["train", "--no-run-report", "--model", str(model_dir), "--dataset", str(QUICKSTART_DATA),
            "--batch-size", "16", "--max-steps", "6", "--save-every", "3", "--lr", "3e-3", "--precision", "fp32",
            "--log-every", "2"]
    full = tmp_path / "full"
    code, _, err = run_main(capsys, *argv, "--output-dir", str(full))
    assert code == 0, err
    assert "output projection fused with cross-entropy" in err
    router = [r.get("router_loss") for r in read_jsonl(full / "metrics.jsonl") if r["type"] == "train"]
    if getattr(config, "output_router_logits", False):  # logged apart, in every log line: near 2 (2 experts a
        assert "router load-balancing loss: coefficient 0.02 x the mixtral routers' loss (4 experts" in err  # token,
        assert "| router 2.0" in err and all(2.0 <= r < 2.1 for r in router), router  # balanced: 2)
        from tensorboard.util import tensor_util

        from test_tracking import events

        curve = [float(tensor_util.make_ndarray(e.tensor_proto)) for e in events(full).Tensors("train/router_loss")]
        assert curve == [pytest.approx(r, rel=1e-6) for r in router]  # TensorBoard's curve too
    else:
        assert "router" not in err and router == [None] * 3
    evals = [r for r in read_jsonl(full / "metrics.jsonl") if r["type"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5

    # resume from the step-3 checkpoint in another directory: the same steps 4-6, bitwise
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-3", resumed / "checkpoints" / "step-3")
    code, _, err = run_main(capsys, *argv, "--output-dir", str(resumed), "--resume", "auto")
    assert code == 0, err
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the log line of step 4 adds steps 3 (kept in the checkpoint) and 4: the same figures as the uninterrupted run's
    logged = [{k: v for k, v in r.items() if k in ("step", "loss", "token_accuracy", "router_loss")}
              for r in read_jsonl(full / "metrics.jsonl") if r["type"] == "train"]
    assert [r for r in logged if r["step"] > 3] == [
        {k: v for k, v in r.items() if k in ("step", "loss", "token_accuracy", "router_loss")}
        for r in read_jsonl(resumed / "metrics.jsonl") if r["type"] == "train"]

    code, out, err = run_main(capsys, "eval", "--model", str(full), "--dataset", str(QUICKSTART_DATA), "--json")
    assert code == 0, err
    assert abs(__import__("json").loads(out)["val_loss"] - evals[-1]["val_loss"]) < 1e-4
    code, out, err = run_main(capsys, "generate", "--model", str(full), "--prompt", "the film is",
                              "--max-new-tokens", "5", "--temperature", "0")
    assert code == 0 and out.startswith("[0] the film is"), err


@pytest.mark.parametrize("name", ["gpt2", "tiny-llama"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(name):
    """--gradient-checkpointing recomputes each block's activations in the backward: same numbers, less memory."""
    from conftest import make_tiny_gpt2
    from sftune.batching import collate
    from sftune.data import Examples
    from sftune.loss import CausalLMLoss
    from sftune.blocks import enable_activation_checkpointing

    results = []
    for checkpointing in (False, True):
        model = make_tiny_gpt2() if name == "gpt2" else family_model(name)
        if checkpointing:
            enable_activation_checkpointing(model)
            assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
        model.train()
        batch = collate(Examples.from_lists([list(range(100, 100 + n)) for n in (7, 19, 33)]), [0, 1, 2], 50256)
        loss = CausalLMLoss(model)(batch)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=0)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_attention_kernels_train_alike_and_a_missing_one_is_a_clear_error(small_model_dir, tmp_path, capsys):
    """--attention picks transformers' kernel: packed rows under eager attention (a mask built from the position
    restarts) train what sdpa trains; a kernel the architecture lacks is refused before the data is read."""
    import numpy as np

    losses = {}
    for attention in ("sdpa", "eager"):
        out = tmp_path / attention
        code, _, err = run_main(capsys, "train", "--no-run-report", "--model", str(small_model_dir), "--dataset", str(QUICKSTART_DATA),
                                "--max-steps", "3", "--packing", "--max-length", "128", "--batch-size", "2",
                                "--precision", "fp32", "--log-every", "1", "--report-to", "none", "--attention",
                                attention, "--output-dir", str(out))
        assert code == 0, err
        losses[attention] = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "train"]
    assert len(losses["eager"]) == 3
    np.testing.assert_allclose(losses["eager"], losses["sdpa"], rtol=1e-5)
    out = tmp_path / "flex"
    code, _, err = run_main(capsys, "train", "--no-run-report", "--model", str(small_model_dir), "--dataset", str(QUICKSTART_DATA),
                            "--attention", "flex_attention", "--output-dir", str(out))
    assert code == 2 and "--attention flex_attention: GPT2LMHeadModel does not support" in err
    assert "use --attention auto or sdpa" in err and "Traceback" not in err and not out.exists()
    code, _, err = run_main(capsys, "train", "--no-run-report", "--model", str(FIXTURES / "tiny-llama"), "--init", "random", "--tokenizer",
                            str(small_model_dir), "--dataset", str(QUICKSTART_DATA), "--attention", "flex_attention",
                            "--device", "cpu", "--output-dir", str(out))  # (Llama has it, but not for a CPU backward)
    assert code == 2 and "flex_attention trains only on a CUDA GPU" in err and not out.exists()
