"""`--attention varlen`: packed rows through variable-length attention, with the sequence starts from the host.

torch's kernel (flash attention, CUDA) is checked against SDPA by `benchmarks/gpu_check.py` on a GPU. Here, on a
CPU, the rest is: the sequence starts the collate finds, the layouts and keywords through transformers' attention
interface (GPT-2, and Llama with grouped-query heads), the same loss and gradients as transformers' own
block-diagonal mask, static batches, and whole runs through the CLI equal to the default attention's.
`--attention flex` too: its block tables against the dense mask, tile by tile, and flex attention's own forward
under them; its loss and gradients against the block mask's (on a CPU the backward runs through SDPA).
"""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import QUICKSTART_DATA, read_jsonl, run_main
from sftune.attention import CU_MULTIPLE, NAME, PAD_BLOCK, register, sequence_starts
from sftune.batching import EAGER
from sftune.loss import CausalLMLoss
from test_compile import STATIC, batch_of, loss_and_grads, tiny


def test_sequence_starts_cut_padding_and_pad_static_batches():
    cu, longest = sequence_starts([[3, 2], [4]], width=300, rows=3, static=False)
    # row 0: 3, 2, then 295 of padding in blocks of PAD_BLOCK; row 1: 4, then 296; row 2 (empty): 300
    lengths = np.diff(cu).tolist()
    assert lengths == [3, 2, 128, 128, 39, 4, 128, 128, 40, 128, 128, 44]
    assert cu[-1] == 3 * 300 and cu.dtype == np.int32 and longest == PAD_BLOCK
    cu, longest = sequence_starts([[3, 2], [4]], width=300, rows=3, static=True)
    assert len(cu) % CU_MULTIPLE == 0 and np.diff(cu).tolist()[:12] == lengths and set(cu[13:]) == {900}
    assert longest == 128  # rounded up to MAX_MULTIPLE (the same grid for flash attention)
    assert sequence_starts([[70]], width=100, rows=1, static=True)[1] == 100  # never past the width


def test_packed_batches_carry_the_starts():
    batch = batch_of(EAGER, packed=True)  # rows of examples [5, 9, 13] and [7, 11]: 27 wide
    assert np.diff(batch["cu_seqlens"].numpy()).tolist() == [5, 9, 13, 7, 11, 9]  # (the second row's padding: 9)
    assert batch["max_seqlen"] == 13
    assert "cu_seqlens" not in batch_of(EAGER, packed=False)  # rows that are not packed need no starts


@pytest.mark.parametrize("padding", [EAGER, STATIC], ids=["eager", "static"])
@pytest.mark.parametrize("family", ["gpt2", "tiny-llama"])
@pytest.mark.parametrize("attention", ["varlen", "flex"])
def test_varlen_gives_the_loss_and_gradients_of_the_block_mask(family, padding, attention):
    """fp64: the same loss and every gradient as transformers' SDPA with its block-diagonal mask (the model's
    default), for GPT-2 and for Llama (grouped-query heads, rotary positions); the loss module takes its own
    attention's keys to the device and not the other's. Under flex on a CPU the backward runs through SDPA under
    the block tables' example ids (torch has no CPU backward for flex attention)."""
    from sftune.attention import FLEX_NAME, register_flex

    register() if attention == "varlen" else register_flex()
    loss_model = CausalLMLoss(tiny(family, torch.float64))
    batch = batch_of(padding, packed=True)
    want_loss, want = loss_and_grads(loss_model, batch)
    loss_model.model.set_attn_implementation(NAME if attention == "varlen" else FLEX_NAME)
    loss_model = CausalLMLoss(loss_model.model)
    assert loss_model.attention == attention
    assert ("cu_seqlens" in loss_model.device_keys) == (attention == "varlen") != ("kv_indices" in loss_model.device_keys)
    got_loss, got = loss_and_grads(loss_model, batch)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-12, atol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("attention", ["varlen", "flex"])
