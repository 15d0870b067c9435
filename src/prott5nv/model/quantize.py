"""int8 inference on CPU: the encoder's linear layers in int8, through torchao.

:func:`quantize_encoder` gives every ``nn.Linear`` of the encoder int8 weights (one scale per output
channel) and int8 activations quantized on the fly (one scale per token, symmetric): torchao's
``Int8DynamicActivationInt8WeightConfig``. Everything else (embeddings, norms, attention, the decoder) keeps
the model's dtype (bf16 is the one to pair it with). The integer matmuls need the CPU's int8 dot-product
instructions (AVX512-VNNI or AMX-INT8) to beat bf16, and torchao's CPU path is only fast compiled: eagerly,
its separate quantize, int8 matmul and rescale steps cost more than they save, so each quantized layer is
compiled with ``torch.compile`` (Inductor fuses them; with ``max_autotune`` it may pick its own C++ int8
GEMM, which was 1.4x its default for the 768 -> 3072 layer; dynamic shapes, so one compilation per layer
shape serves every batch). Only the linear layers are compiled: compiling the whole encoder also replaced
the eager attention kernel and was slower than bf16 (0.85x). Measured at ProtT5nv-base shape on one core of
an AVX512-VNNI CPU without AMX: 1.1-1.4x bf16 (2048-token batches gain most; benchmarks/embed_throughput.py).
Compiling takes some seconds once per process (Inductor caches its work on disk).

:func:`int8_unavailable` says why a machine cannot run it fast (None when it can); callers refuse with it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import warnings

import torch
from torch import nn

from .t5 import T5Model

log = logging.getLogger(__name__)

#: The quantization schemes :func:`quantize_encoder` knows.
QUANTIZATIONS = ("int8",)
INSTALL_HINT = "pip install 'prott5nv[int8]'"


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
    if importlib.util.find_spec("torchao") is None:
        return f"int8 quantization needs torchao: {INSTALL_HINT}"
    if not torch.backends.mkldnn.is_available():
        return "int8 quantization needs a PyTorch built with oneDNN (mkldnn); this one is not"
    if not (_cpu_has("vnni") or _cpu_has("amx_tile")):
        return ("int8 quantization needs a CPU with AVX512-VNNI or AMX-INT8 (int8 dot products), which this one "
                "lacks: int8 would be slower than --dtype bfloat16 or float32 here")  # fmt: skip
    compilers = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    if not any(shutil.which(c) for c in compilers):
        return ("int8 quantization compiles its kernels (torch.compile) and needs a C++ compiler: install g++ or "
                "clang++ (or set CXX)")  # fmt: skip
    return None


def quantize_encoder(model: T5Model, scheme: str = "int8", *, compile: bool = True) -> T5Model:
    """Quantize the encoder's linear layers in place (see the module docstring) and, with `compile`,
    compile each of them. Call :func:`int8_unavailable` first; the model should be in eval mode with its
    weights in the dtype it will compute in (bf16), and run without autocast."""
    if scheme not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {scheme!r}; choose one of {', '.join(QUANTIZATIONS)}")
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [q.level for q in quiet]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchao's import notes (its CUDA-only extensions, deprecations)
        for q in quiet:
            q.setLevel(logging.ERROR)
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        finally:
            for q, level in zip(quiet, levels, strict=True):
                q.setLevel(level)

    linears = [m for m in model.encoder.modules() if isinstance(m, nn.Linear)]
    quantize_(model.encoder, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, _: isinstance(m, nn.Linear))
    if compile:  # freezing: the weights are constants, which lets Inductor prepack them for oneDNN
        import torch._dynamo

        # one compiled variant per weight shape and per batch of one or more (Dynamo specialises size 1),
        # for each of the functions torchao's int8 linear is traced as: 8 at ProtT5's 4 shapes already, the
        # default limit, past which Dynamo would quietly run the rest eagerly (correct but slow)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        options = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
        for linear in linears:
            linear.compile(dynamic=True, options=options)
    log.debug("quantized the encoder's linear layers to %s%s", scheme, " (compiled)" if compile else "")
    return model
