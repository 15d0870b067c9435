"""Where and in which precision to compute: device and dtype names resolved once, for the library, the
trainer and the command line alike."""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable

import torch

from .errors import ConfigError
from .precision import ALIASES

__all__ = ["DTYPES", "bf16_supported", "release_free_memory", "resolve_device", "resolve_dtype"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # precision.PRECISIONS


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None`/"auto": CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"invalid device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available")
    return dev


def bf16_supported(device: torch.device) -> bool:
    """Whether bfloat16 matrix multiplies are native (fast) on `device`: CUDA with bf16, or a CPU with
    AVX512-BF16 / AMX as oneDNN reports it."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Compute precision. fp16 is refused on CPU, where PyTorch's half kernels are missing or slow;
    "auto" is bfloat16 where :func:`bf16_supported`, else float32."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    if isinstance(dtype, str):
        dtype = ALIASES.get(dtype, dtype)
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("float16 is not supported on CPU; use bfloat16 (the CPU half precision)")
    return dtype


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; musl has none
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Give the C heap's free pages back to the operating system (glibc ``malloc_trim``; nothing elsewhere).
    Freed tensors below glibc's mmap threshold (which rises to 32 MiB as large tensors are freed) stay in
    the heap, fragmented, and keep counting as resident memory: a bf16 load of ProtT5-XL read from float32
    files kept 0.6 GiB it no longer used, and an int8 quantization most of the bf16 weights it replaced."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
