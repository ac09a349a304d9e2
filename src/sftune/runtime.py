"""Where and in what precision the model runs.

Master weights stay fp32; bf16/fp16 are applied by autocast to the forward
pass (matrix products in low precision, reductions in fp32).
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from sftune.errors import SftuneError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SftuneError("device 'cuda' was asked for but no CUDA GPU is visible; use --device auto or --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' -> bf16 where the hardware computes it natively, else fp16 on older GPUs, else fp32."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_bf16() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise SftuneError("precision 'fp16' needs a CUDA GPU; on CPU use --precision bf16 or --precision fp32")
    return name


def autocast(device: torch.device, precision: str):
    """Context for the forward pass: autocast to bf16/fp16, or nothing for fp32."""
    dtype = DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
