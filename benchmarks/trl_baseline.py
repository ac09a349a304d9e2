"""The peer column: TRL's SFTTrainer on the same model, data and settings as an sftune run (issues 9-11).

    python3 benchmarks/trl_baseline.py --device cuda                                  # GPT-2 small, the seed's recipe
    python3 benchmarks/trl_baseline.py --device cuda --model-config examples/llama-1b --tokenizer bundled:gpt2 \\
        --packing --max-length 1024 --batch-size 8 --lr 3e-4 [--lora-r 16] [--no-gradient-checkpointing]
    python3 benchmarks/trl_baseline.py --json out.json ...                            # also write the figures

The model is built from a config with random weights (seed 0), the data is SST-2's train split (its `sentence`
column as text), in bf16 on a GPU. TRL's defaults are kept except what the comparison fixes: batch size, lr,
max_length, packing, LoRA (r, alpha = 2r, all-linear, no dropout: sftune's --lora-r defaults) and gradient
checkpointing (TRL's default is on; `--no-gradient-checkpointing` for the like-for-like row). Prints real tok/s
(non-pad tokens counted on the device at each forward, over the steps after `--warmup`), ms/step, peak GPU
memory and MFU (6N + 12 x layers x context x width per token, sftune's `flops_per_token`, 4N for LoRA; the
context is the rows' mean length, packed: the examples' mean length, as sftune counts it; try 125's figures were
printed with the packed row's 1,024 and read higher, 7.4% and 8.5% against 7.0% and 7.8%).
Needs `trl` (not an sftune dependency: ../shared/tools/gpu-prep.sh carries its wheel to the GPU machine).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model-config", default=str(SHARED / "models" / "gpt2"), help="directory with config.json")
    p.add_argument("--tokenizer", default=str(SHARED / "models" / "gpt2"))
    p.add_argument("--dataset", default=str(SHARED / "data" / "sst2" / "data" / "train-00000-of-00001.parquet"))
    p.add_argument("--text-column", default="sentence")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--packing", action="store_true")
    p.add_argument("--lora-r", type=int)
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--warmup", type=int, default=10, help="steps not measured")
    p.add_argument("--steps", type=int, default=30, help="steps measured")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()

    import torch
    from datasets import load_dataset
    from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from sftune.modeling import load_tokenizer
    from sftune.runtime import flops_per_token, peak_flops

    gpu = args.device == "cuda"
    tokenizer = load_tokenizer(args.tokenizer)
    config = AutoConfig.from_pretrained(args.model_config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    data = load_dataset("parquet" if args.dataset.endswith(".parquet") else "json", data_files=args.dataset,
                        split="train")
    data = data.rename_column(args.text_column, "text") if args.text_column != "text" else data
    data = data.select_columns(["text"])

    counted = {"tokens": torch.zeros((), dtype=torch.long), "forwards": 0}

    def count(_module, _args, kwargs):  # real tokens of each forward, summed on the device: no sync
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        n = mask.sum() if mask is not None else torch.tensor(ids.numel())
        counted["tokens"] = counted["tokens"].to(n.device) + n
        counted["forwards"] += 1

    class Clock(TrainerCallback):
        def __init__(self):
            self.start = self.tokens = None

        def on_step_begin(self, targs, state, control, **kw):
            if state.global_step == args.warmup:
                if gpu:
                    torch.cuda.synchronize()
                self.start, self.tokens = time.perf_counter(), int(counted["tokens"])

        def on_train_end(self, targs, state, control, **kw):
            if gpu:
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.start
            self.tokens = int(counted["tokens"]) - self.tokens

    peft_config = None
    if args.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        sft = SFTConfig(output_dir=tmp, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch_size,
                        learning_rate=args.lr, lr_scheduler_type="constant", max_length=args.max_length,
                        packing=args.packing, bf16=gpu, gradient_checkpointing=not args.no_gradient_checkpointing,
                        logging_steps=10, report_to="none", save_strategy="no", use_cpu=not gpu,
                        dataset_text_field="text", seed=0)
        trainer = SFTTrainer(model=model, args=sft, train_dataset=data, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[clock])
        trainer.model.register_forward_pre_hook(count, with_kwargs=True)
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started

    rows = args.batch_size * args.steps
    if args.packing:  # (attention within each packed example: over the examples' mean length, as sftune's MFU)
        sample = data.select(range(min(len(data), 2000)))["text"]
        context = sum(len(tokenizer(text)["input_ids"]) + 1 for text in sample) / len(sample)  # (+ EOS)
    else:
        context = clock.tokens / max(rows, 1)
    result = {"card": torch.cuda.get_device_name(0) if gpu else "cpu", "trl": __import__("trl").__version__,
              "model": args.model_config, "packing": args.packing, "batch_size": args.batch_size,
              "lora_r": args.lora_r, "gradient_checkpointing": not args.no_gradient_checkpointing,
              "steps": args.steps, "real_tok_s": clock.tokens / clock.seconds,
              "ms_per_step": 1000 * clock.seconds / args.steps, "wall_s": wall,
              "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if gpu else None, "mfu_context": context}
    peak = peak_flops(torch.device("cuda"), "bf16") if gpu else None
    if peak:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        result["mfu"] = result["real_tok_s"] * flops_per_token(base, context, frozen_base=bool(args.lora_r)) / peak
    print(f"TRL {result['trl']} SFTTrainer on {result['card']}: {result['real_tok_s']:,.0f} real tok/s, "
          f"{result['ms_per_step']:.1f} ms/step"
          + (f", MFU {100 * result['mfu']:.1f}%" if "mfu" in result else "")
          + (f", peak {result['peak_gpu_mb']:,.0f} MB" if gpu else "")
          + f" ({'LoRA r ' + str(args.lora_r) if args.lora_r else 'full'}, gradient checkpointing "
            f"{'on' if result['gradient_checkpointing'] else 'off'}, packing {'on' if args.packing else 'off'})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
