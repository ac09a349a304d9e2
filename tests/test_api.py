"""Tier 2 through the Python API: the training loop's accumulation path end to end."""

import torch
from safetensors.torch import load_file

import sftune
from conftest import QUICKSTART_DATA, needs_shared


@needs_shared
def test_batch_16_equals_batch_4_times_accum_4(tiny_model_dir, tmp_path):
    outs = []
    for batch_size, accum in ((16, 1), (4, 4)):
        cfg = sftune.resolve_config({
            "model": str(tiny_model_dir), "dataset": str(QUICKSTART_DATA), "batch_size": batch_size,
            "grad_accum": accum, "max_steps": 3, "lr": 1e-3, "precision": "fp32", "log_every": 1,
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
