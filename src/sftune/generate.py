"""Sampling completions from a (fine-tuned) model.

    sftune generate --model runs/quickstart --prompt "the movie was" --num-samples 3
    sftune generate --model runs/chat --chat "Recommend a film."      # rendered with the model's chat template
"""

from __future__ import annotations

import contextlib
import math

import torch

from sftune.attention import generating
from sftune.errors import SftuneError, on_every_rank


@torch.no_grad()
def check_sampling(temperature: float, top_p: float, max_new_tokens: int, num_samples: int) -> None:
    """The sampling settings' mistakes, said before a model is loaded (`sftune generate`) or used."""
    if not math.isfinite(temperature) or temperature < 0:
        raise SftuneError(f"temperature must be 0 (greedy) or a positive number, got {temperature} (--temperature)")
    if not 0 < top_p <= 1:
        raise SftuneError(f"top_p must be in (0, 1], got {top_p} (--top-p)")
    for value, flag in ((max_new_tokens, "--max-new-tokens"), (num_samples, "--num-samples")):
        if value < 1:
            raise SftuneError(f"{flag} must be at least 1, got {value}")
    if temperature == 0 and num_samples > 1:  # (transformers refuses it: greedy decoding has one answer)
        raise SftuneError(f"--temperature 0 decodes greedily, which gives one completion, not --num-samples "
                          f"{num_samples}; sample with a --temperature above 0 (e.g. 0.8), or ask for one")


def check_prompts(tokenizer, prompts: list[str], chats: list[str], system: str | None = None,
                  tools: list[dict] | None = None) -> None:
    """The prompts' own mistakes that `complete` refuses (a prompt with no tokens; a chat message for a tokenizer
    without a chat template), said before a model is loaded (`sftune generate`: minutes for a large one)."""
    for message in chats:
        render_chat_prompt(tokenizer, message, system, tools)
    if any(not tokenizer(p)["input_ids"] for p in prompts):
        raise SftuneError("the prompt is empty after tokenization; give some text with --prompt")


