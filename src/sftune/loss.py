"""Token-weighted causal-LM loss, as a module that wraps the model.

The loss of an optimizer step is the sum of the token losses over every
supervised target of the step (all micro-batches, all ranks) divided by
their count. Averaging per-micro-batch means instead (the 2024
gradient-accumulation bug) weights short sequences more than long ones.
Position t predicts token t+1, so a row of n supervised tokens has n-1 targets.

`CausalLMLoss` is the model and its loss in one `nn.Module`: its forward takes a
collated batch and returns the SUM of the batch's token losses. DDP, FSDP and peft
wrap this module, so everything the loss touches (the body's hidden states, the
output head) runs inside the forward they see. The targets' positions come from
the host (`batching.with_targets`): no boolean indexing on the device, so no sync.

    >>> import torch; from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = CausalLMLoss(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=1, vocab_size=11)))
    >>> batch = {"input_ids": torch.tensor([[1, 2, 3]]), "target_positions": torch.tensor([0, 1]),
    ...          "targets": torch.tensor([2, 3])}
    >>> model(batch).shape    # a scalar: the sum over the 2 targets
    torch.Size([])
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sftune.attention import FLEX_NAME
from sftune.attention import NAME as VARLEN
from sftune.attention import flex_inputs, varlen_inputs
from sftune.batching import ATTENTION_KEYS, DEVICE_KEYS, IGNORE_INDEX, ROUTER_KEYS
from sftune.fused_loss import CE_CHUNK_ROWS, ChunkMath, LinearCrossEntropySum, aligned_cast
from sftune.neftune import NoisyEmbeddings, example_lengths
from sftune.runtime import prime_cpu_math

prime_cpu_math()  # (before anything computes a loss: its exp is the first large one a CPU run makes)

# How the logits of each model type whose projection is fused with the loss come from its final hidden states h
# and its output head W (no bias): z = h @ W.T, times a constant (Cohere's `logit_scale`, 1 / Granite's
# `logits_scaling`, Falcon-H1's `lm_head_multiplier`), then soft-capped as cap * tanh(z / cap) (Gemma 2 and 3's
# `final_logit_softcapping`; a 256k vocabulary, where the (B, T, V) logits cost most). (scale, cap) from the
# model's config; every type is checked against its own forward (tests/test_families.py). Other types compute their
# logits themselves.
PLAIN_LOGITS = ("gpt2", "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gpt_neox", "phi3",
                "olmo", "olmo2", "smollm3", "gemma", "starcoder2", "stablelm", "gpt_bigcode", "opt", "bloom", "olmoe",
                "phimoe", "glm4_moe", "ernie4_5_moe", "jetmoe", "gpt_oss", "olmo3", "qwen3_next", "exaone4", "glm",
                "glm4", "seed_oss", "arcee", "lfm2", "ernie4_5", "minimax", "deepseek_v3", "falcon", "helium",
                "apertus")
LOGIT_MAPS: dict[str, Callable[[object], tuple[float, float | None]]] = {
    **{model_type: lambda config: (1.0, None) for model_type in PLAIN_LOGITS},
    **{model_type: lambda config: (float(config.logit_scale), None) for model_type in ("cohere", "cohere2")},
    **{model_type: lambda config: (1.0 / config.logits_scaling, None) for model_type in ("granite", "granitemoe")},
    "falcon_h1": lambda config: (float(config.lm_head_multiplier), None),
    **{model_type: lambda config: (1.0, config.final_logit_softcapping) for model_type in ("gemma2", "gemma3_text")},
}
def output_head(model) -> nn.Module:
    """The module that computes the logits: the output embedding, or, when peft trains it as a `modules_to_save`
    module, the trained copy its wrapper forwards to (so a LoRA run that trains the head keeps the fused loss).
    peft's trainable-tokens wrapper (--add-tokens under LoRA) is returned itself: its `weight` is the head's with
    the trained rows in place."""
    head = model.get_output_embeddings()
    copies, active = getattr(head, "modules_to_save", None), getattr(head, "active_adapters", None)
    if isinstance(copies, nn.ModuleDict) and active and len(active) == 1 and not head.disable_adapters:
        return copies[active[0]]
    return head


def trained_rows(head) -> tuple[list[int], nn.Parameter] | None:
    """(indices, trained values) of the rows peft trains in a head that is otherwise frozen (its trainable tokens:
    --add-tokens under LoRA); None for any other head. The fused loss then computes the gradient of those rows
    alone, not of the whole (V, D) matrix (one (V x N) @ (N x D) product fewer a step)."""
    adapter = getattr(head, "token_adapter", None)
    if adapter is None or adapter.disable_adapters or adapter.merged or len(adapter.active_adapters) != 1:
        return None
    name = adapter.active_adapters[0]
    return adapter.token_indices[name], adapter.trainable_tokens_delta[name]


def supports_fused_ce(model) -> bool:
    head = output_head(model)
    layer = head.original_module if hasattr(head, "token_adapter") else head  # (under peft's trainable tokens)
    return (getattr(model.config, "model_type", None) in LOGIT_MAPS
            and isinstance(layer, torch.nn.Linear) and layer.bias is None)


def logit_map(model) -> tuple[float, float | None]:
    """(scale, soft cap) of a fused model's logits (`LOGIT_MAPS`)."""
    scale, cap = LOGIT_MAPS[model.config.model_type](model.config)
    return float(scale), (float(cap) if cap else None)


