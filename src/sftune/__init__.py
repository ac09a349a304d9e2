"""sftune: supervised fine-tuning (SFT) of causal language models, the first stage of RLHF.

    import sftune
    cfg = sftune.load_config("configs/quickstart.yaml", max_steps=20)
    result = sftune.train(cfg)                       # -> TrainResult (output_dir, evals, ...)

The names below are imported on first use (PEP 562), so that `sftune --help` and the command line's config
checks answer without loading torch and transformers (3 s of imports on 2 cores).
"""

import importlib
import os
import sys
import types

# oneDNN (torch's CPU matrix kernels) keeps up to 1,024 compiled primitives with their buffers, a set per batch
# shape: a CPU run of GPT-2 small at the seed's recipe reached 16.8 GB of RSS in 300 steps, 10.5 GB with 256 kept,
# at the same speed and with the same losses (benchmarks/NOTES.md try 63). Read when torch first computes on a
# CPU; a value set in the environment wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")

_EXPORTS = {
    "IGNORE_INDEX": "sftune.batching", "collate": "sftune.batching",
    "SFTConfig": "sftune.config", "load_config": "sftune.config", "resolve_config": "sftune.config",
    "DataOptions": "sftune.data", "Examples": "sftune.data", "PreparedData": "sftune.data", "prepare_data": "sftune.data",
    "SftuneError": "sftune.errors",
    "EvalResult": "sftune.evaluate", "evaluate": "sftune.evaluate",
    "generate": "sftune.generate:complete",
    "load_model": "sftune.modeling", "load_tokenizer": "sftune.modeling", "save_model": "sftune.modeling",
    "TrainResult": "sftune.train", "train": "sftune.train",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sftune' has no attribute {name!r}")
    module, _, attr = _EXPORTS[name].partition(":")
    value = getattr(importlib.import_module(module), attr or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


class _Package(types.ModuleType):
    """Importing a submodule binds it on the package (`sftune.train` = the module `sftune/train.py`); where an
    exported function has the submodule's name (train, evaluate, generate), the function is bound instead, as an
    eager `from sftune.train import train` here would have done."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and name in _EXPORTS and value.__name__ == f"sftune.{name}":
            module, _, attr = _EXPORTS[name].partition(":")
            if module == value.__name__:
                value = getattr(value, attr or name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
