"""Packed rows through torch's variable-length flash attention (`--attention varlen`).

transformers keeps packed examples apart with a dense block-diagonal mask, built from the position ids at every
forward, which takes SDPA off its flash kernel (and its check for packing reads a value back from the GPU). Here
the (rows x width) tokens of a packed batch are one flat stream of sequences, each example one of them, and each
row's padding cut into short ones of its own: the collate finds their starts on the host (`sequence_starts`) and
`torch.nn.attention.varlen.varlen_attn` runs causal flash attention over them, with no mask and no sync.
On a CPU, where torch has no such kernel, a causal SDPA per sequence computes the same thing (slowly: for checks).

`attention_forward` is registered with transformers' AttentionInterface as NAME, so every layer of a model loaded
with attn_implementation=NAME calls it, with the `sftune_cu_seqlens` / `sftune_max_seqlen` keywords the loss
module passes (`varlen_inputs`). A batch without them (rows that are not packed are right-padded, where causal
attention alone is exact) goes to transformers' own SDPA function with no mask, so SDPA's causal (flash) kernel,
dropout included; transformers itself builds an explicit causal mask while a CUDA graph is captured or a step
compiled (benchmarks/NOTES.md try 30). Generation needs masks (left padding, a cache): `generating` switches the
model to SDPA meanwhile.

`--attention flex` (FLEX_NAME, `flex_forward`) keeps packed rows' examples apart with flex attention instead: the
collate lists, per row, which 128 x 128 tiles of the attention matrix hold any pair of one example's tokens
(`block_tables`, on the host), and flex attention computes those tiles alone. Varlen's flash kernel gives every
sequence whole tiles of its own, which for short examples (SST-2's ~20 tokens) is mostly padding: on an H100 it
spent 37 of a packed GPT-2 step's 112 ms in attention (benchmarks/NOTES.md try 67).
"""

from __future__ import annotations

import contextlib
import inspect
import math

import numpy as np
import torch
import torch.nn.functional as F

from sftune.errors import SftuneError, compiler_error
from sftune.runtime import AMPERE

NAME = "sftune_varlen"  # the name transformers knows it by (`--attention varlen`)
FLEX_NAME = "sftune_flex"  # ... and `--attention flex` (flex attention with a block mask made on the host)
FLEX_BLOCK = 128  # flex attention's tile (its default sparse block size): the block mask lists tiles of this side
FLEX_KEYS = ("doc_ids", "kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")  # (`block_tables`)
CU_MULTIPLE = 256  # static batches: sequence starts padded to a multiple of this count (with empty sequences:
# each costs flash attention a block that exits at once; fewer shapes mean fewer graphs and compiles)
MAX_MULTIPLE = 128  # static batches: the longest sequence rounded up to this (flash's query block: the same grid)
PAD_BLOCK = 128  # a row's padding is cut into sequences of at most this (it attends to nothing real anyway)
DROPOUT_KEYS = ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob")  # model configs' names for it
DROPOUT_ADVICE = "set it to 0 with --model-config-overrides KEY=0, or use --attention sdpa"


