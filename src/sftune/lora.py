"""LoRA adapters with peft: adding them to a model, saving and loading them strictly, and merging them.

A LoRA run trains low-rank updates of the chosen layers (peft `LoraConfig`; GPT-2's `Conv1D` layers get
`fan_in_fan_out`) and leaves every base weight as it was. Its output directory, and each checkpoint, holds
the adapter (`adapter_config.json`, `adapter_model.safetensors`) and the tokenizer, never a copy of the base:

    sftune train --model ../shared/models/gpt2 --lora-r 16 --dataset ../shared/data/sst2 --output-dir runs/lora
    sftune eval --model runs/lora --dataset ../shared/data/sst2        # the base is read from the adapter config
    sftune export runs/lora --merge runs/lora-merged                    # a full model for from_pretrained

Traps avoided here (each tested): a tied input/output embedding trained as `modules_to_save` stays tied (it
is one matrix, and the merged model keeps it one); adapter weights that do not fit the model they are
loaded into are an error, not a warning followed by a model that silently equals its base; the base a run
was trained on is written as an absolute path, so the adapter loads from any working directory.
"""

from __future__ import annotations

import json
import types
import warnings
from pathlib import Path

import torch

from sftune.console import log
from sftune.errors import SftuneError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_DIR = "base"  # a run on a randomly initialised base writes that base here: the adapter is useless without it


# peft's notices that say nothing to an sftune user: it sets fan_in_fan_out for GPT-2's Conv1D itself, it reads a
# deprecated transformers attribute, a given --base renames the base an adapter config names, and its conversion
# for transformers 5's fused experts (Mixtral, Qwen-MoE) says the rank and alpha patterns it adds for gate/up
# matched no module, though the adapter gets them (rank 2r per expert; sftune sets no pattern of its own)
PEFT_NOTICES = (".*fan_in_fan_out.*", ".*is_gradient_checkpointing.*", ".*base_model_name_or_path. was renamed.*",
                r".*(rank|alpha)_pattern keys did not match any targeted module.*")


def wrap_with_peft(model, settings):
    """peft's `get_peft_model`, without its notices (above)."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        for message in PEFT_NOTICES:
            warnings.filterwarnings("ignore", message=message)
        return get_peft_model(model, settings)


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def base_identity(model: str) -> str:
    """The base weights as a LoRA resume must find them again (an adapter means nothing on other weights): each
    weight file's name, size and modification time for a local directory (hashing gigabytes at every start would
    cost minutes); a Hub id as it is named."""
    import hashlib

    path = Path(model).expanduser()
    if not path.is_dir():
        return model
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json") and p.is_file()
                   and (p.suffix != ".json" or p.name.endswith("index.json")))
    return hashlib.sha256("|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                                   for p in files).encode()).hexdigest()


def adaptable_modules(model) -> list[str]:
    """Short names of the layers LoRA can adapt (linear, Conv1D, embedding), for error messages."""
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, Conv1D, torch.nn.Embedding)
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and isinstance(m, kinds)})


def _module_name(model, module) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None)


def modules_to_save(model, names: list[str]) -> tuple[list[str], bool]:
    """(modules to train in full, whether they must stay tied). On a model whose output head IS its input
    embedding (GPT-2, tie_word_embeddings), naming either one trains the one matrix: peft is given the head
    with `ensure_weight_tying` (naming the embedding alone would give it a trained copy while the head kept
    the old matrix: two matrices where the model has one, and a merge that unties them)."""
    if not names:
        return [], False
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    if not tied:
        return list(names), False
    head_name, embedding_name = _module_name(model, head), _module_name(model, embedding)
    tied_names = {head_name, embedding_name, head_name.rsplit(".", 1)[-1], embedding_name.rsplit(".", 1)[-1]}
    if not tied_names & set(names):
        return list(names), False
    return [n for n in names if n not in tied_names] + [head_name.rsplit(".", 1)[-1]], True


def trainable_tokens(model, ids: list[int], trained_in_full: list[str]) -> dict[str, list[int]] | None:
    """peft's `trainable_token_indices` for the rows of `ids` (the --add-tokens): in the input embedding, and in the
    output head unless it is the same matrix (peft ties that one itself) or a module trained in full. The adapter
    then holds these rows whole, so it works on any copy of the base grown to the tokenizer's length, however that
    copy's new rows were initialised (`PeftModel.from_pretrained` after `resize_token_embeddings`)."""
    if not ids:
        return None
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embedding.weight
    names = {module: _module_name(model, module) for module in (embedding, head) if module is not None}
    full = {module for module, name in names.items() if {name, name.rsplit(".", 1)[-1]} & set(trained_in_full)}
    if tied and full:  # one matrix, trained in full already
        return None
    return {name.rsplit(".", 1)[-1]: sorted(set(ids)) for module, name in names.items()
            if name and module not in full and not (tied and module is head)} or None


