"""Tier 2 through the Python API: the training loop's accumulation path end to end."""

import pytest
import torch
from safetensors.torch import load_file

import sftune
from conftest import QUICKSTART_DATA


@pytest.mark.slow
def test_batch_16_equals_batch_4_times_accum_4(small_model_dir, tmp_path):
    outs = []
    for batch_size, accum in ((16, 1), (4, 4)):
        cfg = sftune.resolve_config({
            "model": str(small_model_dir), "dataset": str(QUICKSTART_DATA), "batch_size": batch_size,
            "grad_accum": accum, "max_steps": 3, "lr": 1e-3, "precision": "fp32", "log_every": 1, "run_report": False,
            "output_dir": str(tmp_path / f"b{batch_size}"),
        })
        result = sftune.train(cfg)
        assert result.steps == 3
        outs.append((result, load_file(result.output_dir / "model.safetensors")))
    (r1, w1), (r2, w2) = outs
    assert r1.tokens == r2.tokens  # the same rows in each optimizer step
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)
    assert r1.last_val_loss == r2.last_val_loss or abs(r1.last_val_loss - r2.last_val_loss) < 1e-4


@pytest.mark.slow
def test_training_at_the_default_precision(tiny_model_dir, tmp_path):
    """precision auto: bf16 autocast on a CPU with native bf16 (fp32 master weights), else fp32; the loss falls,
    every logged value is finite, and the saved weights are fp32."""
    from sftune.runtime import cpu_has_bf16

    cfg = sftune.resolve_config({"model": str(tiny_model_dir), "dataset": str(QUICKSTART_DATA), "batch_size": 16,
                                 "max_steps": 12, "lr": 3e-3, "log_every": 1, "output_dir": str(tmp_path / "run")})
    assert cfg.precision == "auto"
    result = sftune.train(cfg)
    saved = sftune.load_config(result.output_dir / "config.yaml")
    assert saved.precision == ("bf16" if cpu_has_bf16() else "fp32")
    assert result.last_val_loss < result.first_val_loss - 1.0
    weights = load_file(result.output_dir / "model.safetensors")
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("card, capability, native", [
    ("V100", (7, 0), False), ("T4", (7, 5), False), ("A100", (8, 0), True), ("RTX 3090", (8, 6), True),
    ("H100", (9, 0), True), ("B200", (10, 0), True)])
def test_auto_precision_on_a_gpu_takes_bf16_only_where_its_tensor_cores_compute_it(card, capability, native):
    """`--precision auto` on a GPU: bf16 where the card computes it natively, fp16 on a T4 or V100, where
    `torch.cuda.is_bf16_supported()` says yes (it counts emulation) but bf16 products run without tensor cores,
    several times slower than fp16 (explicit --precision bf16 there is warned about)."""
    from sftune.runtime import bf16_native_capability

    assert bf16_native_capability(capability) is native, card


def test_transformers_bars_stay_out_of_an_api_run_and_the_programs_setting_stays(small_model_dir, tmp_path, capfd):
    """The command line turns transformers' "Loading weights" / "Writing model shards" bars off for the process; a
    program that calls sftune gets them off during the call and its own setting back after."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.enable_progress_bar()
    cfg = sftune.resolve_config({"model": str(small_model_dir), "dataset": str(QUICKSTART_DATA), "max_steps": 1,
                                 "precision": "fp32", "sample_prompts": [], "run_report": False,
                                 "output_dir": str(tmp_path / "run")})
    result = sftune.train(cfg)
    sftune.save_model(sftune.load_model(str(result.output_dir)), sftune.load_tokenizer(str(result.output_dir)),
                      tmp_path / "copy")
    err = capfd.readouterr().err
    assert "training: 1 optimizer steps" in err and "Writing model shards" not in err and "Loading weights" not in err
    assert transformers_logging.is_progress_bar_enabled()
