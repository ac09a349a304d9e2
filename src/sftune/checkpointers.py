"""The kinds of checkpoint the training loop writes and resumes through one interface, `Checkpointer`.

`FullCheckpointer` (the whole model, written by rank 0), `ShardedCheckpointer` (FSDP: each rank's shards with
torch.distributed.checkpoint), `AdapterCheckpointer` (LoRA: the adapter only) or `ShardedAdapterCheckpointer`
(LoRA under FSDP: the adapter's shards, and the adapter gathered whole). Each writes a checkpoint directory as
`checkpoint.py` lays it out (staged, fsynced, published by an atomic rename, `state.json` last) and reads any
kind back into any kind of run where the arithmetic allows.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Protocol

import torch

from sftune.checkpoint import TRAINING_STATE, CheckpointNotWritten, TrainState, load_training_state, new_staging, \
    publish, remove_run_checkpoints, rng_state, rotate, save_checkpoint, weights_finite, write_failed
from sftune.console import log
from sftune.dist import Dist
from sftune.errors import SftuneError, TrainingDiverged
from sftune.shards import DCP_DIR, holds_whole_model, is_sharded, load_model_shards, load_optimizer_shards, \
    load_whole_model, load_whole_optimizer, model_state


class Checkpointer(Protocol):
    """What the training loop needs from checkpoints, whatever their kind (full, sharded, adapter-only).
    Finding the checkpoint to resume from is the same for all (`find_resume_checkpoint`). A checkpoint of one kind
    resumes under another where the arithmetic allows: shards without FSDP, a whole model under FSDP."""

    def save(self, state: TrainState, model, optimizer, scheduler, scaler) -> Path:
        """Write a checkpoint of `state` and the given objects, atomically; called on every rank. `model` is the
        loss module (`CausalLMLoss`, sharded in place under FSDP)."""

    def restore(self, path: Path, model, optimizer, scheduler, scaler) -> TrainState:
        """Load everything the model was not already loaded with; return the run's position."""

    def load_weights(self, path: Path, model) -> None:
        """Load checkpoint `path`'s weights into the run's model, in place (every rank calls)."""

    def remove_own(self, run_id: str) -> int:
        """Remove run `run_id`'s checkpoints (rank 0, once the final model is saved); how many."""


