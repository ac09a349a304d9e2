"""sftune: supervised fine-tuning (SFT) of causal language models, the first stage of RLHF.

    import sftune
    cfg = sftune.load_config("configs/quickstart.yaml", max_steps=20)
    result = sftune.train(cfg)                       # -> TrainResult (output_dir, evals, ...)
"""

from sftune.batching import IGNORE_INDEX, collate
from sftune.config import SFTConfig, load_config, resolve_config
from sftune.data import DataOptions, Examples, PreparedData, prepare_data
from sftune.errors import SftuneError
from sftune.evaluate import EvalResult, evaluate
from sftune.generate import complete as generate
from sftune.modeling import load_model, load_tokenizer, save_model
from sftune.train import TrainResult, train

__all__ = [
    "IGNORE_INDEX", "DataOptions", "EvalResult", "Examples", "PreparedData", "SFTConfig", "SftuneError", "TrainResult", "collate",
    "evaluate", "generate", "load_config", "load_model", "load_tokenizer", "prepare_data", "resolve_config",
    "save_model", "train",
]
__version__ = "0.1.0"