@dataclass(frozen=True)
class RouterLoss:
    """A mixture-of-experts model's load-balancing loss (Switch Transformer's, as its Hugging Face class computes it
    from the routers' logits), added to the training loss with the config's `router_aux_loss_coef`."""

    function: Callable  # transformers' `load_balancing_loss_func` of the model's own module
    experts: int
    top_k: int
    coefficient: float


def router_loss(model) -> RouterLoss | None:
    """The load-balancing loss a model's config asks for (`output_router_logits`), where its Hugging Face class
    computes one the usual way (`load_balancing_loss_func(router_logits, experts, top_k, attention_mask)` in its
    module, with `num_experts`, `num_experts_per_tok` and `router_aux_loss_coef` on the model); None otherwise
    (`modeling.router_loss_notice` then says it is left out)."""
    if not getattr(model.config, "output_router_logits", False):
        return None
    function = getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)
    experts, top_k = getattr(model, "num_experts", None), getattr(model, "num_experts_per_tok", None)
    coefficient = getattr(model, "router_aux_loss_coef", None)
    if function is None or not experts or not top_k or coefficient is None:
        return None
    if list(inspect.signature(function).parameters)[:4] != ["gate_logits", "num_experts", "top_k", "attention_mask"]:
        return None
    return RouterLoss(function, int(experts), int(top_k), float(coefficient))


def model_inputs(batch: dict[str, torch.Tensor], attention: str | None = None) -> dict:
    """The model's keyword arguments for a batch: no attention mask.

    Rows are right-padded, so under the causal mask a real token never sees padding: a mask would change only the
    padding's own outputs, which no target reads. Without one, attention takes the plain causal path (flash
    attention on a GPU, and shapes that a CUDA graph can capture). Packed rows carry `position_ids`: transformers
    then builds a block-diagonal causal mask from the positions restarting at 0, so no token sees another example.
    That detection needs `use_cache=False` (with a cache it silently attends across examples), so it is always set.
    `attention` "varlen" or "flex" (a model under `--attention varlen` or `flex`): the packed rows' sequence starts,
    or their block mask, go along instead (no mask from transformers).
    """
    if "position_ids" in batch:
        own = {"varlen": varlen_inputs, "flex": flex_inputs}[attention](batch) if attention else {}
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False, **own}
    return {"input_ids": batch["input_ids"], "use_cache": False}