def test_varlen_refuses_attention_dropout_and_names_the_override(capsys, tmp_path, small_model_dir, attention):
    """GPT-2's own config drops attention weights (attn_pdrop 0.1): exit 2 naming the fix, nothing written; with
    the fix (--model-config-overrides attn_pdrop=0) it trains, and the saved config has the overridden value.
    The same for `--attention flex` (flex attention has no dropout either)."""
    config = json.loads((small_model_dir / "config.json").read_text())
    model = tmp_path / "gpt2-dropout"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**config, "attn_pdrop": 0.1}))
    common = ["train", "--no-run-report", "--model", str(model), "--init", "random", "--tokenizer", str(small_model_dir), "--dataset",
              str(QUICKSTART_DATA), "--packing", "--max-length", "64", "--attention", attention, "--max-steps", "1",
              "--eval-every", "null", "--report-to", "none"]
    code, _, err = run_main(capsys, *common, "--output-dir", str(tmp_path / "refused"))
    assert code == 2 and "Traceback" not in err and not (tmp_path / "refused").exists()
    assert f"--attention {attention}" in err and "attn_pdrop = 0.1" in err
    assert "--model-config-overrides attn_pdrop=0" in err and "--attention sdpa" in err
    code, _, err = run_main(capsys, *common, "--model-config-overrides", "attn_pdrop=0", "--output-dir",
                            str(tmp_path / "run"))
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["attn_pdrop"] == 0


def test_rows_that_are_not_packed_take_sdpa_with_dropout(capsys, tmp_path, small_model_dir):
    """Without --packing a model under varlen keeps its attention dropout (SDPA's causal kernel, no mask built):
    the same losses as the default attention, bitwise (the same kernel, the same random draws)."""
    config = json.loads((small_model_dir / "config.json").read_text())
    model = tmp_path / "gpt2-dropout"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**config, "attn_pdrop": 0.1}))
    losses = {}
    for attention in ("auto", "varlen"):
        code, _, err = run_main(capsys, "train", "--no-run-report", "--model", str(model), "--init", "random", "--tokenizer",
                                str(small_model_dir), "--dataset", str(QUICKSTART_DATA), "--attention", attention,
                                "--max-steps", "3", "--eval-every", "null", "--log-every", "1", "--report-to", "none",
                                "--output-dir", str(tmp_path / attention))
        assert code == 0, err
        losses[attention] = [r["loss"] for r in read_jsonl(tmp_path / attention / "metrics.jsonl") if r["type"] == "train"]
    assert len(losses["auto"]) == 3 and losses["varlen"] == losses["auto"]


@pytest.mark.parametrize("overrides, message", [
    ("attn_drop=0", "has no key 'attn_drop' (did you mean attn_pdrop"),
    ("attn_pdrop", "KEY=VALUE pairs"),
    ("attn_pdrop=[0]", "must be a number, true/false, null or text"),
])
def test_a_wrong_model_config_override_is_a_clear_error(capsys, tmp_path, small_model_dir, overrides, message):
    code, _, err = run_main(capsys, "train", "--no-run-report", "--model", str(small_model_dir), "--dataset", str(QUICKSTART_DATA),
                            "--model-config-overrides", overrides, "--output-dir", str(tmp_path / "run"))
    assert code == 2 and message in err and "Traceback" not in err
    assert "model-config-overrides" in err or "model_config_overrides" in err
    assert not (tmp_path / "run").exists()


def test_a_whole_number_for_a_field_of_floats_is_that_float():
    """`--model-config-overrides initializer_range=1` (YAML reads `1` as an int): transformers 5's configs check each
    field's type as it is set and refused the int for a float field; it is now the float. Text there is still
    refused, with the key and the fix named."""
    from transformers import GPT2Config

    from sftune.errors import SftuneError
    from sftune.modeling import override_config

    config = override_config(GPT2Config(), {"initializer_range": 1, "n_layer": 3, "scale_attn_weights": True})
    assert config.initializer_range == 1.0 and isinstance(config.initializer_range, float)
    assert config.n_layer == 3 and config.scale_attn_weights is True
    with pytest.raises(SftuneError, match="initializer_range='wide'.*model_config_overrides in YAML"):
        override_config(GPT2Config(), {"initializer_range": "wide"})


