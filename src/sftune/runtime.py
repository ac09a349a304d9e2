"""Where and in what precision the model runs.

Master weights stay fp32; bf16/fp16 are applied by autocast to the forward
pass (matrix products in low precision, reductions in fp32).
"""

from __future__ import annotations

import contextlib
import random
import threading

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


def prime_cpu_math() -> None:
    """Call each of MKL's vector math functions that torch uses on a CPU (exp, log, tanh, ...) once, on this thread
    alone. MKL sets itself up on its first call; when that first call is two threads' at once (a tensor large
    enough for torch to split over its threads), one thread's half was sometimes computed far less accurately (exp
    1e-4 off instead of 5e-8): a process's first loss then differed, in about one process in 15 (GPT-2's quick start:
    val loss 10.839513 instead of 10.839508; benchmarks/NOTES.md try 86). Microseconds; idempotent."""
    for dtype in (torch.float32, torch.float64):
        x = torch.full((8,), 0.5, dtype=dtype)  # (8 elements: under torch's grain size, computed on this thread)
        for f in (torch.exp, torch.log, torch.tanh, torch.erf, torch.erfc, torch.sqrt, torch.sin, torch.cos,
                  torch.tan, torch.log2, torch.log10, torch.asin, torch.acos, torch.atan, torch.erfinv, torch.trunc):
            f(x)


def keep_freed_memory(device: torch.device) -> bool:
    """On a CPU `device`, let freed tensors' memory stay in the process (glibc's malloc; elsewhere nothing happens).

    glibc serves every block over 32 MB with a fresh mmap and unmaps it when freed, so each step's big temporaries
    (GPT-2's 154 MB head gradient and its casts, the weights' bf16 copies, the logits chunks) come back as new
    pages, zero-filled by the kernel one fault at a time: 0.9 GB and 330-390 ms of system time a step for GPT-2 small
    at the seed's recipe on a 2-core Xeon, and -17% step time without them (benchmarks/NOTES.md try 59). With mmap
    off and a high trim threshold the freed blocks are reused; the process keeps its peak memory until it exits
    (peak RSS measured +0.1 to +0.8 GB, and 0.9 GB less in a 100-step run). Returns whether it was applied."""
    import ctypes
    import sys

    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # (not glibc: musl has no mallopt)
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # (malloc.h)
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**30))