def skip_padding_check(model: nn.Module) -> None:
    """Turn off transformers' check for padding without an attention mask in `model`'s forward.

    GPT-2-family classes (GPT-2, OpenAI GPT, ...) run it at every forward given no mask while the config names a pad
    token (as every model sftune saved does): `pad_token_id in input_ids[:, [-1, 0]]`, which reads the answer back
    from the GPU, a sync in each micro-batch's forward, and warns that padding may be attended to. Here no mask is
    passed on purpose (`model_inputs`: right padding under causal attention is exact), so the check only costs."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):  # (an instance attribute: nothing of it is saved)
            module.warn_if_padding_and_no_attention_mask = _no_padding_check


def _no_padding_check(input_ids, attention_mask) -> None:
    return None


class CausalLMLoss(nn.Module):
    """A causal LM whose forward returns the sum of next-token losses over a batch's targets.

    fused=True (default where `supports_fused_ce`) never builds the (B, T, V) logits: the final
    hidden states of the target positions only go through `LinearCrossEntropySum`, chunk by chunk.
    Divide by the step's total target count (all micro-batches, all ranks) for the step loss.
    """

    def __init__(self, model: nn.Module, fused: bool | None = None):
        super().__init__()
        self.model = model
        skip_padding_check(model)
        self.fused = supports_fused_ce(model) if fused is None else fused
        self.scale, self.cap = logit_map(model) if self.fused else (1.0, None)  # z * scale, then cap * tanh(z / cap)
        implementation = getattr(model.config, "_attn_implementation", None)
        self.attention = {VARLEN: "varlen", FLEX_NAME: "flex"}.get(implementation)  # sftune's own (attention.py)
        self._cast: tuple | None = None  # ((weight version, address, dtype), cast copy) of the output head
        self._rows: tuple | None = None  # ((indices, device), index tensor) of the head's trained rows (`head_rows`)
        self.cache_cast = True  # off while CUDA graphs capture the step (the cast must be part of the graph)
        self.correct: torch.Tensor | None = None  # in training: targets predicted exactly (argmax), on the device
        self.eval_correct: torch.Tensor | None = None  # the same while `evaluate` runs (kept apart from training's)
        self.chunk_math: ChunkMath | None = None  # the fused loss's per-chunk math compiled (GPU: `fuse_chunk_math`)
        self.chunk_rows = CE_CHUNK_ROWS  # rows of logits per chunk of the fused loss (set by `build`: `chunk_rows`)
        self.router = router_loss(model)  # mixture of experts: the routers' load-balancing loss, in training
        self.router_sum: torch.Tensor | None = None  # in training: sum over micro-batches of its loss x targets
        self.noise: NoisyEmbeddings | None = None  # NEFTune (`add_noise`): noise on the input embeddings in training

    def add_noise(self, alpha: float) -> None:
        """NEFTune: in training forwards, noise scaled alpha / sqrt(L x d), L each example's length (`neftune.py`)."""
        self.noise = NoisyEmbeddings(self.model, alpha)

    @property
    def device_keys(self) -> tuple[str, ...]:
        """What a batch brings to the device: the attention mask too for a router loss or NEFTune (its lengths), the
        packed rows' sequence starts only under `--attention varlen` (the one reader: a CUDA graph of another model
        must not take them, their count changes from batch to batch), their block mask tables only under `flex`."""
        keys = ROUTER_KEYS if self.router is not None or self.noise is not None else DEVICE_KEYS
        others = {k for name, own in ATTENTION_KEYS.items() if name != self.attention for k in own}
        return tuple(k for k in keys if k not in others)

    def take_correct(self) -> int:
        """Targets whose argmax prediction was right since the last call (training forwards only). note: syncs.
        The counter is zeroed in place: a captured CUDA graph keeps adding to the same tensor."""
        if self.correct is None:
            return 0
        correct = int(self.correct)
        self.correct.zero_()
        return correct

    def correct_counter(self) -> torch.Tensor:
        """The device counter of argmax hits (made on first use, then the same tensor for the whole run)."""
        if self.correct is None:
            self.correct = torch.zeros((), dtype=torch.long, device=next(self.model.parameters()).device)
        return self.correct

    def take_router_loss(self) -> float:
        """Sum over the training micro-batches since the last call of (load-balancing loss x targets): divided by
        their targets, the loss the routers were trained with (without the coefficient). note: syncs."""
        if self.router_sum is None:
            return 0.0
        total = float(self.router_sum)
        self.router_sum.zero_()
        return total

    def router_counter(self) -> torch.Tensor:
        """The device sum of (load-balancing loss x targets) (made on first use, then the same tensor)."""
        if self.router_sum is None:
            self.router_sum = torch.zeros((), device=self.correct_counter().device)
        return self.router_sum

    def counters(self) -> list[torch.Tensor]:
        """The device accumulators a training forward adds to (a CUDA graph's warm-up puts them back)."""
        return [self.correct_counter()] + ([self.router_counter()] if self.router is not None else [])

    def _count(self) -> torch.Tensor | None:
        return self.correct_counter() if self.training else self.eval_correct

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.noise is None or not self.training:
            return self.batch_loss(batch)
        self.noise.lengths = example_lengths(batch)
        try:
            return self.batch_loss(batch)
        finally:
            self.noise.lengths = None  # (generation between steps runs the embeddings without it)

    def batch_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = model_inputs(batch, self.attention)
        if self.router is not None:  # the routers' logits in training only (the validation loss is the token loss)
            inputs["output_router_logits"] = self.training
        positions, targets = batch["target_positions"], batch["targets"]
        if not self.fused:
            outputs = self.model(**inputs)
            logits = outputs.logits  # (B, T, V)
            picked = logits.reshape(-1, logits.shape[-1]).index_select(0, positions)  # (N, V): targets only
            if (correct := self._count()) is not None:  # (an ignored target, -100, is never an argmax)
                correct += (picked.detach().argmax(-1) == targets).sum()
            loss = F.cross_entropy(picked.to(torch.promote_types(picked.dtype, torch.float32)), targets,
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        else:
            outputs = self.model.base_model(**inputs)
            hidden = outputs.last_hidden_state  # (B, T, D)
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # (N, D)
            head = output_head(self.model)
            rows, values = self.head_rows(head, hidden.device)
            if rows is None:
                weight = head.weight
            else:  # only these rows train: the head's weight with them in place, as a constant
                with torch.no_grad():
                    weight = head.weight
            device_type = hidden.device.type
            dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
            with torch.autocast(device_type, enabled=False):
                loss = LinearCrossEntropySum.apply(hidden, weight, targets, self.cast_weight(weight, dtype),
                                                   self._count(), self.chunk_math, self.scale, self.cap, rows, values,
                                                   self.chunk_rows)
        if self.router is not None and self.training:
            if isinstance(outputs.router_logits, tuple) and outputs.router_logits:
                loss = self.add_router_loss(loss, outputs.router_logits, batch, targets)
            else:  # (transformers 5.17's Granite-MoE records none: its own class then adds 0)
                from sftune.console import log

                self.router = None
                log(f"warning: the {self.model.config.model_type} model returned no router logits (its transformers "
                    f"release does not record them), so it trains on the token loss only, without a load-balancing "
                    f"loss")
        return loss

    def add_router_loss(self, loss, router_logits, batch, targets) -> torch.Tensor:
        """`loss` (a sum over the batch's targets) whose gradient includes the routers' load-balancing loss times
        the coefficient and the batch's target count, and whose value is still the token loss (logged apart).

        The step divides the sum by all its targets, so the step trains on (token mean) + coefficient x (the
        micro-batches' load-balancing losses weighted by their targets): the coefficient's meaning whatever the
        accumulation, where Hugging Face's Trainer adds the coefficient once per micro-batch. Padding is left
        out of the routers' statistics (`attention_mask`: 1 on real tokens); without it a padded batch's
        padding would count as routed tokens."""
        router = self.router
        mask = batch.get("attention_mask")
        balance = router.function(router_logits, router.experts, router.top_k, mask)
        weighted = balance.float() * (targets != IGNORE_INDEX).sum()  # (no sync: counted on the device)
        self.router_counter().add_(weighted.detach())
        term = router.coefficient * weighted
        return loss + (term - term.detach())  # value: exactly `loss` (x - x is 0); gradient: also the term's

    def head_rows(self, head, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(indices on `device`, trained values) of the head's trained rows (`trained_rows`), or (None, None). The
        index tensor is made once (a CUDA graph cannot capture a copy from the host)."""
        found = trained_rows(head)
        if found is None:
            return None, None
        indices, values = found
        if self._rows is None or self._rows[0] != (tuple(indices), device):
            self._rows = ((tuple(indices), device), torch.tensor(indices, device=device))
        return self._rows[1], values

    def cast_weight(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The head's weight in `dtype`, cast once per update, so the micro-batches of a step (and the batches
        of an evaluation) share one cast. The optimizer must call `forget_cast` after each step (build.py
        registers it as a step hook): fused AdamW updates weights without bumping their version counter."""
        if weight.dtype == dtype:
            return weight.detach()
        if not self.cache_cast:
            return aligned_cast(weight, dtype)
        key = (weight._version, weight.data_ptr(), dtype)  # catches in-place changes that autograd sees
        if self._cast is None or self._cast[0] != key:
            self._cast = (key, aligned_cast(weight, dtype))
        return self._cast[1]

    def forget_cast(self, *_) -> None:
        """Drop the cached cast of the head's weight (an optimizer step hook: `(optimizer, args, kwargs)`)."""
        self._cast = None


def sum_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain reference: sum (not mean) of next-token cross-entropies over supervised targets.

    logits: (B, T, V) in any dtype (upcast to fp32 for the softmax); labels: (B, T) with -100
    where nothing is trained. Used by tests and benchmarks to check `CausalLMLoss`.
    """
    shifted = logits[:, :-1, :].float()  # (B, T-1, V): position t scores token t+1
    targets = labels[:, 1:]
    return F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")