def complete(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 40,
    temperature: float = 0.8,
    top_p: float = 0.95,
    num_samples: int = 1,
    seed: int = 0,
    chat: bool = False,
    system: str | None = None,
    tools: list[dict] | None = None,
    rendered: bool = False,
    synced: bool = False,
    quiet: bool = False,
) -> list[str]:
    """`num_samples` continuations of `prompt` (the prompt itself not included).

    temperature 0 means greedy decoding. Generation stops at EOS. With `chat`, the prompt
    is a user turn (after an optional `system` turn) rendered with the tokenizer's chat
    template and its generation prompt, as in training; generation also stops at the
    template's end-of-turn token. With `rendered` as well, the prompt is already rendered chat text (e.g. a
    validation example's prompt), used as it is. `synced`: every rank of a sharded (FSDP) model calls this in step,
    and each keeps running forwards until all have finished (their blocks all-gather their weights at each one).
    `quiet`: new tokens cut to the context without a warning (a training run's samples: said once, at its start).
    """
    check_sampling(temperature, top_p, max_new_tokens, num_samples)
    device = next(model.parameters()).device
    encoded, end_of_turn = encode_prompt(tokenizer, prompt, chat, system, tools, rendered)
    encoded = encoded.to(device)
    stop = [tokenizer.eos_token_id] + [i for i in end_of_turn if i != tokenizer.eos_token_id]
    if encoded["input_ids"].shape[1] == 0:
        raise SftuneError("the prompt is empty after tokenization; give some text with --prompt")
    from sftune.modeling import context_length

    context, prompt_len = context_length(model.config, tokenizer), encoded["input_ids"].shape[1]
    if prompt_len >= context:
        raise SftuneError(f"the prompt is {prompt_len} tokens, as long as the model's context of {context}: nothing can "
                          f"be generated after it; shorten it")
    if prompt_len + max_new_tokens > context:
        if not quiet:
            from sftune.console import log

            log(f"warning: {max_new_tokens} new tokens after a prompt of {prompt_len} exceed the model's context of "
                f"{context}; generating {context - prompt_len} (--max-new-tokens)")
        max_new_tokens = context - prompt_len
    sampling = temperature > 0
    out = _generate(model, encoded, tokenizer.pad_token_id, stop, max_new_tokens, seed, synced, num_samples=num_samples,
                    do_sample=sampling, temperature=temperature if sampling else None,
                    top_p=top_p if sampling else None, top_k=None)
    new_tokens = out[:, encoded["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def complete_greedily(model, tokenizer, prompts: list[tuple[str, bool]], max_new_tokens: int, chat: bool = False,
                      synced: bool = False) -> list[str]:
    """Greedy completions of several (prompt, already rendered) pairs, as `complete(..., temperature=0)` gives each
    one alone, in one generate call (a training run's samples at each evaluation: one forward a new token for all
    of them, not one a prompt and token). The prompts are left-padded, their
    positions counted from the attention mask, and each row is cut at its own first stop token, so a row is the one
    it would be alone up to the products' rounding over a padded batch (equal in fp32, tested). A prompt whose
    completion would not fit the model's context is completed alone (its new tokens cut to it)."""
    from sftune.modeling import context_length

    device = next(model.parameters()).device
    context = context_length(model.config, tokenizer)
    encoded = [encode_prompt(tokenizer, prompt, chat, rendered=rendered) for prompt, rendered in prompts]
    ids = [e["input_ids"][0] for e, _ in encoded]
    batched = [i for i, row in enumerate(ids) if 0 < len(row) and len(row) + max_new_tokens <= context]
    texts = {}
    if batched:
        stop = [tokenizer.eos_token_id] + [i for i in encoded[batched[0]][1] if i != tokenizer.eos_token_id]
        width = max(len(ids[i]) for i in batched)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        input_ids = torch.full((len(batched), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batched), width), dtype=torch.long)
        for row, i in enumerate(batched):
            input_ids[row, width - len(ids[i]):] = ids[i]
            attention_mask[row, width - len(ids[i]):] = 1
        inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
        out = _generate(model, inputs, pad, stop, max_new_tokens, seed=0, synced=synced, do_sample=False)
        for row, i in enumerate(batched):
            new = out[row, width:].tolist()
            ends = [k for k, token in enumerate(new) if token in stop]
            texts[i] = tokenizer.decode(new[: ends[0] + 1] if ends else new, skip_special_tokens=True)
    for i, (prompt, rendered) in enumerate(prompts):
        if i not in texts:
            texts[i] = complete(model, tokenizer, prompt, max_new_tokens, temperature=0.0, chat=chat,
                                rendered=rendered, synced=synced, quiet=True)[0]
    return [texts[i] for i in range(len(prompts))]


@torch.no_grad()
def _generate(model, inputs: dict, pad_id: int | None, stop: list[int], max_new_tokens: int, seed: int, synced: bool,
              num_samples: int = 1, **sampling):
    """`model.generate` in eval mode under SDPA, its random numbers its own, an out-of-memory said."""
    if getattr(model.config, "output_router_logits", False):  # a mixture of experts' load-balancing loss: not
        # needed to generate, and transformers' breaks on a left-padded batch (its mask against the cache's one token)
        sampling["output_router_logits"] = False
    was_training = model.training
    model.eval()
    device = inputs["input_ids"].device
    # the generators are seeded for this call only and restored after it: samples taken in the middle of training
    # must not move the training's random stream (dropout), or a run with sample prompts would differ from one without
    # (a LoRA run whose frozen base is kept in bf16 or fp16 generates in that precision, as it trained: `casts.
    # keep_frozen_matrices_in`; other models in their own dtype)
    cast = getattr(model, "sftune_base_cast", None)
    precision = torch.autocast(device.type, dtype=cast) if cast is not None else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), generating(model), precision:
        torch.manual_seed(seed)
        try:
            return model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
                pad_token_id=pad_id,
                eos_token_id=stop,
                **sampling,
                **({"synced_gpus": True} if synced else {}),
            )
        except (RuntimeError, MemoryError, ValueError) as e:  # (ValueError: a count past 2**63, "Overflow when ...")
            if isinstance(e, MemoryError) or "memory" in str(e).lower() or "overflow" in str(e).lower():
                raise SftuneError(f"out of memory generating {num_samples:,} samples of up to {max_new_tokens} "
                                  f"tokens; lower --num-samples (or --max-new-tokens)") from None
            raise
        finally:
            model.train(was_training)