def out_of_memory(e: BaseException) -> str | None:
    """The first line of `e` (200 characters at most) if it is a GPU's out-of-memory error or a CPU allocation that
    failed; else None."""
    if isinstance(e, torch.OutOfMemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(e):
        return (str(e).splitlines() or [""])[0][:200]
    return None


def compile_failure(e: BaseException) -> str | None:
    """The first line of `e` (300 characters at most) if a torch.compile backend failed to compile (inductor with no
    working C++ compiler on a CPU, or no Triton on a GPU, say); else None."""
    from torch._dynamo.exc import BackendCompilerFailed

    if isinstance(e, BackendCompilerFailed):
        return (str(e).strip().splitlines() or [""])[0][:300]
    return None


def warm_up(device: torch.device, precision: str) -> threading.Thread | None:
    """On a CUDA GPU: a thread that makes the first calls of the libraries a step uses (cuBLAS's products, SDPA's
    flash kernel, a norm, the loss, their backward) on tiny tensors, so that their start-up (most of the 2.8 s of
    the first evaluation on an H100, `benchmarks/NOTES.md` try 64) overlaps the host's data preparation; join it
    before the model is built (a CUDA graph captured while it runs would fail). No random numbers are drawn; an
    error here is left for the real call to meet and report."""
    if device.type != "cuda":
        return None

    def first_calls() -> None:
        try:
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
            x = torch.ones(64, 64, device=device, dtype=dtype, requires_grad=True)
            q = torch.ones(1, 2, 16, 64, device=device, dtype=dtype, requires_grad=True)
            attention = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
            hidden = torch.nn.functional.layer_norm((x @ x).float(), (64,))
            targets = torch.zeros(64, dtype=torch.long, device=device)
            (torch.nn.functional.cross_entropy(hidden, targets) + attention.float().sum()).backward()
            torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001 (a warm-up only)
            pass

    thread = threading.Thread(target=first_calls, name="sftune-warm-up", daemon=True)
    thread.start()
    return thread


def gpu_computes_bf16(device: torch.device) -> bool:
    """Whether this GPU computes bf16 natively: NVIDIA's from Ampere (compute capability 8.0: A100, RTX 30xx) on, and
    AMD's. `torch.cuda.is_bf16_supported()` also says yes for a T4 or V100, where bf16 products are emulated without
    tensor cores, several times slower than fp16 (its default counts emulation)."""
    return bool(torch.version.hip) or bf16_native_capability(torch.cuda.get_device_capability(device))


AMPERE = (8, 0)  # the first CUDA compute capability with bf16 tensor cores (and flash attention's kernels)


def bf16_native_capability(capability: tuple[int, int]) -> bool:
    """A CUDA compute capability (major, minor) with bf16 tensor cores: Ampere's, 8.0, and later.

    >>> bf16_native_capability((7, 5)), bf16_native_capability((8, 0)), bf16_native_capability((9, 0))
    (False, True, True)
    """
    return tuple(capability) >= AMPERE


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' -> bf16 where the hardware computes it natively, else fp16 on older GPUs, else fp32."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if gpu_computes_bf16(device) else "fp16"
        return "bf16" if cpu_has_bf16() else "fp32"
    return name


def autocast(device: torch.device, precision: str, cache: bool = True):
    """Context for the forward pass: autocast to bf16/fp16, or nothing for fp32. `cache=False` casts the weights
    anew at each use (what a CUDA graph capture needs: a cached cast would outlive the graph)."""
    dtype = DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


def untested_versions(requirements: list[str] | None = None) -> list[tuple[str, str, str]]:
    """The installed packages outside the ranges in `requirements` (default: the ones sftune's installed metadata
    names, which are the versions its suite passes with), each as (name, version, range). Empty for a source tree
    run without being installed (there is no metadata to read)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    if requirements is None:
        try:
            requirements = metadata.requires("sftune") or []
        except metadata.PackageNotFoundError:
            return []
    found = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra's (the test tools)
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            continue  # (not installed: its import says so where it is needed)
        if not req.specifier.contains(version, prereleases=True):
            found.append((req.name, version, str(req.specifier)))
    return found


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Dense peak matrix throughput of one GPU in bf16/fp16, FLOP/s (vendor data sheets, without sparsity; fp16 for the
# V100 and T4, which have no bf16), by a fragment of torch.cuda.get_device_name(); the first fragment found wins (so
# "H100 PCIe" before "H100", "L40S" and "L40" before "L4").
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("B200", 2250e12), ("A100", 312e12),
                   ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("V100-PCIE", 112e12), ("V100", 125e12),
                   ("T4", 65e12))


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The GPU's peak bf16/fp16 rate, for MFU; None on a CPU, in fp32, or for a GPU not in the table."""
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    return card_peak(torch.cuda.get_device_name(device))


def card_peak(name: str) -> float | None:
    """`PEAK_BF16_FLOPS` of the card `torch.cuda.get_device_name` calls `name`, or None."""
    return next((flops for fragment, flops in PEAK_BF16_FLOPS if fragment in name), None)


def flops_per_token(model, seq_len: float, frozen_base: bool = False) -> float:
    """Training FLOPs per token (the PaLM appendix / nanoGPT estimate): 6 per weight of every matrix the token
    goes through (2 forward, 4 backward) plus 12 x layers x width x sequence length for attention. With a frozen
    base (LoRA) the weights' own gradients are not computed: 4 per weight. The input embedding is a lookup (no
    FLOPs) unless it is also the output head. A mixture of experts: a token goes through `num_experts_per_tok` of
    the experts, so only that share of the experts' weights counts (the router and any shared expert in full)."""
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    total = sum(p.numel() for p in model.parameters())
    matrices = total - (0 if tied else embedding.weight.numel())
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if experts and top_k:  # (the experts' weights: `experts.*`, one slice of the leading dimension per expert)
        expert_weights = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
        matrices -= expert_weights * (experts - top_k) // experts
    return (4 if frozen_base else 6) * matrices + 12 * layers * width * seq_len
