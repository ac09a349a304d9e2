"""What is done to a model's transformer blocks for speed or memory, in place, its state dict's names unchanged.

`fuse_activations` (GPT-2's GELU written out in Python run as torch's fused kernel: always),
`enable_activation_checkpointing` (`--gradient-checkpointing`) and `compile_blocks` (`--compile-blocks`: each block
under torch.compile, one compile per batch shape for all of them).
"""

from __future__ import annotations

import torch

from sftune.errors import SftuneError


def fuse_activations(model) -> int:
    """Run the tanh-approximated GELU written out in Python (transformers' `gelu_new` and `gelu_fast`: GPT-2, GPT-J,
    GPT-Neo, CodeGen, Phi) as torch's one fused kernel (transformers' own `gelu_pytorch_tanh`): the same function to
    float rounding (within 1e-6 relative in fp32, tested), one pass over the activations instead of about eight
    forward and more backward. The config is untouched, so the saved model names its own activation. Returns how
    many modules were replaced."""
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(module, name, GELUTanh())
                replaced += 1
    return replaced


def enable_activation_checkpointing(model) -> None:
    """Recompute each transformer block's activations in the backward (non-reentrant: works under DDP and FSDP).
    transformers renamed the method in 5.x (`activation_checkpointing_enable`); older releases have the old name."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def transformer_blocks(model) -> list:
    """The model's repeated transformer blocks: the module classes transformers names in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_blocks(model, backend: str, shapes: int) -> int:
    """Each transformer block under torch.compile with static shapes, in place (as `Module.compile`: the state
    dict's names unchanged). The blocks run the same code and dynamo takes their weights as inputs, so one compile
    per batch shape serves them all (`shapes`: how many the step can see). In training only: evaluation and
    generation run the blocks as they are. Returns the number of blocks compiled."""
    import torch._dynamo

    blocks = transformer_blocks(model)
    if not blocks:
        raise SftuneError(f"--compile-blocks: cannot find the transformer blocks of {type(model).__name__} (its "
                          f"_no_split_modules names none); leave --compile-blocks out")
    # (x 2: blocks of one class that differ in a setting, e.g. sliding-window layers)
    limit = 2 * shapes * len({type(block) for block in blocks})
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    for block in blocks:
        block._compiled_call_impl = _when_training(block, torch.compile(block._call_impl, backend=backend,
                                                                         dynamic=False))
    return len(blocks)


def _when_training(block, compiled):
    """`block`'s call (what `Module.compile` sets): the compiled one in training, with gradients; its own in
    evaluation and generation, whose batches have every width (a compile for each would be minutes for nothing)."""
    def call(*args, **kwargs):
        if block.training and torch.is_grad_enabled():
            return compiled(*args, **kwargs)
        return block._call_impl(*args, **kwargs)
    return call
