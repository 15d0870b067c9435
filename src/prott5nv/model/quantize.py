"""int8 inference on CPU: the encoder's linear layers as int8 matrix products.

:func:`quantize_encoder` replaces every ``nn.Linear`` of the encoder with an :class:`Int8Linear`: int8
weights with one scale per output channel, activations quantized on the fly with one scale per token
(symmetric), the product accumulated in int32 by ``torch._int_mm`` (oneDNN's s8s8 GEMM, which uses the
CPU's AVX512-VNNI or AMX-INT8 dot products) and rescaled to the model's dtype. Everything else (embeddings,
norms, attention, the decoder) keeps the model's dtype (bf16 is the one to pair it with).

Why not torchao's ``Int8DynamicActivationInt8WeightConfig``, which quantizes the same way: on CPU its
int8 matmul is computed in float32 (torchao 0.18, ``safe_int_mm``: int32 matmul "is slow on CPU"), so it
never reaches the int8 instructions and was slower than bf16 at ProtT5-XL shape (0.88x). ``_int_mm`` on
an AVX512-VNNI CPU without AMX multiplies 1.6-2.0x faster than bf16 at XL's shapes
(benchmarks/embed_throughput.py measures the whole encoder).

The quantize and rescale steps around the product are elementwise passes over the activations; eagerly
they cost as much as int8 saves, so :func:`int8_linear` is compiled with ``torch.compile`` (Inductor fuses
each side into one pass and calls ``_int_mm`` as is; dynamic shapes: one compilation serves every batch;
Inductor caches its work on disk). Compiling needs a C++ compiler.

:func:`int8_unavailable` says why a machine cannot run it fast (None when it can); callers refuse with it.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil

import torch
from torch import Tensor, nn

from ..device import release_free_memory
from .t5 import T5Model

log = logging.getLogger(__name__)

#: The quantization schemes :func:`quantize_encoder` knows.
QUANTIZATIONS = ("int8",)


def _cpu_has(name: str) -> bool:
    probe = getattr(torch.cpu, f"_is_{name}_supported", None)  # private, present since PyTorch 2.3
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def int8_unavailable(device: torch.device) -> str | None:
    """Why int8 cannot run fast on `device` with this PyTorch and CPU, or None when it can."""
    if device.type != "cpu":
        return f"int8 quantization runs on CPU; on {device.type} use --dtype bfloat16 or float16 instead"
    if not torch.backends.mkldnn.is_available():
        return "int8 quantization needs a PyTorch built with oneDNN (mkldnn); this one is not"
    if not (_cpu_has("vnni") or _cpu_has("amx_tile")):
        return ("int8 quantization needs a CPU with AVX512-VNNI or AMX-INT8 (int8 dot products), which this one "
                "lacks: int8 would be slower than --dtype bfloat16 or float32 here")  # fmt: skip
    compilers = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    if not any(shutil.which(c) for c in compilers):
        return ("int8 quantization needs a C++ compiler to compile its kernels (torch.compile): install g++ or "
                "clang++ (or set CXX)")  # fmt: skip
    return None


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 with one float32 scale per row: ``x ≈ q * scale``, ``q`` in [-127, 127]."""
    scale = x.abs().amax(-1, keepdim=True).float().clamp_min(1e-12) / 127
    return torch.round(x.float() / scale).to(torch.int8), scale


def int8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ (weight * weight_scale[:, None]).T + bias`` for rows `x` ``[M, in]``, each quantized with its
    own scale, accumulated in int32; `weight` is int8 ``[out, in]``; the result has `x`'s dtype."""
    q, scale = quantize_rows(x)
    y = torch._int_mm(q, weight.t()) * scale * weight_scale
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


#: int32 products per block of rows in :meth:`Int8Linear.forward` (64 MiB): at ProtT5-XL's 1024 -> 16384
#: layer, 4,000 rows at once ran 1.24x bf16, blocks of 1,024 rows 1.52x (2 cores, AVX512-VNNI)
ROW_BLOCK_ELEMENTS = 1 << 24


@functools.cache
def _compiled() -> object:
    return torch.compile(int8_linear, dynamic=True)  # made on first use, shared by every layer


class Int8Linear(nn.Module):
    """A linear layer with int8 weights (one scale per output channel) for inference; made from an
    ``nn.Linear`` by :meth:`from_linear`. The bias (ProtT5nv's layers have one, Rostlab's none) stays
    in its float dtype."""

    def __init__(self, weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None, *,
                 compute_dtype: torch.dtype = torch.bfloat16, compile: bool = True) -> None:  # fmt: skip
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", bias)
        self.compute_dtype = compute_dtype  # of the activations it will see (the float layer's dtype)
        self.compile_kernel = compile

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, compile: bool = True) -> Int8Linear:
        q, scale = quantize_rows(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q, scale.squeeze(1), bias, compute_dtype=linear.weight.dtype, compile=compile)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        kernel = _compiled() if self.compile_kernel else int8_linear
        rows = x.reshape(-1, x.shape[-1])  # 2-d whatever the batch: one compiled graph serves all
        # the int32 product of a wide layer (ProtT5-XL's 16384-wide `wi`) is rescaled while in cache: blocks
        # of rows of at most ROW_BLOCK_ELEMENTS products each, near-equal so that none is one row (a
        # shape Dynamo would compile again)
        blocks = -(-rows.shape[0] * self.out_features // ROW_BLOCK_ELEMENTS)
        if blocks <= 1:
            y = kernel(rows, self.weight, self.weight_scale, self.bias)
        else:
            parts = rows.tensor_split(min(blocks, max(rows.shape[0] // 2, 1)))
            y = torch.cat([kernel(r, self.weight, self.weight_scale, self.bias) for r in parts])
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_encoder(model: T5Model, scheme: str = "int8", *, compile: bool = True) -> T5Model:
    """Replace the encoder's linear layers with :class:`Int8Linear` in place (see the module docstring),
    one at a time so the float weights are freed as it goes. Call :func:`int8_unavailable` first; the model
    should be in eval mode with its other weights in the dtype it will compute in (bf16), and run without
    autocast."""
    if scheme not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {scheme!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if compile:
        import torch._dynamo

        # Dynamo specialises sizes 0/1 and each dtype: a handful of variants, well under its limit
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    places = [(p, name) for p in model.encoder.modules() for name, c in p.named_children() if isinstance(c, nn.Linear)]
    for parent, name in places:  # holding no reference to the float layers: each is freed once replaced
        setattr(parent, name, Int8Linear.from_linear(getattr(parent, name), compile=compile))
        release_free_memory()
    if compile:  # compile now, at load: a first batch does not pay for it, and a failure shows here
        first = next(m for m in model.encoder.modules() if isinstance(m, Int8Linear))
        with torch.inference_mode():
            first(torch.zeros(2, first.in_features, dtype=first.compute_dtype, device=first.weight.device))
    log.debug("quantized the encoder's linear layers to %s%s", scheme, " (compiled)" if compile else "")
    return model
