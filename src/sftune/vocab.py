"""Tokens added to a tokenizer (`--add-tokens`, `--pad-token`) and the rows that fit them in a model's embeddings.

A new token is one special token (never split); the model's input embedding, and its output head unless the two
are one matrix, grow to the tokenizer's length, each new row starting at the mean of the old ones; and every row,
the pad token's too, trains.
"""

from __future__ import annotations

import torch

from sftune.errors import SftuneError


def train_every_embedding_row(model) -> None:
    """Let the input embedding's `padding_idx` row train like the others.

    Llama-family classes build `nn.Embedding(vocab, width, padding_idx=config.pad_token_id)`, whose backward
    zeroes that row's gradient. sftune pads with EOS where a tokenizer has no pad token, and a saved model's config
    names its pad token, so a model sftune wrote (a checkpoint being resumed, or a run's output trained further)
    came back with the EOS row frozen, where the run that wrote it trained it: EOS ends each turn of a chat (an
    input whose embedding matters) and a mixture of experts routes it. Resuming then diverged from the
    uninterrupted run. Padding itself needs no frozen row: it sits after every real token, under the causal mask,
    outside every target and the routers' statistics, so its gradient is zero anyway."""
    embedding = model.get_input_embeddings()
    if isinstance(embedding, torch.nn.Embedding):
        embedding.padding_idx = None


def add_tokens(tokenizer, tokens: list[str]) -> list[str]:
    """`--add-tokens`: each of `tokens` the tokenizer lacks becomes one special token (never split, never
    normalised, left out of text decoded with skip_special_tokens), as TRL's `setup_chat_format` adds ChatML's
    markers. Returns the tokens added (the others were already in the vocabulary)."""
    from transformers import AddedToken

    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    for token in tokens:
        if len(tokenizer(token, add_special_tokens=False)["input_ids"]) != 1:  # (a slow tokenizer's own rules)
            raise SftuneError(f"the tokenizer still splits {token!r} after adding it as a token; use a fast "
                              f"tokenizer (--tokenizer) or leave it out of --add-tokens")
    return missing


def token_ids(tokenizer, tokens: list[str]) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def fit_embeddings(model, size: int) -> int:
    """Grow the model's input embedding, and its output head unless the two are one matrix, to `size` rows (the
    tokenizer's length after `add_tokens`); returns the rows added. A new row starts at the mean of the old rows,
    the same on every load (transformers' default draws it at random around that mean): its logit is then near the
    average of the others, so a new token is neither favoured nor ruled out before it is trained (Hewitt, 2021,
    "Initializing new word embeddings for pretrained language models")."""
    embedding = model.get_input_embeddings()
    old = embedding.weight.shape[0]
    if size <= old:
        return 0
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    try:
        model.resize_token_embeddings(size, mean_resizing=False)
    except (NotImplementedError, AttributeError, TypeError, ValueError) as e:
        raise SftuneError(f"the model ({type(model).__name__}) cannot grow its embeddings from {old:,} to {size:,} "
                          f"rows for the new tokens ({type(e).__name__}: {e}); leave out --add-tokens and "
                          f"--pad-token, or use a tokenizer whose tokens the model has") from None
    grown = [model.get_input_embeddings().weight]
    if head is not None and not tied:
        grown.append(model.get_output_embeddings().weight)
    with torch.no_grad():
        for weight in grown:
            weight[old:] = weight[:old].mean(0, dtype=torch.float32).to(weight.dtype)
    return size - old
