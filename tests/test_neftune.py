"""NEFTune (--neftune-alpha): noise on the input embeddings in training only, each token's bounded by
alpha / sqrt(L x d) with L its own example's length (padded and packed rows alike), none on padding; a run with it
resumes bitwise (the noise comes from the checkpointed RNG)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICKSTART_DATA, make_tiny_gpt2, run_main


def batches():
    from sftune.batching import collate, collate_packed
    from sftune.data import Examples

    examples = Examples.from_lists([[5, 6, 7], [8, 9, 10, 11, 12], [13, 14], [15, 16, 17, 18]])
    padded = collate(examples, [0, 1], pad_id=0)
    packed = collate_packed(examples, [np.array([0, 2]), np.array([3])], pad_id=0)
    return {k: torch.as_tensor(v) for k, v in padded.items()}, {k: torch.as_tensor(v) for k, v in packed.items()}


def test_each_token_knows_its_own_examples_length():
    from sftune.neftune import example_lengths

    padded, packed = batches()
    assert example_lengths(padded).tolist() == [[3, 3, 3, 0, 0], [5, 5, 5, 5, 5]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]  # (the second row's last: padding)
    assert example_lengths(packed).tolist() == [[3, 3, 3, 2, 2], [4, 4, 4, 4, 0]]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_the_noise_is_bounded_by_each_examples_length_and_spares_padding(packed):
    from sftune.loss import CausalLMLoss
    from sftune.neftune import example_lengths

    torch.manual_seed(0)
    model = make_tiny_gpt2()
    batch = batches()[packed]
    embedding = model.get_input_embeddings()
    clean = embedding(batch["input_ids"]).detach()
    loss_model = CausalLMLoss(model)
    loss_model.add_noise(5.0)
    seen = []
    embedding.register_forward_hook(lambda module, inputs, output: seen.append(output.detach()))
    noiseless = CausalLMLoss(make_tiny_gpt2())
    noiseless.load_state_dict(loss_model.state_dict())

    loss_model.train()
    noisy_loss = loss_model(batch)
    noise = seen[-1] - clean
    lengths = example_lengths(batch)
    bound = 5.0 / torch.sqrt(lengths.clamp(min=1) * 64)
    real = lengths > 0
    assert (noise[~real] == 0).all()  # padding: none
    per_token = noise.abs().amax(-1)  # 64 draws a token: the largest comes close to the bound
    assert (per_token[real] <= bound[real] * (1 + 1e-5)).all() and (per_token[real] > 0.8 * bound[real]).all()
    assert loss_model.noise.lengths is None  # cleared after the forward
    assert noisy_loss != noiseless.train()(batch)

    loss_model.eval()  # evaluation and generation: none
    torch.testing.assert_close(loss_model(batch), noiseless.eval()(batch), rtol=0, atol=0)
    assert torch.equal(seen[-1], clean)


@pytest.mark.slow
def test_a_run_with_neftune_resumes_bitwise(small_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", str(small_model_dir), "--dataset", str(QUICKSTART_DATA), "--neftune-alpha", "5",
            "--max-steps", "4", "--batch-size", "8", "--lr", "3e-3", "--precision", "fp32", "--save-every", "2",
            "--keep-last", "2", "--no-run-report", "--report-to", "none", "--output-dir"]
    code, _, err = run_main(capsys, *args, str(out))
    assert code == 0 and "NEFTune: noise on the input embeddings in training, alpha 5" in err, err
    code, _, _ = run_main(capsys, *args, str(tmp_path / "plain"), "--neftune-alpha", "null")
    assert code == 0
    losses = [[json.loads(line).get("loss") for line in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (out, tmp_path / "plain")]
    assert losses[0] != losses[1]  # the noise changes training

    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoints" / "step-4")
    (copy / "model.safetensors").unlink()
    code, _, err = run_main(capsys, *args, str(copy), "--resume", "auto")
    assert code == 0 and "resumed from" in err, err
    a, b = load_file(out / "model.safetensors"), load_file(copy / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