def lora_config(cfg, model, token_ids: list[int] = ()):
    """The peft `LoraConfig` for this run's options and model; `token_ids`: rows trained too (`trainable_tokens`)."""
    from peft import LoraConfig

    targets = cfg.lora_targets
    save, tie = modules_to_save(model, cfg.lora_modules_to_save)
    return LoraConfig(
        trainable_token_indices=trainable_tokens(model, list(token_ids), save),
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_r,
        lora_dropout=cfg.lora_dropout, bias="none", task_type="CAUSAL_LM",
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        modules_to_save=list(save) or None, ensure_weight_tying=tie,  # (a copy: peft rewrites the list it gets)
        use_dora=cfg.lora_use_dora, use_rslora=cfg.lora_use_rslora)


def add_lora(model, cfg, token_ids: list[int] = (), quiet: bool = False):
    """Wrap `model` (in place: its layers get LoRA branches) in a peft model; only adapter weights (and any
    `lora_modules_to_save`, and the rows of `token_ids`) train. Errors name the option to fix and the layers
    that exist."""
    settings = lora_config(cfg, model, token_ids)
    requested = list(settings.modules_to_save or [])  # peft renames these in place: a tied head becomes the
    # embedding's name in its config, and a config saved that way reloads untied (peft's own round trip)
    try:
        peft_model = wrap_with_peft(model, settings)
    except (ValueError, TypeError, KeyError) as e:
        raise SftuneError(f"LoRA cannot be added with --lora-targets {','.join(cfg.lora_targets)}"
                          f"{' and --lora-modules-to-save ' + ','.join(cfg.lora_modules_to_save) if cfg.lora_modules_to_save else ''}"
                          f": {str(e).splitlines()[0]} Layers of this model ({type(model).__name__}) LoRA can adapt: "
                          f"{', '.join(adaptable_modules(model)) or 'none'}; or use all-linear") from None
    if settings.ensure_weight_tying:
        inner = peft_model.get_base_model()
        trained = {id(p) for p in inner.get_input_embeddings().parameters() if p.requires_grad}
        if not any(id(p) in trained for p in inner.get_output_embeddings().parameters()):
            raise SftuneError("the model's input and output embeddings are one matrix, but peft made them two; train "
                              "neither (leave out --lora-modules-to-save) or upgrade peft")
    peft_model.sftune_modules_to_save = requested  # what `save_adapter` writes, so a reload ties the same way
    capture_safe_token_rows(peft_model)
    if not quiet:
        trained = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        total = sum(p.numel() for n, p in peft_model.named_parameters() if ".original_module." not in n)
        adapted = sorted({n.rsplit(".", 1)[-1] for n in settings.target_modules}) \
            if not isinstance(settings.target_modules, str) else [settings.target_modules]
        if parameters := sorted(getattr(settings, "target_parameters", None) or []):  # (a mixture of experts'
            adapted = [*adapted[:-1], f"{adapted[-1]} and the parameters {', '.join(parameters)}"]  # fused experts)
        full = f"; trained in full: {', '.join(requested)}" if requested else ""
        if rows := settings.trainable_token_indices:
            full += (f"; the rows of {len(token_ids)} token{'s' if len(token_ids) > 1 else ''} (--add-tokens) in "
                     f"{' and '.join(rows)}")
        tie = " (tied to the input embedding: one matrix)" if settings.ensure_weight_tying else ""
        variant = "DoRA" if settings.use_dora else "LoRA"
        scale = " (scale alpha / sqrt(r), rsLoRA)" if settings.use_rslora else ""
        log(f"{variant}: r {settings.r}, alpha {settings.lora_alpha:g}{scale}, dropout {settings.lora_dropout:g} on "
            f"{', '.join(adapted)}{full}{tie}: trains {trained:,} of {total:,} parameters ({100 * trained / total:.2f}%)"
            + (f"; LoRA+: the B matrices at {cfg.loraplus_lr_ratio:g} x lr" if cfg.loraplus_lr_ratio else ""))
    return peft_model