class FullCheckpointer:
    """The whole model in each checkpoint, as a Hugging Face directory; rank 0 writes, the others wait."""

    trainable_only = False  # LoRA under FSDP (`ShardedAdapterCheckpointer`): the shards of the trained tensors only

    def __init__(self, root: Path, dist: Dist, tokenizer, config_yaml: str, keep_last: int, hashes: bool = False,
                 keep_best: bool = False):
        self.root, self.dist, self.tokenizer = root, dist, tokenizer
        self.config_yaml, self.keep_last, self.hashes, self.keep_best = config_yaml, keep_last, hashes, keep_best

    def remove_own(self, run_id: str) -> int:
        """Remove run `run_id`'s checkpoints (rank 0, once the final model is saved); how many."""
        return remove_run_checkpoints(self.root, run_id)

    def protected(self, state: TrainState) -> int | None:
        """The step whose checkpoint rotation keeps (--save-best: the best evaluation's)."""
        return state.best_step if self.keep_best else None

    def check_finite(self, model, state: TrainState) -> None:
        """Never publish a non-finite state as one to resume from (a collective: every rank calls it)."""
        if not weights_finite(model, self.dist):
            raise TrainingDiverged(f"the weights at step {state.step} are not finite; no checkpoint was written "
                                   f"(lower --lr, then --resume auto from the last checkpoint)")

    def write_model(self, model, directory: Path) -> None:
        from sftune.modeling import save_model

        save_model(getattr(model, "model", model), self.tokenizer, directory)

    def load_weights(self, path: Path, model) -> None:
        """Checkpoint `path`'s weights into the run's `model`, in place, whatever wrote them (a collective: every rank
        calls): DCP shards, resharded to what `model` holds (FSDP's shards on any number of ranks, or whole
        tensors), or a whole model's tensors (every rank reads the file; under FSDP each keeps its shards)."""
        if is_sharded(path):
            load_model_shards(path, model, self.trainable_only)
        else:
            load_whole_model(path, model)

    def save(self, state: TrainState, model, optimizer, scheduler, scaler) -> Path:
        self.check_finite(model, state)
        final = self.root / f"step-{state.step}"
        rng_ranks = self.dist.gather(rng_state())  # each rank's generators: all are restored on resume
        self.written_by_rank_0(final, lambda: save_checkpoint(
            self.root, lambda directory: self.write_model(model, directory), optimizer, scheduler, scaler, state,
            self.config_yaml, self.keep_last, self.hashes, rng_ranks, self.protected(state)))
        return final

    def written_by_rank_0(self, final: Path, write) -> None:
        """`write()` on rank 0 (it publishes checkpoint `final` or raises `CheckpointNotWritten`) while the others
        wait; then, if it failed, every rank raises, so that all stop (or go on without the checkpoint:
        `--save-minutes`') alike."""
        failed = None
        if self.dist.is_main:
            try:
                write()
            except CheckpointNotWritten as e:
                failed = e
        self.dist.barrier()
        if self.dist.any(failed is not None):
            try:
                raise failed or CheckpointNotWritten(final, "rank 0 could not write it (its message says why)")
            finally:
                failed = None  # (a frame of the traceback holding the error would keep the failed write's files
                # open until a garbage collection: its disk could not be unmounted)

    def restore(self, path: Path, model, optimizer, scheduler, scaler) -> TrainState:
        """Any kind of checkpoint, into any kind of run: shards (written under FSDP) into whole tensors or into
        FSDP's shards on any number of ranks; a whole model's optimizer state into FSDP's shards."""
        if not holds_whole_model(path):  # (else the run's model was built from it)
            self.load_weights(path, model)
        load_optimizer = optimizer.load_state_dict  # (training_state.pt's optimizer state, by parameter index)
        if is_sharded(path):  # the optimizer state is in the shards, not in training_state.pt
            load_optimizer_shards(path, model, optimizer)
            load_optimizer = None
            if not self.dist.sharded:
                log(f"{path} holds FSDP shards: loaded as whole tensors (torch.distributed.checkpoint)")
        elif self.dist.sharded:  # every rank reads the whole optimizer state and keeps its shards of it
            load_optimizer = functools.partial(load_whole_optimizer, path, model, optimizer)
            log(f"{path} holds whole tensors: sharded over {self.dist.world_size} ranks")
        return load_training_state(path, load_optimizer, scheduler, scaler, self.dist.rank, mmap=self.dist.sharded)


class AdapterCheckpointer(FullCheckpointer):
    """LoRA: each checkpoint holds the adapter (as peft writes it, so `sftune eval` and `PeftModel.from_pretrained`
    load it too), the optimizer state of the adapter's weights, and the rest as a full checkpoint does; never a
    copy of the base, which a resume loads from `--model` as the run did."""

    def __init__(self, root: Path, dist: Dist, tokenizer, config_yaml: str, keep_last: int, hashes: bool,
                 keep_best: bool, peft_model, base: str):
        super().__init__(root, dist, tokenizer, config_yaml, keep_last, hashes, keep_best)
        self.peft_model, self.base = peft_model, base

    def write_model(self, model, directory: Path) -> None:
        from sftune.lora import save_adapter

        save_adapter(self.peft_model, self.tokenizer, directory, self.base)

    def load_weights(self, path: Path, model) -> None:
        """The adapter, which checkpoints written under FSDP hold whole too."""
        from sftune.lora import load_adapter_weights

        require_adapter(path)
        load_adapter_weights(self.peft_model, path)