def encode_prompt(tokenizer, prompt: str, chat: bool = False, system: str | None = None,
                  tools: list[dict] | None = None, rendered: bool = False) -> tuple[dict, list[int]]:
    """The prompt's tokens as `complete` generates from them (a chat prompt rendered with the template and its
    generation prompt, no special tokens added), and the template's end-of-turn ids (none for plain text)."""
    if not chat:
        return tokenizer(prompt, return_tensors="pt"), []
    if rendered:
        end_of_turn = end_of_turn_ids(tokenizer)
    else:
        prompt, end_of_turn = render_chat_prompt(tokenizer, prompt, system, tools)
    return tokenizer(prompt, return_tensors="pt", add_special_tokens=False), end_of_turn


def check_sample_prompts(prompts: list[str], tokenizer, context: int, max_new_tokens: int, chat: bool) -> None:
    """Before a run trains: each of `--sample-prompts` leaves room in the model's context for what is generated after
    it at each evaluation (one that fills it is an error; one that leaves less than --sample-max-new-tokens, a
    warning, said once)."""
    for i, prompt in enumerate(prompts):
        length = encode_prompt(tokenizer, prompt, chat)[0]["input_ids"].shape[1]
        if length >= context:
            raise on_every_rank(SftuneError(f"--sample-prompts: prompt {i + 1} ({prompt[:40]!r}{'...' if len(prompt) > 40 else ''}) "
                              f"is {length:,} tokens{' as the chat template renders it' if chat else ''}, as long as "
                              f"the model's context of {context:,}: nothing can be generated after it; shorten it, or "
                              f"leave it out of --sample-prompts"))
        if length + max_new_tokens > context:
            from sftune.console import log

            log(f"warning: --sample-prompts: after prompt {i + 1} ({length:,} tokens) only {context - length:,} of "
                f"--sample-max-new-tokens {max_new_tokens} fit the model's context of {context:,}; its samples are "
                f"that long")


def render_chat_prompt(tokenizer, user: str, system: str | None = None,
                       tools: list[dict] | None = None) -> tuple[str, list[int]]:
    """The text to generate from for one user turn (with the tools the model may call), and the template's
    end-of-turn special token ids."""
    if not default_template(tokenizer):
        raise SftuneError("this model's tokenizer has no chat template (it was not trained on chat data by sftune); "
                          "use --prompt for plain text")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # the template's own raise_exception, e.g. "System role not supported"
        fix = "leave out --system" if system else "check the model's chat template"
        raise SftuneError(f"the model's chat template refuses this prompt: {e}; {fix}") from None
    if tools and text == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True):
        raise SftuneError("the model's chat template does not write tools, so the model would not see them; "
                          "leave out --tools")
    return text, end_of_turn_ids(tokenizer)


def default_template(tokenizer) -> str:
    """The tokenizer's chat template ('' if none); of several named ones, the default."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) else ""


def end_of_turn_ids(tokenizer) -> list[int]:
    """The chat template's end-of-turn special token, as ids (empty when it ends turns with plain text)."""
    from sftune.data.templates import ChatTemplate

    try:
        marker = ChatTemplate(default_template(tokenizer), tokenizer).end_of_turn()
    except Exception:  # a template that cannot render the probe exchange: stop at EOS only
        return []
    end = tokenizer(marker, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return [i for i in end[:1] if i in special]
