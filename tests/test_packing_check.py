"""`--packing` refused for a model that does not keep packed examples apart (`packing_check.py`), found by running
the model itself: two examples packed in one row against the second alone."""

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, JambaConfig, LlamaConfig, MambaConfig, OPTConfig, \
    StableLmConfig

from conftest import QUICKSTART_DATA, run_main
from sftune.packing_check import LEAK_TOLERANCE, packing_leak

SMALL = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
CONFIGS = {  # (tiny configs of architectures that mix packed examples, and of two that do not)
    "opt": lambda: OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=128, dropout=0.0),
    "bloom": lambda: BloomConfig(vocab_size=512, hidden_size=64, n_layer=2, n_head=4),
    "mamba": lambda: MambaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, state_size=8),
    "jamba": lambda: JambaConfig(**SMALL, intermediate_size=128, num_key_value_heads=2, num_experts=2,
                                 attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                                 mamba_d_state=8, use_mamba_kernels=False),
    "llama": lambda: LlamaConfig(**SMALL, intermediate_size=128, num_key_value_heads=2),
    "stablelm": lambda: StableLmConfig(**SMALL, intermediate_size=128, num_key_value_heads=2),
}


@pytest.mark.parametrize("name, mixes", [("opt", True), ("bloom", True), ("mamba", True), ("jamba", True),
                                         ("llama", False)])
def test_the_probe_finds_the_models_that_mix_packed_examples(name, mixes):
    """OPT and BLOOM (masks and positions from the attention mask), Mamba (a state along the row) and Jamba (Mamba
    layers between attention) compute a packed example otherwise than alone, by far more than fp32's rounding;
    Llama, whose mask transformers builds from the restarting positions, to the rounding."""
    torch.manual_seed(0)
    leak = packing_leak(AutoModelForCausalLM.from_config(CONFIGS[name]()))
    assert (leak > 10 * LEAK_TOLERANCE) if mixes else (leak < LEAK_TOLERANCE / 100), leak


def test_packing_a_model_that_mixes_examples_is_refused_and_sftunes_attention_can_keep_them_apart(
        capsys, tmp_path, small_model_dir):
    """Through the CLI: OPT with --packing exits 2 before anything is written, naming the fix; under
    --attention flex (sftune's attention keeps each example apart itself, OPT's positions follow the position
    ids) the probe finds nothing to refuse and the run trains."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(CONFIGS["opt"]()).save_pretrained(tmp_path / "opt")
    common = ["train", "--no-run-report", "--model", str(tmp_path / "opt"), "--tokenizer", str(small_model_dir),
              "--dataset", str(QUICKSTART_DATA), "--packing", "--max-length", "64", "--max-steps", "2",
              "--eval-every", "null", "--report-to", "none", "--sample-prompts", ""]
    code, _, err = run_main(capsys, *common, "--output-dir", str(tmp_path / "refused"))
    assert code == 2 and "Traceback" not in err and not (tmp_path / "refused").exists(), err
    assert "--packing: OPTForCausalLM does not keep packed examples apart" in err
    assert "Train without --packing" in err and "--attention flex" in err
    code, _, err = run_main(capsys, *common, "--attention", "flex", "--output-dir", str(tmp_path / "flex"))
    assert code == 0, err


def test_a_model_that_keeps_sftunes_attention_keywords_to_itself_takes_transformers_mask_under_auto(
        capsys, tmp_path, small_model_dir, monkeypatch):
    """StableLM's layers do not pass the packed rows' bounds on to the attention function: under sftune's flex its
    attention sees one causal row (its packed examples mix), under transformers' SDPA the mask from the position ids
    keeps them apart. `--attention flex` is refused naming `--attention sdpa`; under `auto` (which takes flex for
    packed rows of a long enough run on a GPU: here its choice is made flex, as there) the model goes on with SDPA,
    said, and the saved config says so."""
    from sftune.attention import FLEX_NAME, register_flex
    from sftune.dist import Dist
    from sftune.packing_check import check_packing

    register_flex()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS["stablelm"]())
    assert packing_leak(model) < LEAK_TOLERANCE / 100  # (transformers' own attention)
    model.set_attn_implementation(FLEX_NAME)
    assert packing_leak(model) > 10 * LEAK_TOLERANCE
    assert check_packing(model, Dist(), sharded=False, auto=True) == "sdpa"
    assert model.config._attn_implementation == "sdpa" and packing_leak(model) < LEAK_TOLERANCE / 100

    model.save_pretrained(tmp_path / "stablelm")
    code, _, err = run_main(capsys, "train", "--no-run-report", "--model", str(tmp_path / "stablelm"), "--tokenizer",
                            str(small_model_dir), "--dataset", str(QUICKSTART_DATA), "--packing", "--max-length", "64",
                            "--attention", "flex", "--output-dir", str(tmp_path / "refused"))
    assert code == 2 and not (tmp_path / "refused").exists(), err
    assert "--attention flex: StableLmForCausalLM's layers do not pass the packed rows' example bounds on" in err
    assert "use --attention sdpa" in err

    import sftune.build

    monkeypatch.setattr(sftune.build, "resolve_attention", lambda *a, **k: ("flex", "attention: flex (as auto on a GPU)"))
    code, _, err = run_main(capsys, "train", "--no-run-report", "--model", str(tmp_path / "stablelm"), "--tokenizer",
                            str(small_model_dir), "--dataset", str(QUICKSTART_DATA), "--packing", "--max-length", "64",
                            "--max-steps", "2", "--sample-prompts", "", "--output-dir", str(tmp_path / "auto"))
    assert code == 0, err
    assert "attention: sdpa under a mask from the position ids for the packed rows, not flex" in err
    assert "attention: sdpa" in (tmp_path / "auto" / "config.yaml").read_text()
