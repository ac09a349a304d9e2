"""How the training step runs: eager, CUDA graphs or torch.compile (`--compile`), the attention of packed rows
(`--attention auto` picks flex on a GPU for runs that repay its compile), the fused loss's compiled softmax, and the
batch shapes each needs; decided once, from the config, the device and the run's length, and said in the log.

    mode, why = resolve_compile(cfg, dist, precision, total_steps)   # ("graphs", "auto: one CUDA GPU and ...")
    padding = step_padding(cfg, mode, max_length)                     # static shapes for graphs and compile
"""

from __future__ import annotations

import numpy as np
import torch

from sftune.attention import local_attention
from sftune.batching import Padding
from sftune.config import SFTConfig
from sftune.console import log
from sftune.dist import Dist
from sftune.errors import SftuneError
from sftune.loss import CausalLMLoss
from sftune.modeling import check_attention
from sftune.steps import StepSource

STATIC_MULTIPLE = 16  # graphs and compiled steps: widths rounded up to this (a handful of shapes on short data)
GRAPHS_MIN_STEPS = 50  # auto: shorter runs stay eager (capturing a shape costs about what ~10 eager steps do:
# a prediction, to be measured on a GPU, benchmarks/NOTES.md try 22)


def resolve_compile(cfg: SFTConfig, dist: Dist, precision: str, total_steps: int) -> tuple[str, str]:
    """(mode, why): graphs, torch or off, for `cfg.compile` on this device and a run of `total_steps`."""
    from sftune.graphs import why_not_graphs

    blocker = why_not_graphs(dist.device, dist.world_size, precision, cfg.gradient_checkpointing)
    if cfg.compile == "graphs" and blocker:
        raise SftuneError(f"--compile graphs: CUDA graphs cannot run here: {blocker}; use --compile off or torch")
    if cfg.compile == "torch" or cfg.compile_blocks is True:
        import torch._dynamo

        backends = torch._dynamo.list_backends(exclude_tags=())
        if cfg.compile_backend not in backends:
            raise SftuneError(f"--compile-backend {cfg.compile_backend!r} is not a torch.compile backend here; "
                              f"use one of {', '.join(backends)} (inductor is the usual one)")
    if cfg.compile != "auto":
        return cfg.compile, f"--compile {cfg.compile}"
    if blocker:
        return "off", f"auto: eager, as CUDA graphs cannot run here: {blocker}"
    if total_steps < GRAPHS_MIN_STEPS:
        return "off", (f"auto: eager, as {total_steps} steps would not repay capturing CUDA graphs (from "
                       f"{GRAPHS_MIN_STEPS} steps on; --compile graphs forces them)")
    return "graphs", ("auto: one CUDA GPU and a run long enough to repay the captures, so each batch shape's "
                      "forward and backward is a CUDA graph")


FLEX_MIN_TOKENS = 16_000_000  # auto: packed rows through flex attention on a CUDA GPU for runs of this many packed
# slots or more (try 89, H100, GPT-2 small: 86 against 105 ms a packed step of 32,768 slots, ~0.6 us a slot saved,
# against ~8 s of compiling its kernels once: repaid after ~13M)


