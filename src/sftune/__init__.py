"""sftune: supervised fine-tuning (SFT) of causal language models, the first stage of RLHF.

    import sftune
    cfg = sftune.load_config("configs/quickstart.yaml", max_steps=20)
    result = sftune.train(cfg)                       # -> TrainResult (output_dir, evals, ...)
"""

import importlib

# Names are imported on first use, so `sftune` (and a CLI error about a config key) starts without
# importing torch and transformers.
_EXPORTS = {
    "IGNORE_INDEX": "sftune.batching", "collate": "sftune.batching",
    "SFTConfig": "sftune.config", "load_config": "sftune.config", "resolve_config": "sftune.config",
    "Examples": "sftune.data", "PreparedData": "sftune.data", "prepare_data": "sftune.data",
    "SftuneError": "sftune.errors",
    "EvalResult": "sftune.evaluate", "evaluate": "sftune.evaluate",
    "load_model": "sftune.modeling", "load_tokenizer": "sftune.modeling", "save_model": "sftune.modeling",
    "TrainResult": "sftune.train", "train": "sftune.train",
}


def __getattr__(name: str):
    if name == "generate":
        return importlib.import_module("sftune.generate").complete
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sftune' has no attribute {name!r}")


__all__ = [
    "IGNORE_INDEX", "EvalResult", "Examples", "PreparedData", "SFTConfig", "SftuneError", "TrainResult", "collate",
    "evaluate", "generate", "load_config", "load_model", "load_tokenizer", "prepare_data", "resolve_config",
    "save_model", "train",
]
__version__ = "0.1.0"
