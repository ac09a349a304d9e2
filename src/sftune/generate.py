"""Sampling completions from a (fine-tuned) model.

    sftune generate --model runs/quickstart --prompt "the movie was" --num-samples 3
"""

from __future__ import annotations

import torch

from sftune.errors import SftuneError


@torch.no_grad()
def complete(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 40,
    temperature: float = 0.8,
    top_p: float = 0.95,
    num_samples: int = 1,
    seed: int = 0,
) -> list[str]:
    """`num_samples` continuations of `prompt` (the prompt itself not included).

    temperature 0 means greedy decoding. Generation stops at EOS.
    """
    if temperature < 0:
        raise SftuneError(f"temperature must be 0 (greedy) or more, got {temperature} (--temperature)")
    if not 0 < top_p <= 1:
        raise SftuneError(f"top_p must be in (0, 1], got {top_p} (--top-p)")
    if max_new_tokens < 1 or num_samples < 1:
        raise SftuneError("--max-new-tokens and --num-samples must be at least 1")
    device = next(model.parameters()).device
    encoded = tokenizer(prompt, return_tensors="pt").to(device)
    if encoded["input_ids"].shape[1] == 0:
        raise SftuneError("the prompt is empty after tokenization; give some text with --prompt")
    torch.manual_seed(seed)
    sampling = temperature > 0
    was_training = model.training
    model.eval()
    out = model.generate(
        **encoded,
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=None,
        num_return_sequences=num_samples,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.train(was_training)
    new_tokens = out[:, encoded["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