def resolve_attention(cfg: SFTConfig, model_config, dist: Dist, total_steps: int, width: int,
                      compile_mode: str = "off") -> tuple[str, str | None]:
    """(attention, what to log): `cfg.attention`, except under `auto` on a CUDA GPU:

    - packed rows: flex attention (`--attention flex`: only the tiles of each example's own tokens) for runs long
      enough to repay its compile, for a model it can train (no attention dropout: said, with the fix, if that is
      all that stands in the way) and with Triton there to compile it. `width`: the packed rows' width;
    - right-padded rows under CUDA graphs (`compile_mode`): sftune's own SDPA function (`--attention varlen`, whose
      rows that are not packed take SDPA's causal kernel with no mask), for a model that goes through transformers'
      attention interface. With transformers' own, a step captured in a CUDA graph gets a full causal mask
      (transformers <= 5.17 builds one whenever a stream is capturing), while its eager warm-up ran without: the
      graph computed another kernel than the step it was checked against, and compiled blocks (`--compile-blocks`)
      met a new mask inside the capture, recompiled there and failed (try 125, H100).

    Neither where a layer attends within a window narrower than the rows (`attention.local_attention`: Mistral's
    sliding window, Llama 4's chunks), which only transformers' masks keep."""
    if cfg.attention != "auto" or dist.device.type != "cuda":
        return cfg.attention, None
    if (local := local_attention(model_config)) is not None and local[1] < width:
        return "auto", None  # (a sliding window or chunks narrower than the rows: transformers' masks keep them)
    if not cfg.packing:
        if compile_mode != "graphs":
            return "auto", None
        try:  # (SDPA itself too: sftune's function calls transformers' SDPA function for these rows)
            for attention in ("sdpa", "varlen"):
                check_attention(model_config, attention, cfg.trust_remote_code, dist.device, None)
        except SftuneError:  # (an architecture without transformers' attention interface, or without SDPA)
            return "auto", None
        return "varlen", ("attention: the right-padded rows through SDPA's causal kernel with no mask, in the CUDA "
                          "graphs as in eager steps (auto; --attention sdpa leaves transformers to build its mask)")
    slots = total_steps * cfg.batch_size * cfg.grad_accum * dist.world_size * width
    if slots < FLEX_MIN_TOKENS:
        return "auto", None
    from torch.utils._triton import has_triton

    from sftune.attention import attention_dropout

    if dropout := attention_dropout(model_config):
        key, p = dropout
        return "auto", (f"attention: packed rows through SDPA under a block mask; flex attention would be faster "
                        f"here (try 89: 86 against 105 ms a packed GPT-2 step) but has no dropout, and this model's "
                        f"config sets {key} = {p:g} (--model-config-overrides {key}=0 --attention flex to take it)")
    if not has_triton():
        return "auto", None
    try:
        check_attention(model_config, "flex", cfg.trust_remote_code, dist.device, None, packing=True)
    except SftuneError:  # (an architecture without transformers' attention interface)
        return "auto", None
    return "flex", (f"attention: flex for the packed rows (auto: a CUDA GPU and {slots / 1e6:,.0f}M packed slots "
                    f"repay its kernels' compile, ~8 s; --attention sdpa keeps SDPA under a block mask)")


BLOCKS_MIN_SLOTS = 24_000_000  # auto: compiled blocks under CUDA graphs for runs of this many padded slots a batch
# shape or more (try 146, H200, GPT-2 small: a replay 7.36 -> 6.45 ms for 32 x 48 slots, 28.6 -> 25.5 ms for 8 x
# 1,024: 0.4-0.6 us a slot saved, against 4-8 s of inductor a shape: repaid after ~10-20M; a larger model saves more
# a slot for about the same compile)
BLOCKS_MEASURED = ("gpt2",)  # auto takes compiled blocks only for the model types measured with them on a GPU


def resolve_blocks(cfg: SFTConfig, compile_mode: str, model_config, device: torch.device, steps: StepSource,
                   max_length: int) -> tuple[bool, str | None]:
    """(compile the blocks?, why, for the log): `--compile-blocks` / `--no-compile-blocks` as given; `auto` (the
    default) compiles them (inductor) under CUDA graphs, with Triton there, for a model type measured with them on a GPU
    (`BLOCKS_MEASURED`) and without LoRA (not measured), when the run's padded slots repay a compile for each batch
    shape it will meet (`BLOCKS_MIN_SLOTS` each)."""
    if cfg.compile_blocks != "auto":
        return bool(cfg.compile_blocks), None
    if compile_mode != "graphs" or device.type != "cuda" or cfg.lora_r or cfg.compile_backend != "inductor" or \
            getattr(model_config, "model_type", None) not in BLOCKS_MEASURED:
        return False, None
    from torch.utils._triton import has_triton

    slots, shapes = planned_slots(cfg, steps, max_length)
    if slots < BLOCKS_MIN_SLOTS * shapes or not has_triton():
        return False, None
    return True, (f"auto: {slots / 1e6:,.0f}M padded slots in {shapes} batch shape{'s' if shapes > 1 else ''} repay "
                  f"the blocks' compile, ~11% off a step of GPT-2 small; --no-compile-blocks leaves them as they are")