def capture_safe_token_rows(peft_model) -> None:
    """peft's trainable tokens (the --add-tokens rows under LoRA) merge their rows into the embedding at every
    forward with an index made from a Python list, `torch.tensor(indices).to(device)`: a host-to-device copy that a
    CUDA graph capture refuses (cudaErrorStreamCaptureUnsupported), so a LoRA run with added tokens would give up
    graphs on a GPU. Each such layer here merges the same rows with an index tensor made once per device, the first
    time it runs (an eager step: a capture is preceded by eager warm-up steps), and kept; the values are peft's."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    for module in peft_model.modules():
        if isinstance(module, TrainableTokensLayer):
            module.get_merged_weights = types.MethodType(_merged_weights_kept_index, module)


def _merged_weights_kept_index(layer, active_adapters) -> torch.Tensor:
    """`TrainableTokensLayer.get_merged_weights` (peft 0.20-0.21) with its row index kept on the device."""
    weight = layer.base_layer.weight
    kept = layer.__dict__.setdefault("sftune_row_index", {})
    for name in active_adapters:
        rows = tuple(layer.token_indices[name])
        index = kept.get((name, rows, weight.device))
        if index is None:
            index = kept[(name, rows, weight.device)] = torch.tensor(rows, dtype=torch.long, device=weight.device)
        weight = weight.index_copy(dim=0, index=index, source=layer.trainable_tokens_delta[name].to(weight))
    return weight


def check_lora(cfg, model_config, vocabulary: int, token_ids: list[int] = (), trust_remote_code: bool = False) -> None:
    """Add the adapter to a weightless (meta-device) copy of the model, grown to the tokenizer's `vocabulary`: a
    wrong target is reported in a second, before any weights load or any file is written."""
    from transformers import AutoModelForCausalLM

    from sftune.vocab import fit_embeddings

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
        fit_embeddings(skeleton, vocabulary)
        adapted = add_lora(skeleton, cfg, token_ids, quiet=True)  # (its A and B matrices on meta too)
    from peft.tuners.lora import LoraLayer

    ranks = {min(m.in_features, m.out_features) for m in adapted.modules() if isinstance(m, LoraLayer)}
    if ranks and cfg.lora_r > max(ranks):  # (B @ A has rank min(r, in, out): a larger r only costs memory)
        raise SftuneError(f"lora_r {cfg.lora_r:,} is larger than any adapted layer can use: an update of rank r to a "
                          f"layer of in x out has rank at most min(in, out), {max(ranks):,} at most here; lower "
                          f"--lora-r (8-64 is usual)")


def adapter_weights(peft_model) -> dict[str, torch.Tensor]:
    """The adapter's tensors, keyed as `adapter_model.safetensors` keys them."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model, save_embedding_layers=False)  # (as `save_adapter` writes it)