class ShardedCheckpointer(FullCheckpointer):
    """FSDP: each rank writes its shards of the model and optimizer with torch.distributed.checkpoint (DCP) into
    the same staging directory; rank 0 adds the rest (scheduler, scaler, every rank's RNG, tokenizer, config,
    state.json last) and publishes by the same atomic rename. Resume loads the shards back into the sharded model,
    on any number of ranks (a whole model's checkpoint, written without FSDP, too), and the checkpoint holds no full
    copy of the model."""

    def gather(self, model) -> dict | None:
        """What rank 0 needs whole to write its files (a collective; nothing for a full model's shards)."""
        return None

    def write_files(self, directory: Path, gathered: dict | None) -> None:
        """Rank 0's files beside the shards."""
        self.tokenizer.save_pretrained(directory)

    def save(self, state: TrainState, model, optimizer, scheduler, scaler) -> Path:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        self.check_finite(model, state)
        final = self.root / f"step-{state.step}"
        staging = new_staging(self.root, state.step) if self.dist.is_main else final.with_name(f".staging-{final.name}")
        self.dist.barrier()
        try:
            shards = {"model": model_state(model, self.trainable_only),
                      "optim": get_optimizer_state_dict(model, optimizer)}
            dcp.save(shards, checkpoint_id=str(staging / DCP_DIR))
        except (Exception, dcp.CheckpointException) as e:  # (DCP's is a BaseException, raised on every rank)
            if self.dist.is_main:  # (the shards that were written take the disk the final model needs)
                shutil.rmtree(staging, ignore_errors=True)
            raise write_failed(final, e) from None
        gathered = self.gather(model)
        rng_ranks = self.dist.gather(rng_state())

        def write() -> None:  # (rank 0: the rest beside the shards, then the atomic rename)
            try:
                torch.save({"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_ranks[0],
                            "rng_ranks": rng_ranks}, staging / TRAINING_STATE)
                (staging / "config.yaml").write_text(self.config_yaml)
                self.write_files(staging, gathered)
                publish(staging, final, state, self.hashes)
            except Exception as e:
                shutil.rmtree(staging, ignore_errors=True)
                raise write_failed(final, e) from None
            rotate(self.root, state.run_id, self.keep_last, self.protected(state))

        self.written_by_rank_0(final, write)
        return final


class ShardedAdapterCheckpointer(ShardedCheckpointer):
    """LoRA under FSDP: the shards of the trained tensors (adapters, modules_to_save) and of their optimizer state in
    DCP, as for a sharded full model but without the frozen base, which a resume loads from `--model`; and the adapter
    gathered whole, as `AdapterCheckpointer` writes it, so `sftune eval` and `PeftModel.from_pretrained` load the
    checkpoint too."""

    trainable_only = True

    def __init__(self, root: Path, dist: Dist, tokenizer, config_yaml: str, keep_last: int, hashes: bool,
                 keep_best: bool, peft_model, base: str):
        super().__init__(root, dist, tokenizer, config_yaml, keep_last, hashes, keep_best)
        self.peft_model, self.base = peft_model, base

    def gather(self, model) -> dict:
        from sftune.lora import gathered_adapter

        return gathered_adapter(model)

    def write_files(self, directory: Path, gathered: dict | None) -> None:
        from sftune.lora import save_adapter

        save_adapter(self.peft_model, self.tokenizer, directory, self.base, gathered)

    def load_weights(self, path: Path, model) -> None:
        """The adapter's shards, or a whole adapter (written without FSDP) sharded as it loads."""
        from sftune.lora import load_whole_adapter_into_shards

        require_adapter(path)
        if is_sharded(path):
            load_model_shards(path, model, self.trainable_only)
        else:
            load_whole_adapter_into_shards(self.peft_model, model, path)


def require_adapter(path: Path) -> None:
    from sftune.lora import ADAPTER_WEIGHTS

    if not (path / ADAPTER_WEIGHTS).is_file():
        raise SftuneError(f"{path} holds no LoRA adapter (it was written by a full fine-tune); resume it "
                          f"without --lora-r")