def test_packed_run_with_varlen_equals_the_default(capsys, tmp_path, small_model_dir):
    """A whole packed run (training, evaluations, sample prompts, the saved model) under --attention varlen has
    the losses of the default attention's; the saved model names no sftune attention and loads anywhere. So do
    --attention flex, and flex in a compiled step (--compile torch, the aot_eager backend: the block mask built
    inside the traced step)."""
    common = ["train", "--no-run-report", "--model", str(small_model_dir), "--dataset", str(QUICKSTART_DATA), "--packing",
              "--max-length", "64", "--batch-size", "4", "--max-steps", "4", "--eval-every", "4", "--log-every", "1",
              "--sample-prompts", "The movie", "--sample-max-new-tokens", "4", "--report-to", "none",
              "--precision", "fp32"]
    from sftune.attention import FLEX_NAME

    runs = {}
    compiled = ["--compile", "torch", "--compile-backend", "aot_eager"]
    for name, extra in (("auto", []), ("varlen", []), ("flex", []), ("flex-compiled", compiled)):
        out = tmp_path / name
        code, _, err = run_main(capsys, *common, "--attention", name.split("-")[0], *extra, "--output-dir", str(out))
        assert code == 0, err
        runs[name] = read_jsonl(out / "metrics.jsonl")
        said = {"auto": None, "varlen": "each packed example goes through SDPA on its own",
                "flex": "packed rows go through SDPA with the same mask made dense"}[name.split("-")[0]]
        assert (said in err) if said else "is for a CUDA GPU" not in err  # (on a CPU: the log says what runs)
    for name in ("varlen", "flex", "flex-compiled"):
        for kind, key in (("train", "loss"), ("eval", "val_loss")):
            got = [r[key] for r in runs[name] if r["type"] == kind]
            want = [r[key] for r in runs["auto"] if r["type"] == kind]
            assert len(got) == len(want) > 0
            np.testing.assert_allclose(got, want, rtol=1e-5)
        samples = [r for r in runs[name] if r["type"] == "sample"]
        assert samples and samples == [r for r in runs["auto"] if r["type"] == "sample"]
        saved = json.dumps(json.loads((tmp_path / name / "config.json").read_text()))
        assert NAME not in saved and FLEX_NAME not in saved
    AutoModelForCausalLM.from_pretrained(tmp_path / "flex")



def test_only_a_varlen_model_captures_a_graph_per_sequence_count():
    """The sequence starts are part of a CUDA graph's shape key only for a model that reads them: a packed batch
    with more examples is the same graph for the block mask, another one under --attention varlen. And a graph
    copies into its buffers only what its key names (on an H100 a packed run with the block mask copied the
    starts too and failed at its second batch: 2,304 starts into a buffer of 2,048)."""
    from sftune.data import Examples
    from sftune.batching import Padding, collate_packed, to_device
    from sftune.graphs import shape_key

    static = Padding(16, 2, 512, static=True)
    few = collate_packed(Examples.from_lists([[1] * 200, [2] * 200]), [np.array([0]), np.array([1])], 0, static)
    many = collate_packed(Examples.from_lists([[1]] * 400), [np.arange(200), np.arange(200, 400)], 0, static)
    assert few["input_ids"].shape == many["input_ids"].shape and few["cu_seqlens"].shape != many["cu_seqlens"].shape
    loss = CausalLMLoss(tiny("gpt2"))
    assert loss.attention is None and "cu_seqlens" not in loss.device_keys
    assert shape_key(few, loss.device_keys) == shape_key(many, loss.device_keys)
    copied = [{k: v.shape for k, v in to_device(b, "cpu", loss.device_keys).items() if torch.is_tensor(v)}
              for b in (few, many)]
    assert copied[0] == copied[1]
    loss.attention = "varlen"  # (as under --attention varlen)
    assert "cu_seqlens" in loss.device_keys
    assert shape_key(few, loss.device_keys) != shape_key(many, loss.device_keys)
    loss.attention = "flex"  # (--attention flex: block tables of fixed shapes, one graph per rows x width)
    assert "cu_seqlens" not in loss.device_keys and "kv_indices" in loss.device_keys
    assert shape_key(few, loss.device_keys) == shape_key(many, loss.device_keys)