def gathered_adapter(loss_model) -> dict[str, torch.Tensor]:
    """An FSDP-sharded LoRA model's trained tensors (adapters, modules_to_save), whole, on rank 0's CPU (empty
    elsewhere), under every name the peft model has for them (peft looks a tied head up by its own name): what
    `save_adapter` writes. A collective: every rank calls it. The frozen base is never gathered."""
    import torch.distributed

    from sftune.dist import reshard

    reshard(loss_model)  # (after an evaluation the root's parameters are views of a bf16 all-gather buffer)
    main, gathered, found = torch.distributed.get_rank() == 0, {}, {}
    for name, p in loss_model.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            if id(p) not in found:
                whole = p.full_tensor() if hasattr(p, "full_tensor") else p  # (an all-gather of the shards)
                found[id(p)] = whole.detach().cpu() if main else None
            if main:
                gathered[f"base_model.{name}"] = found[id(p)]  # model.X (the loss module's name) -> peft's
    return gathered


def save_adapter(peft_model, tokenizer, directory: Path, base: str, gathered: dict | None = None) -> None:
    """Write the adapter and the tokenizer (with its chat template) into `directory`: what
    `PeftModel.from_pretrained(base_model, directory)` and `AutoPeftModelForCausalLM` load. `gathered`: the
    trained tensors of a sharded model (`gathered_adapter`), else they are read from `peft_model`."""
    settings = peft_model.peft_config["default"]
    settings.base_model_name_or_path = base
    # no full embedding matrices (peft's "auto" looks the base's vocabulary up, on the Hub for a Hub base, at every
    # save): modules_to_save are saved either way, and after --add-tokens the adapter holds the new rows
    peft_model.save_pretrained(directory, save_embedding_layers=False,
                               **({"state_dict": gathered} if gathered is not None else {}))
    requested = getattr(peft_model, "sftune_modules_to_save", None)
    if requested:  # the names as sftune gave them to peft (see `add_lora`)
        path = directory / ADAPTER_CONFIG
        path.write_text(json.dumps({**json.loads(path.read_text()), "modules_to_save": requested}, indent=2))
    (directory / "README.md").unlink(missing_ok=True)  # peft's model-card template: nothing of this run in it
    tokenizer.save_pretrained(directory)


def read_adapter(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(directory) / ADAPTER_WEIGHTS
    try:
        return load_file(path)
    except Exception as e:
        raise SftuneError(f"cannot read the adapter weights {path}: {e}") from None


def check_fits(directory: Path, saved: dict, expected: dict) -> None:
    """Every tensor of the model's adapter (`expected`: key -> shape, keyed as the file keys them) in the file
    (`saved`), of the same shape, and nothing left over: peft itself only warns, and the model is then its base."""
    missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & saved.keys() if tuple(expected[k]) != tuple(saved[k].shape))
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for what, keys in
                           (("missing", missing), ("not in the model", unexpected), ("other shapes", wrong)) if keys)
        raise SftuneError(f"the adapter in {directory} does not fit this base model ({detail}); it was trained on "
                          f"another base: give that one with --base")


def load_adapter_weights(peft_model, directory: Path) -> None:
    """Load `directory`'s adapter into `peft_model`, strictly (`check_fits`)."""
    from peft import set_peft_model_state_dict

    saved = read_adapter(directory)
    check_fits(directory, saved, {k: v.shape for k, v in adapter_weights(peft_model).items()})
    set_peft_model_state_dict(peft_model, saved)


def adapter_names(peft_model, loss_model) -> dict[str, str]:
    """The adapter file's keys -> the names of the loss module's parameters they hold: peft's own renaming (the one
    `save_adapter` writes through), applied to a probe that holds each parameter's index instead of its weights."""
    from peft import get_peft_model_state_dict

    names = [name for name, p in loss_model.named_parameters(remove_duplicate=False) if p.requires_grad]
    probe = {f"base_model.{name}": torch.tensor(i) for i, name in enumerate(names)}  # model.X -> peft's name
    keyed = get_peft_model_state_dict(peft_model, state_dict=probe, save_embedding_layers=False)
    return {key: names[int(index)] for key, index in keyed.items()}


