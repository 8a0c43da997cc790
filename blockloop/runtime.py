"""Where and how tensors compute: device and dtype resolution, autocast, seeds, threads, the
CPU memory allocator.

Every command resolves its `--device` and `--dtype` here, so one rule (and one error message)
holds for `train`, `sample`, `analyze` and the experiment runner.
"""

from __future__ import annotations

import ctypes
import re
from contextlib import nullcontext
from pathlib import Path

import torch

from blockloop.errors import ConfigError

DEVICES_HELP = "auto, cpu, cuda, cuda:N or mps"
# glibc's mallopt parameters (malloc.h) and the sizes blockloop sets them to.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30
_GLIBC_MMAP_MAX = 32 << 20  # the most glibc < 2.35 accepts on 64-bit

DTYPES = ("auto", "float32", "bfloat16", "float16")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64 finaliser), so nearby steps get unrelated seeds."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def check_device_name(device: str, key: str = "device") -> None:
    """Raise ConfigError unless `device` is spelled as one of DEVICES_HELP."""
    if not isinstance(device, str) or not (
        device in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", device)
    ):
        raise ConfigError(f"{key}={device!r}: must be {DEVICES_HELP}")


def resolve_device(device: str, key: str = "device") -> str:
    """The torch device to use for `device` ("auto": CUDA if available, else CPU).

    Raises ConfigError naming `key` for a misspelt device or one this machine does not have.
    """
    check_device_name(device, key)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={device!r} but CUDA is not available; use --{key}=cpu")
        count = torch.cuda.device_count()
        if device.startswith("cuda:") and int(device[5:]) >= count:
            raise ConfigError(
                f"{key}={device!r} but this machine has {count} CUDA device(s), "
                f"cuda:0 .. cuda:{count - 1}"
            )
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}='mps' but MPS is not available here; use --{key}=cpu")
    return device


def device_type(device: str) -> str:
    """"cuda" for any CUDA device, else the device string's type ("cpu", "mps")."""
    return "cuda" if str(device).startswith("cuda") else str(device).split(":")[0]


def resolve_dtype(dtype: str, device: str) -> str:
    """The compute dtype for `dtype` on `device` ("auto": bf16/fp16 on CUDA, float32 elsewhere).

    Raises ConfigError for float16 on the CPU, which torch's CPU autocast does not support.
    """
    kind = device_type(device)
    if dtype != "auto":
        if dtype == "float16" and kind == "cpu":
            raise ConfigError("dtype='float16' is not supported on CPU; use float32 or bfloat16")
        return dtype
    if kind == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def cpu_has_bf16_units() -> bool | None:
    """Whether this CPU computes bf16 natively (the avx512_bf16 or amx_bf16 flag in
    /proc/cpuinfo); None where the flags cannot be read (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set(re.findall(r"\b(avx512_bf16|amx_bf16)\b", text))
    return bool(flags)


def dtype_reason(dtype: str, device: str) -> str:
    """Why `resolve_dtype(dtype, device)` chose what it did, for the training log.

    On the CPU "auto" is float32 even where the CPU has bf16 units: bf16 autocast made the 6x384
    training step 2.5-2.8x faster on a CPU with AVX512-BF16 but 19x slower on an AVX2 CPU
    without bf16 units (BENCHMARKS.md, "CPU bf16"), and its loss parity with float32 on the CPU
    has not been benchmarked, so it is used only when asked."""
    if dtype != "auto":
        return "as set"
    if device_type(device) == "cuda":
        return "auto: bf16 where the GPU supports it, else float16"
    if device_type(device) != "cpu":
        return "auto: float32"
    units = cpu_has_bf16_units()
    has = {True: "has", False: "lacks", None: "may lack"}[units]
    return (f"auto: float32 on CPU (this CPU {has} bf16 units; --dtype=bfloat16 turns bf16 "
            f"autocast on, untested for loss parity on CPU)")


def autocast_context(device: str, dtype: str):
    """Autocast to `dtype` on `device`'s type; a no-op context for float32."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device_type(device), dtype=TORCH_DTYPES[dtype])


def unwrap(model):
    """The GPT inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks of up to 1 GiB for reuse; returns whether it did.

    A training step frees and reallocates the same activation buffers every step. By default
    glibc serves large blocks (from 128 KiB; the threshold moves up by itself only as far as
    32 MiB) with mmap and returns them to the system on free, so every step pays the page
    faults of zero-filling them again (about 10% of a CPU step at nanoGPT's 4x128 "baby" size,
    measured in benchmarks/bench_training.py). Raising the mmap and trim thresholds keeps them
    in the heap; peak memory is unchanged, but the process does not shrink between steps.
    glibc before 2.35 refuses an mmap threshold above 32 MiB, which is then used. Process-wide;
    does nothing (False) where the C library has no mallopt (macOS, musl)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mmap_set = any(mallopt(_M_MMAP_THRESHOLD, size) for size in (_KEEP_BYTES, _GLIBC_MMAP_MAX))
    return mmap_set and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