# --- `--attention flex`: flex attention with a block mask made on the host ------------------------------------


@pytest.mark.parametrize("lengths, width", [([[100, 100], [300]], 300), ([[5, 9, 13], [7, 11]], 27),
                                            ([[130, 2, 250, 1], [512], [40] * 12, []], 512),
                                            ([[17] * 60, [1000]], 1024)])
def test_flex_block_tables_list_exactly_the_tiles_an_example_reaches(lengths, width):
    """The tiles `block_tables` lists are those where some token sees another of its own example up to itself
    (partial or full), and its full tiles those where every pair is one example's and causal: compared with the
    dense mask tile by tile (rows of padding and empty rows included). Then flex attention itself (its CPU forward,
    which follows the tables and the mask function) gives what SDPA gives under the dense mask."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

    from sftune.attention import FLEX_BLOCK, block_tables, document_causal

    rows = len(lengths)
    tables = {k: torch.from_numpy(v) for k, v in block_tables(lengths, width, rows).items()}
    doc = tables["doc_ids"]
    positions = torch.arange(width)
    dense = (positions[None, :, None] >= positions[None, None, :]) & (doc[:, :, None] == doc[:, None, :])
    tiles = -(-width // FLEX_BLOCK)
    padded = torch.zeros(rows, tiles * FLEX_BLOCK, tiles * FLEX_BLOCK, dtype=torch.int32)
    padded[:, :width, :width] = dense
    per_tile = padded.view(rows, tiles, FLEX_BLOCK, tiles, FLEX_BLOCK).sum((2, 4))
    sizes = torch.tensor([min(FLEX_BLOCK, width - t * FLEX_BLOCK) for t in range(tiles)])
    full = per_tile == sizes[:, None] * sizes[None, :]  # every pair of the tile allowed
    listed = torch.zeros(rows, tiles, tiles, dtype=torch.bool)
    listed_full = torch.zeros_like(listed)
    for r in range(rows):
        for q in range(tiles):
            listed[r, q, tables["kv_indices"][r, 0, q, : tables["kv_num_blocks"][r, 0, q]]] = True
            listed_full[r, q, tables["full_kv_indices"][r, 0, q, : tables["full_kv_num_blocks"][r, 0, q]]] = True
    assert not (listed & listed_full).any()
    assert torch.equal(listed | listed_full, per_tile > 0)
    assert torch.equal(listed_full, full & (torch.arange(tiles)[:, None] > torch.arange(tiles)[None, :]))

    assert all(t.is_contiguous() and t.dtype == torch.int32 for t in tables.values())
    mask = BlockMask.from_kv_blocks(tables["kv_num_blocks"], tables["kv_indices"], tables["full_kv_num_blocks"],
                                    tables["full_kv_indices"], BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=document_causal(doc), seq_lengths=(width, width))
    if width % FLEX_BLOCK == 0:  # flex's own tables from the mask function (it evaluates every pair): the same
        own = create_block_mask(document_causal(doc), rows, 1, width, width, device="cpu", BLOCK_SIZE=FLEX_BLOCK)
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                     "q_indices", "full_q_num_blocks", "full_q_indices"):
            assert torch.equal(getattr(mask, name), getattr(own, name)), name
    q, k, v = torch.randn(3, rows, 2, width, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = flex_attention(q, k, v, block_mask=mask)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor's CPU kernels need a C++ compiler")
def test_compiled_flex_attention_follows_the_block_tables():
    """flex attention compiled (inductor's CPU kernel: unlike the eager forward, it computes only the tiles the
    tables list, and reads them as laid out) under `block_tables`' mask: SDPA's output under the dense mask, for
    rows of ~20-token examples and a width off the tile size. (A transposed count table, as numpy first laid it
    out, gave outputs off by 3.)"""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from sftune.attention import FLEX_BLOCK, block_tables, document_causal

    compiled = torch.compile(flex_attention, dynamic=False)
    for lengths, width in (([[17] * 60, [1000], [300, 300]], 1024), ([[100, 100], [300]], 300)):
        rows = len(lengths)
        tables = {k: torch.from_numpy(v) for k, v in block_tables(lengths, width, rows).items()}
        doc = tables["doc_ids"]
        mask = BlockMask.from_kv_blocks(tables["kv_num_blocks"], tables["kv_indices"], tables["full_kv_num_blocks"],
                                        tables["full_kv_indices"], BLOCK_SIZE=FLEX_BLOCK,
                                        mask_mod=document_causal(doc), seq_lengths=(width, width))
        q, k, v = torch.randn(3, rows, 2, width, 16, generator=torch.Generator().manual_seed(0))
        positions = torch.arange(width)
        dense = (positions[None, :, None] >= positions[None, None, :]) & (doc[:, :, None] == doc[:, None, :])
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None])
        torch.testing.assert_close(compiled(q, k, v, block_mask=mask), want, rtol=1e-4, atol=1e-5)


def test_flex_attention_that_fails_to_compile_runs_uncompiled(monkeypatch, capsys):
    """A GPU whose compiler fails (no Triton, say): `--attention flex` says so once and goes on with flex attention
    uncompiled, which computes the same attention (here on a CPU forward, against SDPA under the dense mask)."""
    from torch.nn.attention.flex_attention import BlockMask

    from sftune import attention
    from sftune.attention import FLEX_BLOCK, block_tables, compiled_flex, document_causal

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(attention, "_FLEX", [broken])  # (as torch.compile(flex_attention) would be, failing)
    tables = {k: torch.from_numpy(v) for k, v in block_tables([[5, 9, 13], [7, 11]], 27, 2).items()}
    doc = tables["doc_ids"]
    mask = BlockMask.from_kv_blocks(tables["kv_num_blocks"], tables["kv_indices"], tables["full_kv_num_blocks"],
                                    tables["full_kv_indices"], BLOCK_SIZE=FLEX_BLOCK, mask_mod=document_causal(doc),
                                    seq_lengths=(27, 27))
    q, k, v = torch.randn(3, 2, 2, 27, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(27)
    dense = (positions[None, :, None] >= positions[None, None, :]) & (doc[:, :, None] == doc[:, None, :])
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None])
    for _ in range(2):
        torch.testing.assert_close(compiled_flex(q, k, v, block_mask=mask), want, rtol=1e-10, atol=1e-12)
    assert capsys.readouterr().err.count("compiling flex attention failed (RuntimeError: no compiler here)") == 1


def test_auto_takes_flex_for_long_packed_runs_on_a_gpu_that_can_compile_it(monkeypatch):
    """`--attention auto` picks flex attention where it pays (try 89 on an H100: a packed GPT-2 step 86 ms against
    105 under SDPA's block mask, ~8 s of compiling once): packed rows, a CUDA GPU, a run of at least FLEX_MIN_TOKENS
    packed slots, a model without attention dropout (GPT-2's 0.1 keeps SDPA, and the log names the override that
    would allow flex), and Triton to compile its kernels. (The decision alone: this CPU cannot train on CUDA, so
    `has_triton` is set as a GPU machine's would be.)"""
    from dataclasses import replace

    import torch.utils._triton
    from transformers import AutoConfig

    from conftest import FIXTURES
    from sftune.step_mode import FLEX_MIN_TOKENS, resolve_attention
    from sftune.config import SFTConfig
    from sftune.dist import Dist

    gpu, cpu = Dist(device=torch.device("cuda")), Dist(device=torch.device("cpu"))
    llama = AutoConfig.from_pretrained(FIXTURES / "tiny-llama")
    gpt2 = AutoConfig.from_pretrained(FIXTURES.parent.parent / "examples" / "quickstart" / "model", attn_pdrop=0.1)
    packed = SFTConfig(model="m", packing=True, batch_size=32)
    long = -(-FLEX_MIN_TOKENS // (32 * 1024))  # steps of 32 rows of 1,024: just long enough
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    attention, said = resolve_attention(packed, llama, gpu, long, 1024)
    assert attention == "flex" and "attention: flex for the packed rows (auto: a CUDA GPU and 16M packed slots" in said
    assert resolve_attention(packed, llama, gpu, long - 1, 1024) == ("auto", None)  # too short to repay the compile
    assert resolve_attention(packed, llama, cpu, long, 1024) == ("auto", None)
    assert resolve_attention(replace(packed, packing=False), llama, gpu, long, 1024) == ("auto", None)
    assert resolve_attention(replace(packed, attention="sdpa"), llama, gpu, long, 1024) == ("sdpa", None)
    attention, said = resolve_attention(packed, gpt2, gpu, long, 1024)
    assert attention == "auto" and "config sets attn_pdrop = 0.1 (--model-config-overrides attn_pdrop=0" in said
    mistral = AutoConfig.from_pretrained(FIXTURES / "tiny-mistral")  # (its 64-token sliding window: flex would not)
    assert resolve_attention(packed, mistral, gpu, long, 1024) == ("auto", None)
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    assert resolve_attention(packed, llama, gpu, long, 1024) == ("auto", None)


def test_auto_keeps_right_padded_rows_unmasked_under_cuda_graphs():
    """Rows that are not packed, on a CUDA GPU under graphs: sftune's own attention function (SDPA's causal kernel,
    no mask), as the eager steps run; transformers' would build a full causal mask inside each capture (try 125:
    compiled blocks then recompiled in the capture and failed). Eager steps, a CPU, packed rows and an explicit
    kernel keep what they had."""
    from dataclasses import replace

    from transformers import AutoConfig

    from conftest import FIXTURES
    from sftune.config import SFTConfig
    from sftune.dist import Dist
    from sftune.step_mode import resolve_attention

    gpu, cpu = Dist(device=torch.device("cuda")), Dist(device=torch.device("cpu"))
    gpt2 = AutoConfig.from_pretrained(FIXTURES.parent.parent / "examples" / "quickstart" / "model", attn_pdrop=0.1)
    rows = SFTConfig(model="m", batch_size=32)
    attention, said = resolve_attention(rows, gpt2, gpu, 1000, 1024, "graphs")
    assert attention == "varlen" and "right-padded rows through SDPA's causal kernel with no mask" in said
    assert resolve_attention(rows, gpt2, gpu, 1000, 1024, "off") == ("auto", None)
    assert resolve_attention(rows, gpt2, cpu, 1000, 1024, "graphs") == ("auto", None)
    assert resolve_attention(replace(rows, attention="sdpa"), gpt2, gpu, 1000, 1024, "graphs") == ("sdpa", None)
    assert resolve_attention(replace(rows, packing=True), gpt2, gpu, 1, 1024, "graphs") == ("auto", None)
    mistral = AutoConfig.from_pretrained(FIXTURES / "tiny-mistral")  # (a sliding window of 64 tokens)
    assert resolve_attention(rows, mistral, gpu, 1000, 128, "graphs") == ("auto", None)
    assert resolve_attention(rows, mistral, gpu, 1000, 64, "graphs")[0] == "varlen"


def test_varlen_is_refused_before_training_on_a_gpu_older_than_ampere():
    """torch's variable-length kernel is flash attention's (Ampere, compute capability 8.0, on): on a T4 or V100
    `--attention varlen --packing` is said before any weights load, with flex named, instead of failing in the
    first step."""
    from sftune.attention import varlen_refusal

    said = varlen_refusal((7, 5), "Tesla T4")
    assert "needs an Ampere GPU or later (compute capability 8.0); Tesla T4 is 7.5" in said
    assert "--attention flex" in said
    assert varlen_refusal((8, 0), "NVIDIA A100") is None and varlen_refusal((9, 0), "NVIDIA H100") is None


def test_local_attention_reads_sliding_windows_and_chunks():
    """The narrowest window some layer attends within, from the config's own keys: Mistral's sliding window,
    Qwen2's only where `use_sliding_window` turns it on (its layer types then say so), Llama 4's chunks; none for
    a model whose layers all see the whole causal past."""
    from transformers import AutoConfig, Llama4TextConfig, Qwen2Config

    from conftest import FIXTURES
    from sftune.attention import local_attention

    assert local_attention(AutoConfig.from_pretrained(FIXTURES / "tiny-mistral")) == ("sliding_window", 64)
    for name in ("tiny-llama", "tiny-qwen2", "tiny-mixtral"):
        assert local_attention(AutoConfig.from_pretrained(FIXTURES / name)) is None, name
    qwen2 = dict(num_hidden_layers=4, sliding_window=32, max_window_layers=2)
    assert local_attention(Qwen2Config(**qwen2, use_sliding_window=True)) == ("sliding_window", 32)
    assert local_attention(Qwen2Config(**qwen2, use_sliding_window=False)) is None
    assert local_attention(Llama4TextConfig(attention_chunk_size=512)) == ("attention_chunk_size", 512)


@pytest.mark.parametrize("attention", ["varlen", "flex"])
def test_sftune_attention_refuses_rows_wider_than_a_sliding_window(capsys, tmp_path, small_model_dir, attention):
    """sftune's attention functions attend over whole rows: for a model whose layers attend within a sliding
    window (the tiny Mistral's 64 tokens) they would compute other logits past it, silently (by hand: 0.23 apart
    at 150 tokens, equal within the window). Rows wider than the window: exit 2 naming the window and both fixes,
    nothing written; rows within it (--max-length 64) train."""
    from conftest import FIXTURES

    common = ["train", "--no-run-report", "--model", str(FIXTURES / "tiny-mistral"), "--init", "random",
              "--tokenizer", str(small_model_dir), "--dataset", str(QUICKSTART_DATA), "--attention", attention,
              "--max-steps", "1", "--eval-every", "null", "--report-to", "none"]
    code, _, err = run_main(capsys, *common, "--max-length", "128", "--output-dir", str(tmp_path / "refused"))
    assert code == 2 and "Traceback" not in err and not (tmp_path / "refused").exists()
    assert f"--attention {attention}: this model's layers attend within 64 tokens (sliding_window = 64" in err
    assert "--attention sdpa, or --max-length 64" in err
    code, _, err = run_main(capsys, *common, "--max-length", "64", "--output-dir", str(tmp_path / "run"))
    assert code == 0, err


def tiny_gemma2(softcap: float | None = 0.5):
    """A 2-layer Gemma 2 (grouped-query heads, capped attention scores) in fp64, its query and key weights scaled
    up so that scores reach the cap (at the usual initialisation they stay far below it, where tanh is ~linear)."""
    from transformers import Gemma2Config

    from test_compile import VOCAB

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, attn_logit_softcapping=softcap,
                          final_logit_softcapping=30.0, sliding_window=64, max_position_embeddings=128,
                          bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config).to(torch.float64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(30)
    return model


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "rows"])
def test_flex_caps_gemma2s_attention_scores_as_its_own_attention_does(packed):
    """Gemma 2 soft-caps its attention scores (attn_logit_softcapping: s -> cap * tanh(s / cap)); sftune's flex
    attention passed the cap by, and `auto` takes flex for packed rows on a GPU: other losses, without a word
    (0.04 apart on this model). Now flex caps them (a score_mod on a GPU; here the same arithmetic written out), packed
    rows and rows that are not (SDPA cannot cap): the loss and every gradient of Gemma 2's own eager attention, fp64."""
    from sftune.attention import FLEX_NAME, register_flex

    register_flex()
    model = tiny_gemma2()
    batch = batch_of(EAGER, packed=packed)
    want_loss, want = loss_and_grads(CausalLMLoss(model), batch)  # (eager: Gemma 2's default)
    uncapped = tiny_gemma2(softcap=None)
    assert abs(loss_and_grads(CausalLMLoss(uncapped), batch)[0] - want_loss) > 1e-2  # (the cap matters here)
    model.set_attn_implementation(FLEX_NAME)
    got_loss, got = loss_and_grads(CausalLMLoss(model), batch)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-12, atol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)