def planned_slots(cfg: SFTConfig, steps: StepSource, max_length: int) -> tuple[int, int]:
    """(padded slots, batch shapes) of the run's training steps, as the step pads them under CUDA graphs (widths
    rounded up to `STATIC_MULTIPLE`): packed rows are one shape of `max_length`; right-padded ones take the mean
    length's rounded width, in as many shapes as there are rounded lengths (streamed, unknown: every width up to
    `max_length`, each a shape)."""
    lengths = getattr(getattr(steps, "train", None), "lengths", None)
    if cfg.packing:
        width, shapes = max_length, 1
    elif lengths is None or len(lengths) == 0:
        width, shapes = max_length, -(-max_length // STATIC_MULTIPLE)
    else:
        rounded = np.minimum(-(-np.asarray(lengths) // STATIC_MULTIPLE) * STATIC_MULTIPLE, max_length)
        width, shapes = min(max_length, -(-int(np.mean(lengths)) // STATIC_MULTIPLE) * STATIC_MULTIPLE), \
            len(np.unique(rounded))
    return steps.total_steps * cfg.batch_size * cfg.grad_accum * width, shapes


CHUNK_MATH_MIN_SLOTS = 20_000_000  # auto: compile the fused loss's softmax for runs of at least this many target
# slots (a prediction, to be measured: ~10 s of compiling against ~0.6 us saved per slot over GPT-2's vocabulary,
# benchmarks/NOTES.md try 28)


def wants_chunk_math(cfg: SFTConfig, compile_mode: str, steps: StepSource, max_length: int) -> bool:
    """Whether the fused loss's per-chunk softmax is compiled (`fused_loss.ChunkMath`): under CUDA graphs (under
    `--compile torch` the whole step is compiled already), always when asked for with `--compile graphs`, and
    under `auto` when the run is long enough to repay the compile."""
    if compile_mode != "graphs":
        return False
    if cfg.compile == "graphs":
        return True
    return planned_slots(cfg, steps, max_length)[0] >= CHUNK_MATH_MIN_SLOTS


def step_padding(cfg: SFTConfig, compile_mode: str, max_length: int) -> Padding:
    """Eager steps pad to each batch's longest row (or `pad_to_multiple_of`); graphs and compiled steps need few,
    fixed shapes: widths rounded up, `batch_size` rows (unless a token cap sets the rows), targets at every slot."""
    if compile_mode == "off" and not cfg.compile_blocks:
        return Padding(multiple=cfg.pad_to_multiple_of or 1, max_width=max_length)
    rows = cfg.batch_size if cfg.batch_tokens is None else None
    return Padding(cfg.pad_to_multiple_of or STATIC_MULTIPLE, rows, max_length, static=True)


def compile_step(wrapped: torch.nn.Module, loss_model: CausalLMLoss, padding: Padding, backend: str,
                 mode: str | None) -> torch.nn.Module:
    """The training step's module under torch.compile: one compile per batch shape (static shapes: no symbolic
    sizes, and a handful of shapes). Checkpoints still read `loss_model`, whose names are unchanged."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * padding.shapes)
    loss_model.cache_cast = False  # (the cast is fused into the compiled graph; the cache's checks would break it)
    loss_model.correct_counter()  # made now: made inside the first compiled call, it would cost a recompile
    log(f"torch.compile ({backend}{f', {mode}' if mode else ''}): the first step of each batch shape compiles it "
        f"(seconds to minutes), the rest reuse it")
    return torch.compile(wrapped, dynamic=False, backend=backend, mode=mode)


def say_attention_off_gpu(cfg: SFTConfig, device: torch.device) -> None:
    """--attention varlen or flex asked for on a CPU: what runs instead (the same results)."""
    if cfg.attention in ("varlen", "flex") and cfg.packing and device.type != "cuda":
        log(f"attention: --attention {cfg.attention} is for a CUDA GPU; " + (
            "a CPU has no variable-length kernel, so each packed example goes through SDPA on its own: the "
            "same results, slower than the default (--attention auto: SDPA with a block mask)"
            if cfg.attention == "varlen" else "a CPU has no flex attention backward, so packed rows go through "
            "SDPA with the same mask made dense: the same results, as --attention auto computes them"))


def say_step(cfg: SFTConfig, device: torch.device, compile_mode: str, why: str, padding: Padding, chunk_math: bool,
             blocks: int, blocks_why: str | None = None) -> None:
    """The log's "step:" line (not for a CPU's default eager step), and a warning for compile flags this step
    does not use."""
    if compile_mode != "off" or cfg.compile != "auto" or device.type == "cuda" or blocks:
        log(f"step: {compile_mode} ({why})" + (f"; batches padded to multiples of {padding.multiple} tokens"
                                                f"{f' and {padding.rows} rows' if padding.rows else ''}"
                                                if padding.static else "")
            + ("; the fused loss's softmax compiled (inductor, seconds at the first step)" if chunk_math else "")
            + (f"; its {blocks} transformer blocks compiled ({cfg.compile_backend}: one compile per batch shape "
               f"serves them all, seconds to a minute at each shape's first step"
               f"{'; ' + blocks_why if blocks_why else ''})" if blocks else ""))
    unused = [f"--{k.replace('_', '-')} {v}" for k, v in (("compile_mode", cfg.compile_mode),
                                                          ("compile_backend", None if blocks else cfg.compile_backend))
              if v not in (None, "inductor")]  # (the blocks' compile takes the backend)
    if unused and compile_mode != "torch":
        log(f"warning: {' and '.join(unused)} {'apply' if len(unused) > 1 else 'applies'} to --compile torch only; "
            f"this run's step is {'eager' if compile_mode == 'off' else compile_mode} ({why}), so "
            f"{'they are' if len(unused) > 1 else 'it is'} not used (add --compile torch)")
