"""Checkpoint weights by name: the DCP shards an FSDP run writes (`torch.distributed.checkpoint`), read into a
sharded model on any number of ranks or into a whole one in one process, and a whole model's or optimizer's
state sharded as it loads. `checkpoint.py` writes and publishes checkpoints; this module moves their tensors.

    sftune train --model ../shared/models/gpt2 --init random --resume runs/fsdp/checkpoints/step-200 ...
"""

from __future__ import annotations

from pathlib import Path

from sftune.dist import reshard
from sftune.errors import SftuneError

DCP_DIR = "dcp"  # a sharded checkpoint's model and optimizer, written by torch.distributed.checkpoint
DCP_METADATA = f"{DCP_DIR}/.metadata"
WHOLE_MODEL = "model.safetensors"  # a whole model's checkpoint (one process, DDP), loadable by from_pretrained


def is_sharded(path: Path) -> bool:
    """A checkpoint written under FSDP: model and optimizer state as DCP shards, no whole model."""
    return (path / DCP_METADATA).is_file()


def holds_whole_model(path: Path) -> bool:
    """A full fine-tune's checkpoint written without FSDP: a Hugging Face model (the run's model is built from it)."""
    return (path / WHOLE_MODEL).is_file()


def shard_options(trainable_only: bool):
    """Loading only the trained tensors (LoRA) leaves the frozen ones as they are (`dcp.load` still fails on a
    trained tensor the checkpoint lacks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def model_state(model, trainable_only: bool) -> dict:
    """The model's tensors as DCP saves and loads them (by name; shards under FSDP, whole tensors otherwise): all of
    them, or only the trained ones (torch's `ignore_frozen_params` keeps a frozen tensor's second name, as GPT-2's
    head is its input embedding: dropped here too)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=shard_options(trainable_only))
    if trainable_only:
        frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        state = {name: tensor for name, tensor in state.items() if name not in frozen}
    return state


def read_shards(state: dict, path: Path) -> None:
    """`dcp.load` of checkpoint `path`'s shards into `state` (in one process too, which torch warns it assumes)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        try:
            dcp.load(state, checkpoint_id=str(path / DCP_DIR))
        except (Exception, dcp.CheckpointException) as e:  # (DCP's is a BaseException, raised on every rank)
            where, e = first_failure(e)
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise SftuneError(f"could not read the shards of checkpoint {path} ({where}{type(e).__name__}: {first}): "
                              f"it is damaged, incomplete or not of this model; use another checkpoint (--resume auto "
                              f"passes over damaged ones)") from None


def first_failure(e: BaseException) -> tuple[str, BaseException]:
    """torch.distributed.checkpoint's CheckpointException holds every failing rank's error: ("rank R: ", the first
    one's); any other error as it is ("", e)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, (error, _) = next(iter(failures.items()))
        return f"rank {rank}: ", error
    return "", e


def load_model_shards(path: Path, model, trainable_only: bool) -> None:
    """Load checkpoint `path`'s DCP model state into `model`, resharded to whatever it holds: its own shards under
    FSDP (any number of ranks), whole tensors in one process or under DDP (a collective under torchrun)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    state = {"model": model_state(model, trainable_only)}
    read_shards(state, path)
    set_model_state_dict(model, state["model"], options=shard_options(trainable_only))


def load_whole_model(path: Path, model) -> None:
    """A whole model's checkpoint into `model` (the loss module), in place; under FSDP each rank keeps its shards."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    whole = {f"model.{name}": tensor for name, tensor in load_file(path / WHOLE_MODEL).items()}  # (`CausalLMLoss`)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[name]) for name in whole if name in params}
    missing = [name for name, p in params.items() if id(p) not in loaded]  # (a tied head is loaded with its twin)
    if missing:
        raise SftuneError(f"cannot load {path / WHOLE_MODEL} into this run's model: it lacks {', '.join(missing[:3])}")
    reshard(model)  # (the root's parameters after an evaluation are not its shards)
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, strict=False))


def load_whole_optimizer(path: Path, model, optimizer, saved: dict) -> None:
    """Checkpoint `path`'s whole optimizer state (`saved`, from `optimizer.state_dict()`: parameters by their index in
    the groups) into FSDP's shards: indexed by name (the groups list the same parameters in the same order:
    `param_groups`), then each rank keeps its shards of it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): name for name, p in model.named_parameters()}
    here = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    there = [i for group in saved["param_groups"] for i in group["params"]]
    if len(here) != len(there):
        raise SftuneError(f"cannot resume from {path}: its optimizer holds {len(there)} tensors, this run trains "
                          f"{len(here)}")
    name_of = dict(zip(there, here))
    named = {"state": {name_of[i]: state for i, state in saved["state"].items()},
             "param_groups": [{**group, "params": [name_of[i] for i in group["params"]]}
                              for group in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


def load_optimizer_shards(path: Path, model, optimizer) -> None:
    """The optimizer state of checkpoint `path`'s DCP shards, resharded as `load_model_shards` does."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optim": get_optimizer_state_dict(model, optimizer)}
    read_shards(state, path)
    set_optimizer_state_dict(model, optimizer, state["optim"])