def load_whole_adapter_into_shards(peft_model, loss_model, directory: Path) -> None:
    """A whole adapter (as any LoRA run writes it) into an FSDP-sharded LoRA model, strictly: each rank keeps its
    shards of each tensor (a collective: every rank calls it and reads the file, megabytes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from sftune.dist import reshard

    saved, names = read_adapter(directory), adapter_names(peft_model, loss_model)
    params = dict(loss_model.named_parameters(remove_duplicate=False))
    check_fits(directory, saved, {key: params[name].shape for key, name in names.items()})
    reshard(loss_model)  # (the root's parameters after an evaluation are not its shards)
    set_model_state_dict(loss_model, {names[key]: tensor for key, tensor in saved.items()},
                         options=StateDictOptions(full_state_dict=True, strict=False))


def adapter_base(directory: str | Path, base: str | None = None) -> str:
    """The base model of an adapter: `base` when given, else the run's own `base/` (a randomly initialised base),
    else the one its adapter config names."""
    directory = Path(directory).expanduser()
    if base:
        return base
    if (directory / BASE_DIR / "config.json").is_file():
        return str(directory / BASE_DIR)
    try:
        named = json.loads((directory / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise SftuneError(f"cannot read {directory / ADAPTER_CONFIG}: {e}") from None
    if not named:
        raise SftuneError(f"the adapter in {directory} does not name its base model; give it with --base")
    return named


def load_adapter_model(directory: str | Path, base: str | None = None, trust_remote_code: bool = False,
                       merge: bool = True):
    """The base model with the adapter of `directory` loaded strictly, merged into a plain Hugging Face model
    (`merge`), else the peft model."""
    from peft import LoraConfig

    from sftune.modeling import load_model

    directory = Path(directory).expanduser()
    base_name = adapter_base(directory, base)
    if Path(base_name).is_absolute() and not Path(base_name).is_dir():
        raise SftuneError(f"the base model of the adapter in {directory} is not found at {base_name}; give it with "
                          f"--base NAME_OR_PATH")
    try:
        settings = LoraConfig.from_pretrained(str(directory))
    except Exception as e:
        raise SftuneError(f"{directory / ADAPTER_CONFIG} is not a LoRA adapter config peft can read: {e}") from None
    try:
        model = load_model(base_name, "pretrained", trust_remote_code)
    except SftuneError as e:
        raise SftuneError(f"the base model {base_name!r} of the adapter in {directory} could not be loaded: "
                          f"{str(e).replace('--model', '--base')}") from None
    grow_for_adapter(model, directory, trust_remote_code)
    settings.inference_mode = True
    try:
        peft_model = wrap_with_peft(model, settings)
    except (ValueError, TypeError, KeyError) as e:
        raise SftuneError(f"the adapter in {directory} does not fit the base model {base_name} ({e}); give "
                          f"the base it was trained on with --base") from None
    load_adapter_weights(peft_model, directory)
    log(f"adapter: {directory} on base {base_name}")
    return merged_model(peft_model) if merge else peft_model


def grow_for_adapter(model, directory: Path, trust_remote_code: bool = False) -> None:
    """A base grown to the adapter's tokenizer (a run with --add-tokens): the adapter holds the new tokens' rows
    (`trainable_tokens`) or whole embedding matrices (`modules_to_save`), which need that many rows to load into."""
    from sftune.modeling import load_tokenizer
    from sftune.vocab import fit_embeddings

    if any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        fit_embeddings(model, len(load_tokenizer(str(directory), trust_remote_code, flag="the adapter's directory")))


def merged_model(peft_model):
    """The adapter merged into the base weights: a plain Hugging Face model with the same outputs, every weight
    trainable again, as a loaded model's (peft froze the base: a full fine-tune from a LoRA run trained nothing)."""
    return peft_model.merge_and_unload().requires_grad_(True)
