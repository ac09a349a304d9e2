"""Tier 1: a training run's samples at each evaluation come from one generate call over all the prompts, and each
is the completion its prompt gets alone (fp32: equal)."""

import copy

import pytest
import torch

from conftest import make_tiny_gpt2
from test_families import family_model

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def greedy_ids(model, tok, prompt: str, new: int) -> list[int]:
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("name", ["gpt2", "tiny-llama", "tiny-mixtral"])
def test_samples_generated_together_are_each_prompts_own(name, gpt2_tokenizer):
    """Prompts of different lengths, left-padded in one batch (positions from the mask: GPT-2's learned ones,
    Llama's rotary ones; a mixture of experts whose config asks for its routers' loss, which generating leaves
    out), give each the greedy tokens it gets alone; a row that meets its stop token ends there
    while the others go on; a prompt whose completion would pass the context is completed alone, cut to it."""
    from sftune.generate import complete, complete_greedily

    model = make_tiny_gpt2(seed=1) if name == "gpt2" else family_model(name, seed=1)
    model.config.max_position_embeddings = 128  # (the GPT-2's n_positions: both contexts 128)
    tok = copy.deepcopy(gpt2_tokenizer)
    tok.pad_token = tok.eos_token
    long = "the film" * 60  # 120 tokens: 8 new ones fit after it, not 16
    assert len(tok(long)["input_ids"]) == 120
    prompts = [("the movie is", False), ("a gripping , funny and", False), ("it", False), (long, False)]
    model.train()
    together = complete_greedily(model, tok, prompts, max_new_tokens=16)
    alone = [complete(model, tok, p, 16, temperature=0.0, quiet=True)[0] for p, _ in prompts]
    assert together == alone
    assert model.training  # (put back as it was)
    assert together[3] == tok.decode(greedy_ids(model.eval(), tok, long, 8))  # (8 = 128 - 120)

    # a stop token that one prompt meets (first) after some new tokens: its row ends there, the others' go on as alone
    for i, (prompt, _) in enumerate(prompts[:3]):
        ids = greedy_ids(model, tok, prompt, 16)
        if firsts := [k for k in range(1, 16) if ids[k] not in ids[:k]]:
            break
    tok.eos_token = tok.convert_ids_to_tokens(ids[firsts[0]])
    together = complete_greedily(model, tok, prompts[:3], max_new_tokens=16)
    alone = [complete(model, tok, p, 16, temperature=0.0)[0] for p, _ in prompts[:3]]
    assert together == alone
    assert alone[i] == tok.decode(ids[: firsts[0] + 1], skip_special_tokens=True)
    assert any(len(a) > len(alone[i]) for j, a in enumerate(alone) if j != i)


def test_chat_samples_generated_together_stop_at_their_end_of_turn(gpt2_tokenizer):
    """Chat: user prompts rendered with the template and a validation prompt already rendered, in one batch; each
    stops at the template's end-of-turn token as alone."""
    from sftune.generate import complete, complete_greedily, end_of_turn_ids

    tok = copy.deepcopy(gpt2_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.pad_token = tok.eos_token
    model = make_tiny_gpt2(seed=2).eval()
    model.resize_token_embeddings(len(tok))
    prompts = [("Recommend a film.", False), ("Hi", False),
               ("<|im_start|>user\nIs the remake any good?<|im_end|>\n<|im_start|>assistant\n", True)]
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    end, likely = end_of_turn_ids(tok)[0], greedy_ids(model, tok, rendered, 3)[2]
    with torch.no_grad():  # the end of turn wins where that token would (with a positive logit): "Hi" stops early
        model.lm_head.weight[end] = 1.5 * model.lm_head.weight[likely]
    together = complete_greedily(model, tok, prompts, max_new_tokens=12, chat=True)
    alone = [complete(model, tok, p, 12, temperature=0.0, chat=True, rendered=r)[0] for p, r in prompts]
    assert together == alone
    assert min(len(tok(a)["input_ids"]) for a in alone) < 12
