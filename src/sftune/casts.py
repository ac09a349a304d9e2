"""The weights of a step's matrix products cast to bf16 in one pass, and their gradients back in one.

Under autocast each `Linear` (and GPT-2's `Conv1D`) casts its fp32 weight and bias to bf16 where it is used, and
the backward casts each bf16 gradient back to fp32: two small kernels per tensor per step, ~200 for GPT-2 small.
In a CUDA graph they cost no launches but still took 1.28 ms of the seed recipe's 8.6 ms on an H100 (benchmarks/
NOTES.md, try 64), where their bytes need ~0.4 ms: the rest is each small kernel's fixed cost, we predict (try 88:
to be measured). `MatmulCasts` makes the same casts as two
multi-tensor copies (`torch._foreach_copy_`, which converts as it copies): the forward's bf16 copies, handed to the
model for the call (`torch.func.functional_call`), and the backward's fp32 gradients. The numbers are autocast's:
a cast rounds as autocast's does, an operation whose inputs are all bf16 already is the one autocast runs, and the
fp32 gradient of a bf16 copy is its bf16 gradient, converted (tested bitwise on CPU).

Only the parameters that autocast hands to bf16 products are cast: the weight and bias of `Linear` and `Conv1D`
modules, not the output head (the fused loss casts it its own way), nor a tensor another kind of module reads too
(GPT-2's tied embedding, layer norms: those run in fp32 under autocast), nor a layer registered twice (shared by
two positions: its uses' gradients would be summed in bf16), and none in a model with LoRA layers
(`MatmulCasts.for_model`). The gradients reach the parameters when the whole backward is done rather than as
each is made, so this is for one process (CUDA graphs), not DDP, whose reductions start as gradients arrive.

    casts = MatmulCasts.for_model(loss_model, torch.bfloat16)
    with autocast(device, "bf16"):
        loss = casts.call(loss_model, batch)           # what loss_model(batch) computes
"""

from __future__ import annotations

import torch
from torch import nn


class _CastAll(torch.autograd.Function):
    """bf16 copies of the given fp32 tensors in one pass; their gradients back to fp32 in one pass."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *tensors: torch.Tensor):
        ctx.set_materialize_grads(False)
        ctx.dtypes = [t.dtype for t in tensors]
        copies = [torch.empty_like(t, dtype=dtype) for t in tensors]
        torch._foreach_copy_(copies, list(tensors))
        return tuple(copies)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        present = [i for i, g in enumerate(grads) if g is not None]
        back: list[torch.Tensor | None] = [None] * len(grads)
        if present:
            converted = [torch.empty_like(grads[i], dtype=ctx.dtypes[i]) for i in present]
            torch._foreach_copy_(converted, [grads[i] for i in present])
            for i, g in zip(present, converted):
                back[i] = g
        return (None, *back)


def matmul_parameters(model: nn.Module, head: nn.Module | None, trained: bool = True) -> dict[str, nn.Parameter]:
    """name -> parameter, for the trained (`trained=False`: frozen) fp32 weights and biases that only `Linear`/`Conv1D`
    modules (not `head`) read."""
    from transformers.pytorch_utils import Conv1D

    readers: dict[int, set[str]] = {}  # parameter -> what reads it: "matmul", or another kind of module
    for module in model.modules():
        kind = "head" if module is head else "matmul" if isinstance(module, (nn.Linear, Conv1D)) else \
            type(module).__name__
        for p in module.parameters(recurse=False):
            readers.setdefault(id(p), set()).add(kind)
    # a tensor registered under several names (a layer shared by several positions) would be read through one copy
    # whose gradients autograd sums in bf16; autocast's cast at each use sums them in fp32: left to autocast
    names: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        names[id(p)] = names.get(id(p), 0) + 1
    found: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters():
        if p.requires_grad == trained and p.dtype == torch.float32 and readers[id(p)] == {"matmul"} and names[id(p)] == 1:
            found[name] = p
    return found


def keep_frozen_matrices_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Keep the frozen weights that only `Linear`/`Conv1D` layers read (not a tied embedding, not layer norms, not
    biases, not a LoRA adapter's own matrices) in `dtype`, the compute precision's: half their memory in bf16 or
    fp16. Under autocast each product casts an fp32 weight to that dtype where it is used, rounding as `.to(dtype)`
    does, so the products read the same numbers: a LoRA run's loss and its adapter's gradients are the fp32 base's,
    bitwise, and an evaluation's loss the fp32 model's (tested). Marks `model` (and a peft model's base) with the
    dtype (`sftune_base_cast`): a merge then reads the fp32 base from disk, and generating runs under autocast too.
    Returns the bytes saved."""
    saved = 0
    for name, p in matmul_parameters(model, None, trained=False).items():  # (an untied head too)
        if name.endswith(".weight") and ".lora_" not in name:
            p.data = p.data.to(dtype)
            saved += p.numel() * (4 - p.element_size())
    cast = dtype if saved else None
    model.sftune_base_cast = cast
    if hasattr(model, "get_base_model"):
        model.get_base_model().sftune_base_cast = cast
    return saved


def memory_text(nbytes: int) -> str:
    """`nbytes` as a log says it: GiB from 1 GiB on, else MiB."""
    return f"{nbytes / 2**30:,.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:,.1f} MiB"


class MatmulCasts:
    """One model's matrix-product weights, cast for a call in one pass (see the module's docstring)."""

    def __init__(self, parameters: dict[str, nn.Parameter], dtype: torch.dtype):
        self.names, self.params, self.dtype = list(parameters), list(parameters.values()), dtype

    @classmethod
    def for_model(cls, loss_model: nn.Module, dtype: torch.dtype) -> MatmulCasts | None:
        """For `loss_model` (a `CausalLMLoss`: its `model` is the Hugging Face model); None when nothing qualifies,
        and for a model with LoRA layers: peft casts a layer's input to its adapter's dtype, so with bf16 adapter
        weights the input's gradient would be summed in bf16 rather than fp32 (measured: the same loss, other
        gradients)."""
        hf_model = loss_model.model
        if any(type(m).__module__.startswith("peft.") for m in hf_model.modules()):
            return None
        found = matmul_parameters(hf_model, hf_model.get_output_embeddings())
        at = next(n for n, m in loss_model.named_modules() if m is hf_model)  # ("model" in a CausalLMLoss)
        return cls({f"{at}.{n}" if at else n: p for n, p in found.items()}, dtype) if found else None

    def call(self, module: nn.Module, *args):
        """`module(*args)`, its matrix-product weights read as one-pass bf16 copies."""
        copies = _CastAll.apply(self.dtype, *self.params)
        return torch.func.functional_call(module, dict(zip(self.names, copies)), args, strict=False,
                                          tie_weights=False)