def test_varlen_refuses_capped_attention_scores_and_generation_leaves_sdpa_to_models_it_runs(capsys, tmp_path,
                                                                                          small_model_dir):
    """torch's variable-length kernel cannot cap scores: `--attention varlen` on Gemma 2 is refused before anything
    loads, naming the config value and flex; generating under flex takes eager attention for it (SDPA cannot cap)."""
    from sftune.attention import FLEX_NAME, generating, register_flex

    model = tiny_gemma2(softcap=50.0)
    model.save_pretrained(tmp_path / "gemma2")
    code, _, err = run_main(capsys, "train", "--model", str(tmp_path / "gemma2"), "--tokenizer", str(small_model_dir),
                            "--dataset", str(QUICKSTART_DATA), "--packing", "--attention", "varlen",
                            "--output-dir", str(tmp_path / "run"))
    assert code == 2 and "Traceback" not in err and not (tmp_path / "run").exists(), err
    assert "attn_logit_softcapping = 50 in its config" in err and "--attention flex" in err
    register_flex()
    model.set_attn_implementation(FLEX_NAME)
    with generating(model):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == FLEX_NAME


@pytest.mark.parametrize("attention", ["varlen", "flex"])
def test_attention_sinks_are_refused_by_sftunes_attention(attention):
    """GPT-OSS's attention has sinks (a learned logit per head in every softmax), which sftune's varlen and flex do
    not compute: refused before anything loads (its sliding window alone let rows of up to 128 tokens through)."""
    from transformers import GptOssConfig

    from sftune.errors import SftuneError
    from sftune.modeling import check_attention

    config = GptOssConfig(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, sliding_window=128, max_position_embeddings=256)
    with pytest.raises(SftuneError, match=f"--attention {attention}: GptOssForCausalLM's attention layers have "
                                          f"sinks .* use --attention auto"):
        check_attention(config, attention, packing=True)


@pytest.mark.parametrize("attention", ["varlen", "flex"])
@pytest.mark.parametrize("keyword, value, said", [("s_aux", torch.zeros(2), "attention sinks (s_aux)"),
                                                  ("indices", torch.zeros(2), "a sparse attention's chosen keys"),
                                                  ("is_causal", False, "attention that is not causal")])
def test_what_sftunes_attention_does_not_compute_is_refused_where_a_layer_asks_for_it(attention, keyword, value, said):
    """At run time, where a layer passes its attention function a keyword that changes the arithmetic and sftune's
    functions do not compute it: a clear error, not other numbers (before, every such keyword was dropped)."""
    from sftune.attention import attention_forward, flex_forward
    from sftune.errors import SftuneError

    q = k = v = torch.zeros(1, 2, 4, 8)
    forward = attention_forward if attention == "varlen" else flex_forward
    with pytest.raises(SftuneError, match=re.escape(f"--attention {attention}: Linear asks for {said}")):
        forward(torch.nn.Linear(1, 1), q, k, v, None, **{keyword: value})