def sequence_starts(example_lengths: list[list[int]], width: int, rows: int, static: bool) -> tuple[np.ndarray, int]:
    """`cu_seqlens` (int32, (S + 1,)) of the flattened (rows x width) tokens, and the longest sequence: each
    example is a sequence; each row's padding (and each empty row) is cut into sequences of PAD_BLOCK.
    `static` pads the starts to a multiple of CU_MULTIPLE with empty sequences at the end, and rounds the
    longest up to MAX_MULTIPLE, so that a CUDA graph sees a handful of shapes.

    >>> sequence_starts([[3, 2], [4]], width=5, rows=2, static=False)
    (array([ 0,  3,  5,  9, 10], dtype=int32), 4)
    """
    lengths: list[int] = []
    for row in range(rows):
        examples = example_lengths[row] if row < len(example_lengths) else []
        lengths += examples
        pad = width - sum(examples)
        lengths += [PAD_BLOCK] * (pad // PAD_BLOCK) + ([pad % PAD_BLOCK] if pad % PAD_BLOCK else [])
    cu = np.concatenate([[0], np.cumsum(lengths)])
    longest = max(lengths, default=0)
    if static:
        cu = np.pad(cu, (0, -len(cu) % CU_MULTIPLE), constant_values=cu[-1])
        longest = min(-(-longest // MAX_MULTIPLE) * MAX_MULTIPLE, width)
    return cu.astype(np.int32), int(longest)


def block_tables(example_lengths: list[list[int]], width: int, rows: int) -> dict[str, np.ndarray]:
    """flex attention's block mask of packed rows, made on the host from the examples' lengths (no sync, and fixed
    shapes for a given (rows, width): CUDA graphs and compiled steps take it like any other input).

    A token sees the tokens of its own example up to itself. A row's padding is an example of its own (nothing
    reads its outputs). In FLEX_BLOCK tiles: a query tile sees key tiles from the one where its first token's
    example starts up to itself; those below the diagonal that lie wholly inside the example of its last token
    are full (no mask evaluated), the others partial (`document_causal` decides per pair), and every other tile is
    skipped. With examples of ~20 tokens (SST-2), a 1,024-token row computes ~1.5 tiles per query tile instead of
    the 4.5 of plain causal attention, and no work on padding of per-sequence tiles (varlen's cost, NOTES try 67).

    Returns `doc_ids` (rows, width) int32, each token's example within its row, and flex's `kv_num_blocks`
    (rows, 1, Q), `kv_indices` (rows, 1, Q, K), `full_kv_num_blocks`, `full_kv_indices` (int32; Q = K = tiles).

    >>> t = block_tables([[100, 100], [300]], width=300, rows=2)
    >>> t["kv_num_blocks"][:, 0].tolist(), t["full_kv_num_blocks"][:, 0].tolist()
    ([[1, 2, 2], [1, 1, 1]], [[0, 0, 0], [0, 1, 2]])
    >>> t["kv_indices"][0, 0].tolist(), t["full_kv_indices"][1, 0].tolist()  # (listed tiles first, then the rest)
    ([[0, 1, 2], [0, 1, 2], [1, 2, 0]], [[0, 1, 2], [0, 1, 2], [0, 1, 2]])
    """
    doc = np.empty((rows, width), dtype=np.int32)
    start = np.empty((rows, width), dtype=np.int64)  # where each token's example starts
    for row in range(rows):
        lengths = list(example_lengths[row]) if row < len(example_lengths) else []
        pad = width - sum(lengths)
        lengths += [pad] if pad else []
        doc[row] = np.repeat(np.arange(len(lengths)), lengths)
        start[row] = np.repeat(np.cumsum([0] + lengths[:-1]), lengths)
    tiles = -(-width // FLEX_BLOCK)
    tile = np.arange(tiles)
    first_q = tile * FLEX_BLOCK
    last_q = np.minimum(first_q + FLEX_BLOCK, width) - 1
    lo = start[:, first_q] // FLEX_BLOCK  # (rows, Q): the first key tile a query tile sees
    full_lo = np.minimum(-(-start[:, last_q] // FLEX_BLOCK), tile)  # full: full_lo .. diagonal - 1
    key = tile[None, None, :]  # (1, 1, K) against (rows, Q, 1)
    seen = (key >= lo[..., None]) & (key <= tile[None, :, None])
    full = (key >= full_lo[..., None]) & (key < tile[None, :, None])
    tables = {"doc_ids": doc}
    for prefix, listed in (("", seen & ~full), ("full_", full)):
        # flex's own layout (`_dense_to_ordered`): the listed tiles in order, then every other tile in order
        order = np.argsort(~listed, axis=-1, kind="stable")
        tables[f"{prefix}kv_num_blocks"] = listed.sum(-1)[:, None]  # (rows, 1 head: all alike, Q)
        tables[f"{prefix}kv_indices"] = order[:, None]
    # C order: numpy may lay a broadcast result out otherwise, and flex's compiled kernels read the tables as
    # contiguous (a transposed count table gave wrong outputs, NOTES try 67)
    return {k: np.ascontiguousarray(v, dtype=np.int32) for k, v in tables.items()}


def document_causal(doc_ids: torch.Tensor):
    """flex attention's mask function for packed rows: causal, and within each example (`doc_ids`: (rows, width))."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return mask_mod


def flex_inputs(batch: dict) -> dict:
    """The keyword `flex_forward` reads: the block mask of a packed batch's rows, built on the device from the
    tables the collate made (`block_tables`); nothing for other batches."""
    if "kv_num_blocks" not in batch:
        return {}
    from torch.nn.attention.flex_attention import BlockMask

    width = batch["doc_ids"].shape[1]
    mask = BlockMask.from_kv_blocks(batch["kv_num_blocks"], batch["kv_indices"], batch["full_kv_num_blocks"],
                                    batch["full_kv_indices"], BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=document_causal(batch["doc_ids"]), seq_lengths=(width, width))
    return {"sftune_block_mask": mask, "sftune_doc_ids": batch["doc_ids"]}


def varlen_inputs(batch: dict) -> dict:
    """The keywords `attention_forward` reads, from a packed batch (nothing for other batches)."""
    if "cu_seqlens" not in batch:
        return {}
    return {"sftune_cu_seqlens": batch["cu_seqlens"], "sftune_max_seqlen": batch["max_seqlen"]}


_KERNEL: tuple | None = None  # torch's varlen_attn and its keyword names (set by `register`; None before 2.10)


def register() -> None:
    """Make NAME known to transformers (idempotent). No mask function is registered with it: transformers then
    builds no mask at all for a model that uses it. The kernel's signature is read here, once, not in a traced
    step."""
    global _KERNEL
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention_forward)
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return
    _KERNEL = (varlen_attn, frozenset(inspect.signature(varlen_attn).parameters))


def register_flex() -> None:
    """Make FLEX_NAME known to transformers (idempotent; no mask function: transformers builds none)."""
    from transformers import AttentionInterface

    AttentionInterface.register(FLEX_NAME, flex_forward)


_FLEX: list = []  # [flex_attention under torch.compile, or itself if compiling failed] (made on first GPU use)


def flex_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sftune_block_mask=None,
                 sftune_doc_ids=None, **kwargs):
    """`--attention flex`: transformers' attention-function contract, as `attention_forward`. Packed rows go through
    flex attention with their block mask (`flex_inputs`), compiled on a GPU; on a CPU, where torch has no backward
    for flex attention, SDPA with the same mask made dense computes the same thing (slowly: for checks). Other
    batches take transformers' SDPA, causal and unmasked."""
    refuse_other_attention(kwargs, "flex", module)
    softcap = kwargs.pop("softcap", None)  # (Gemma 2's attn_logit_softcapping: scores -> cap * tanh(scores / cap))
    if sftune_block_mask is None:
        if softcap is not None:  # (transformers' SDPA function refuses a cap: causal attention alone is exact here)
            out = capped_attention(query, key, value, causal_mask(query)[:, None], scaling, softcap,
                                   dropout if module.training else 0.0)
            return out.transpose(1, 2).contiguous(), None
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:
        raise SftuneError(f"--attention flex: flex attention has no dropout, and this model drops attention weights "
                          f"with p = {dropout:g}; {DROPOUT_ADVICE}")
    device = query.device.type
    common = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else value.dtype
    query, key, value = (t.to(common) for t in (query, key, value))
    gqa = key.shape[1] != query.shape[1]
    if query.is_cuda and not _REFERENCE_KERNELS:
        out = compiled_flex(query, key, value, block_mask=sftune_block_mask, scale=scaling, enable_gqa=gqa,
                            **({"score_mod": capped_scores(softcap)} if softcap is not None else {}))
    else:
        mask = causal_mask(query) & (sftune_doc_ids[:, :, None] == sftune_doc_ids[:, None, :])
        if softcap is not None:
            out = capped_attention(query, key, value, mask[:, None], scaling, softcap, 0.0)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask[:, None], scale=scaling,
                                                 enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def causal_mask(query: torch.Tensor) -> torch.Tensor:
    """(1, T, T): True where a query position may attend to a key position (at or before it), for (B, H, T, D)
    queries. Made only on the paths that read it (not in the compiled flex kernel's)."""
    positions = torch.arange(query.shape[2], device=query.device)
    return positions[None, :, None] >= positions[None, None, :]


def capped_attention(query, key, value, mask: torch.Tensor, scaling: float | None, softcap: float,
                     dropout: float) -> torch.Tensor:
    """Attention whose scores are soft-capped before the mask and softmax, as Gemma 2's eager attention computes it
    (softmax in fp32); `mask`: True where a query may attend, broadcast to (B, H, T, T). The (B, H, T, D) output."""
    heads, kv_heads = query.shape[1], key.shape[1]
    if kv_heads != heads:  # (grouped-query heads: each key/value head serves heads / kv_heads query heads)
        key, value = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (key, value))
    scale = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=dropout > 0)
    return torch.matmul(weights, value)


_CAPS: dict = {}  # softcap -> its flex score_mod (one function per value: a new one would recompile the kernel)


def capped_scores(softcap: float):
    """flex attention's score_mod for a soft cap: score -> cap * tanh(score / cap), as transformers' own."""
    if softcap not in _CAPS:
        def score_mod(score, b, h, q_idx, kv_idx):
            return softcap * torch.tanh(score / softcap)

        _CAPS[softcap] = score_mod
    return _CAPS[softcap]


def compiled_flex(*args, **kwargs) -> torch.Tensor:
    """flex attention under torch.compile (its fused kernels); if compiling fails, says so once and goes on with
    flex attention uncompiled (the same attention, materializing each row's scores: slow, not wrong)."""
    from torch.nn.attention.flex_attention import flex_attention

    if not _FLEX:
        _FLEX.append(torch.compile(flex_attention, dynamic=False))
    try:
        return _FLEX[0](*args, **kwargs)
    except Exception as e:  # noqa: BLE001 (any compiler failure: the uncompiled kernel computes the same)
        if _FLEX[0] is flex_attention:
            raise
        from sftune.console import log

        log(f"warning: compiling flex attention failed ({compiler_error(e)}); --attention flex goes on uncompiled "
            f"(slow: each row's scores materialized)")
        _FLEX[0] = flex_attention
        return flex_attention(*args, **kwargs)


def kernel() -> tuple:
    """torch's varlen_attn and its keyword names, or a clear error on a torch without it."""
    if _KERNEL is None:
        raise SftuneError(f"--attention varlen needs torch 2.10 or later (this is {torch.__version__}); "
                          f"use --attention sdpa")
    return _KERNEL


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      sftune_cu_seqlens=None, sftune_max_seqlen=None, **kwargs):
    """transformers' attention-function contract: (B, H, T, D) query, (B, Hkv, T, D) key and value in; the
    (B, T, H, D) output and no weights out."""
    if kwargs.get("softcap") is not None:  # (refused before training: `check_varlen`)
        raise SftuneError(softcap_refusal(kwargs["softcap"]))
    refuse_other_attention(kwargs, "varlen", module)
    if sftune_cu_seqlens is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:
        raise SftuneError(f"--attention varlen: torch's variable-length attention has no dropout, and this model "
                          f"drops attention weights with p = {dropout:g}; {DROPOUT_ADVICE}")
    batch, heads, width, dim = query.shape
    flat = [t.transpose(1, 2).reshape(batch * width, t.shape[1], dim) for t in (query, key, value)]
    scale = scaling if scaling is not None else 1 / math.sqrt(dim)
    attend = varlen_kernel if query.is_cuda and not _REFERENCE_KERNELS else _reference_outside_compile()
    out = attend(*flat, sftune_cu_seqlens, sftune_max_seqlen, scale)
    return out.view(batch, width, heads, dim), None


_REFERENCE = None
_REFERENCE_KERNELS: list = []  # non-empty within `reference_kernels()`


@contextlib.contextmanager
def reference_kernels():
    """Within the block, varlen and flex compute as they do on a CPU (per-sequence SDPA; SDPA under the dense mask)
    on a GPU too: for a check of a few tokens in fp32 (`packing_check`), which torch's varlen kernel (bf16 or fp16
    only) cannot run and for which flex attention would compile kernels for its one shape."""
    _REFERENCE_KERNELS.append(True)
    try:
        yield
    finally:
        _REFERENCE_KERNELS.pop()


def _reference_outside_compile():
    """`varlen_reference`, run outside torch.compile (a loop over host values: compiled, it would recompile for
    every batch). Wrapped on first use: importing torch._dynamo costs a second."""
    global _REFERENCE
    if _REFERENCE is None:
        _REFERENCE = torch.compiler.disable(varlen_reference)
    return _REFERENCE


def varlen_kernel(q, k, v, cu_seqlens, max_seqlen: int, scale: float) -> torch.Tensor:
    """Causal flash attention over the sequences of `cu_seqlens` (torch >= 2.10, CUDA): the keywords differ
    between torch releases (is_causal in 2.10, window_size after; scale and enable_gqa are not in all)."""
    varlen_attn, params = kernel()
    half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else v.dtype
    q, k, v = (t.to(half) for t in (q, k, v))  # (one dtype, as flash needs: a model may leave q/k in fp32)
    options = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "scale" in params:
        options["scale"] = scale
    else:
        q = q * (scale * math.sqrt(q.shape[-1]))  # (its default scale is 1 / sqrt(D))
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            options["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **options)


def varlen_reference(q, k, v, cu_seqlens, max_seqlen: int, scale: float) -> torch.Tensor:
    """The same on any device: causal SDPA over each sequence in turn ((total, H, D) in and out)."""
    bounds = cu_seqlens.tolist()
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (H, n, D)
            pieces.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                         enable_gqa=ks.shape[0] != qs.shape[0]).transpose(0, 1))
    return torch.cat(pieces)


def attention_dropout(model_config) -> tuple[str, float] | None:
    """(config key, value) of the attention dropout a model config sets (the largest), or None when it sets none."""
    key, p = max(((k, float(getattr(model_config, k, 0) or 0)) for k in DROPOUT_KEYS), key=lambda kv: kv[1])
    return (key, p) if p > 0 else None


def local_attention(model_config) -> tuple[str, int] | None:
    """(config key, tokens) of the narrowest local attention some layer of the model uses (a sliding window, or
    attention in chunks), or None when every layer attends to the whole causal past. sftune's attention functions
    attend causally over each row (or each packed example) whole: exact only where the window holds a row."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if types is not None and all(t in ("full_attention", "linear_attention") for t in types):
        window = None  # (Qwen2 with use_sliding_window false: every layer full; linear layers take no mask)
    elif types is None and getattr(text, "use_sliding_window", True) is False:
        window = None
    found = [(key, int(n)) for key, n in (("sliding_window", window),
                                          ("attention_chunk_size", getattr(text, "attention_chunk_size", None))) if n]
    return min(found, key=lambda kv: kv[1]) if found else None


def check_window(model_config, attention: str, width: int) -> None:
    """`--attention varlen` or `flex` for rows of up to `width` tokens: a clear error when a layer of the model
    attends within a narrower window (those functions would attend past it: other logits, without a word)."""
    if attention not in ("varlen", "flex") or (local := local_attention(model_config)) is None or local[1] >= width:
        return
    key, n = local
    raise SftuneError(f"--attention {attention}: this model's layers attend within {n:,} tokens ({key} = {n} in its "
                      f"config) and sftune's {attention} attention attends over whole rows of up to {width:,}; use "
                      f"--attention sdpa, or --max-length {n} (rows within the window, where both agree)")


def check_varlen(model_config, device, precision: str | None, packing: bool, attention: str = "varlen") -> None:
    """`--attention varlen` (or `flex`) can train this model here, or a clear error. Only packed rows use torch's
    kernel (rows that are not packed take SDPA, with any dropout and precision). A model that soft-caps its
    attention scores (Gemma 2) trains under flex, which caps them, not under varlen (neither torch's kernel nor
    SDPA can)."""
    if attention == "varlen" and (softcap := attention_softcap(model_config)) is not None:
        raise SftuneError(softcap_refusal(softcap))
    if not packing:
        return
    if dropout := attention_dropout(model_config):
        key, p = dropout
        kernel_name = "torch's variable-length attention" if attention == "varlen" else "flex attention"
        raise SftuneError(f"--attention {attention}: {kernel_name} has no dropout, and this model's "
                          f"config sets {key} = {p:g}; {DROPOUT_ADVICE.replace('KEY', key)}")
    if attention == "varlen" and device is not None and torch.device(device).type == "cuda":
        if refusal := varlen_refusal(torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device)):
            raise SftuneError(refusal)
        kernel()
        if precision not in ("bf16", "fp16"):
            raise SftuneError(f"--attention varlen runs flash attention, which computes in bf16 or fp16, not "
                              f"{precision}; use --precision bf16 (or --attention sdpa)")


def attention_softcap(model_config) -> float | None:
    """The soft cap a model puts on its attention scores (Gemma 2's `attn_logit_softcapping`), or None."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    cap = getattr(text, "attn_logit_softcapping", None)
    return float(cap) if cap else None


# What a layer may pass its attention function that sftune's do not compute: refused, not dropped (transformers 5's
# models, by their keywords: GPT-OSS, Granite-SWA, DeepSeek-V4's sinks; DeepSeek-V3.2's and GLM's sparse attention)
OTHER_ATTENTION = {"s_aux": "attention sinks", "sinks": "attention sinks", "indices": "a sparse attention's chosen keys",
                   "block_indices": "a sparse attention's chosen blocks", "position_bias": "a bias added to the scores"}


def refuse_other_attention(kwargs: dict, attention: str, module) -> None:
    """A clear error where a layer asks its attention function for something sftune's do not compute (rather than
    other numbers, without a word); models with sinks are refused before loading already (`modeling.check_attention`)."""
    what = next((f"{v} ({k})" for k, v in OTHER_ATTENTION.items() if kwargs.get(k) is not None), None)
    if what is None and kwargs.get("is_causal") is False:
        what = "attention that is not causal (is_causal=False)"
    if what is not None:
        raise SftuneError(f"--attention {attention}: {type(module).__name__} asks for {what}, which sftune's "
                          f"{attention} attention does not compute; use --attention auto (or eager)")


def sinks_refusal(attention: str, model: str) -> str:
    return (f"--attention {attention}: {model}'s attention layers have sinks (a learned logit per head that takes a "
            f"share of every softmax), which sftune's {attention} attention does not compute; use --attention auto "
            f"(or eager)")


def softcap_refusal(softcap: float) -> str:
    return (f"--attention varlen: this model soft-caps its attention scores (attn_logit_softcapping = {softcap:g} "
            f"in its config), which torch's variable-length kernel cannot do (its numbers would be other ones); use "
            f"--attention flex for packed rows, or auto")


def varlen_refusal(capability: tuple[int, int], card: str) -> str | None:
    """Why torch's variable-length kernel cannot run on a GPU of this compute capability (it is flash attention's,
    built for Ampere, 8.0, and later), or None."""
    if tuple(capability) >= AMPERE:
        return None
    return (f"--attention varlen runs flash attention's variable-length kernel, which needs an Ampere GPU or later "
            f"(compute capability 8.0); {card} is {capability[0]}.{capability[1]}; use --attention flex (or sdpa) "
            f"for packed rows on it")


@contextlib.contextmanager
def generating(model):
    """SDPA while generating (left padding and the cache need masks; eager for a model SDPA cannot run, Gemma 2's
    capped scores), then NAME (or FLEX_NAME) again."""
    own = getattr(model.config, "_attn_implementation", None)
    if own not in (NAME, FLEX_NAME):
        yield
        return
    sdpa = getattr(model, "_supports_sdpa", True) and attention_softcap(model.config) is None
    model.set_attn_implementation("sdpa" if sdpa else "eager")
    try:
        yield
    finally:
        model.set_attn_implementation(own)
