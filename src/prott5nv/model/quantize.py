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
they cost as much as int8 saves, so :func:`int8_linear` and :func:`int8_mlp` are compiled with
``torch.compile`` (Inductor fuses each side into one pass and calls ``_int_mm`` as is; dynamic shapes: one
compilation serves every batch; Inductor caches its work on disk). Compiling needs a C++ compiler. The
feed-forward is one function (:class:`Int8MLP`): its wide hidden rows go from the int32 product through the
activation to int8 without a bf16 copy, in blocks of rows that stay in cache.

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
from .t5 import MLP, RMSNorm, T5Model

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


#: How :func:`quantize_rows` normalises rows first: None, or a pre-norm folded into the next layer
#: (:func:`fold_norm`) as its kind ("rms": T5's RMSNorm, "layer": LayerNorm) and epsilon.
RowNorm = tuple[str, float] | None


def quantize_rows(x: Tensor, norm: RowNorm = None) -> tuple[Tensor, Tensor]:
    """Symmetric int8 with one float32 scale per row: ``x ≈ q * scale``, ``q`` in [-127, 127]. With
    `norm`, the rows of ``norm(x)`` without its weight (folded into the next layer's): "layer" centres
    each row first, and the scale also carries each row's 1 / rms -- int8 with a scale per row needs no
    normalised copy of `x`."""
    x = x.float()
    if norm is not None and norm[0] == "layer":
        x = x - x.mean(-1, keepdim=True)
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    q = torch.round(x / scale).to(torch.int8)
    if norm is not None:
        scale = scale * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm[1])
    return q, scale


def _rescaled(q: Tensor, scale: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """The float32 product of quantized rows `q` (scales `scale`) and int8 `weight`, plus `bias`."""
    y = torch._int_mm(q, weight.t()) * scale * weight_scale
    return y if bias is None else y + bias


def int8_linear(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None, norm: RowNorm = None
) -> Tensor:
    """``x @ (weight * weight_scale[:, None]).T + bias`` for rows `x` ``[M, in]`` (normalised by `norm`),
    each quantized with its own scale, accumulated in int32; `weight` is int8 ``[out, in]``; the result has
    `x`'s dtype."""
    q, scale = quantize_rows(x, norm)
    return _rescaled(q, scale, weight, weight_scale, bias).to(x.dtype)


#: The activations :func:`int8_mlp` applies, by name (a string keeps one compiled graph for every layer).
ACTIVATIONS = {
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": functools.partial(torch.nn.functional.gelu, approximate="tanh"),
}

Projection = tuple[Tensor, Tensor, "Tensor | None"]  # int8 weight, its per-channel scales, float bias


def int8_mlp(
    x: Tensor, wi: Projection, wo: Projection, activation: str, gate: Projection | None = None, norm: RowNorm = None
) -> Tensor:
    """T5's feed-forward ``wo(act(wi(x)) [* gate(x)])`` in int8 for rows `x` (normalised by `norm`): `x` is
    quantized once for `wi` (and `gate`), and the hidden rows go from the int32 product through the
    activation straight to their own int8 quantization in float32 (never stored in `x`'s dtype). The
    result has `x`'s dtype."""
    q, scale = quantize_rows(x, norm)
    h = ACTIVATIONS[activation](_rescaled(q, scale, *wi))
    if gate is not None:
        h = h * _rescaled(q, scale, *gate)
    hq, hscale = quantize_rows(h)
    return _rescaled(hq, hscale, *wo).to(x.dtype)


#: int32 products per block of rows (32 MiB, glibc's largest mmap threshold: a block's temporaries are reused
#: from the heap, not mapped and page-faulted anew): a wide product is rescaled while in cache and no
#: full-size temporary exists. At ProtT5-XL's 1024 -> 16384 layer, 4,000 rows at once ran 1.24x bf16, blocks
#: of 1,024 rows 1.52x; the fused feed-forward (6 runs each) 441 ms in blocks of 512 rows, 505 ms in blocks
#: of 1,024, 484 ms in blocks of 256, bf16 ~800 ms (2 cores, AVX512-VNNI)
ROW_BLOCK_ELEMENTS = 1 << 23


@functools.cache
def _compiled(fn: object) -> object:
    return torch.compile(fn, dynamic=True)  # made on first use, shared by every layer


def _by_row_blocks(x: Tensor, width: int, fn: object, *args: object) -> Tensor:
    """``fn(rows, *args)`` over the rows of `x` (all leading dimensions flattened: one compiled graph serves
    every batch) in near-equal blocks of at most ROW_BLOCK_ELEMENTS // `width` rows, none a single row (a
    shape Dynamo would compile again); the result reshaped back to `x`'s leading dimensions."""
    rows = x.reshape(-1, x.shape[-1])
    blocks = -(-rows.shape[0] * width // ROW_BLOCK_ELEMENTS)
    if blocks <= 1:
        y = fn(rows, *args)
    else:
        y = torch.cat([fn(r, *args) for r in rows.tensor_split(min(blocks, max(rows.shape[0] // 2, 1)))])
    return y.reshape(*x.shape[:-1], y.shape[-1])


def fold_norm(linear: nn.Linear, norm: nn.Module | None) -> tuple[Tensor, Tensor | None, RowNorm]:
    """`linear`'s float32 weight and bias with the pre-norm `norm`'s weight (and LayerNorm's bias) folded in:
    ``linear(norm(x)) = W' n(x) + b'`` where ``n`` is the norm without its weight (:func:`quantize_rows`
    applies it from the returned :data:`RowNorm`)."""
    weight = linear.weight.detach().float()
    bias = None if linear.bias is None else linear.bias.detach().float()
    if norm is None:
        return weight, bias, None
    if isinstance(norm, RMSNorm):
        return weight * norm.weight.detach().float(), bias, ("rms", float(norm.eps))
    if isinstance(norm, nn.LayerNorm) and norm.elementwise_affine:
        if norm.bias is not None:  # W (g * n + c) + b = (W g) n + (W c + b)
            shift = weight @ norm.bias.detach().float()
            bias = shift if bias is None else bias + shift
        return weight * norm.weight.detach().float(), bias, ("layer", float(norm.eps))
    raise ValueError(f"cannot fold the norm {norm!r} into an int8 layer")


class Int8Linear(nn.Module):
    """A linear layer with int8 weights (one scale per output channel) for inference; made from an
    ``nn.Linear`` (and the pre-norm that feeds it, folded in) by :meth:`from_linear`. The bias (ProtT5nv's
    layers have one, Rostlab's none) is kept in float32."""

    def __init__(self, weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None, *, norm: RowNorm = None,
                 compute_dtype: torch.dtype = torch.bfloat16, compile: bool = True) -> None:  # fmt: skip
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", bias)
        self.norm = norm
        self.compute_dtype = compute_dtype  # of the activations it will see (the float layer's dtype)
        self.compile_kernel = compile

    @classmethod
    def from_linear(cls, linear: nn.Linear, norm: nn.Module | None = None, *, compile: bool = True) -> Int8Linear:
        """The int8 form of ``linear(norm(x))`` (`norm`: None, RMSNorm or LayerNorm)."""
        weight, bias, row_norm = fold_norm(linear, norm)
        q, scale = quantize_rows(weight)
        return cls(q, scale.squeeze(1), bias, norm=row_norm, compute_dtype=linear.weight.dtype, compile=compile)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def projection(self) -> Projection:
        return self.weight, self.weight_scale, self.bias

    def forward(self, x: Tensor) -> Tensor:
        kernel = _compiled(int8_linear) if self.compile_kernel else int8_linear
        return _by_row_blocks(x, self.out_features, kernel, *self.projection, self.norm)

    def extra_repr(self) -> str:
        folded = f", {self.norm[0]} norm folded in" if self.norm else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8{folded}"


def _activation_name(act: nn.Module) -> str:
    if isinstance(act, nn.ReLU):
        return "relu"
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    raise ValueError(f"no int8 feed-forward for the activation {act!r}")


class Int8MLP(nn.Module):
    """An encoder :class:`~prott5nv.model.t5.MLP` (with the pre-norm `norm` that feeds it folded in) for int8
    inference (:func:`int8_mlp`): its projections as :class:`Int8Linear` (same names: `wi` or `wi_0`/`wi_1`,
    `wo`), computed in row blocks through one compiled function, so the ``d_ff``-wide hidden rows never
    exist at full size."""

    def __init__(self, mlp: MLP, norm: nn.Module | None = None, *, compile: bool = True) -> None:
        super().__init__()
        self.gated, self.activation = mlp.gated, _activation_name(mlp.act)
        for name in ("wi_0", "wi_1", "wo") if mlp.gated else ("wi", "wo"):
            first = name != "wo"
            setattr(self, name, Int8Linear.from_linear(getattr(mlp, name), norm if first else None, compile=compile))
            delattr(mlp, name)  # the float weights go as soon as they are replaced
            release_free_memory()
        self.compile_kernel = compile

    @property
    def first(self) -> Int8Linear:
        """The projection the input goes through (`wi`, or `wi_0` when gated)."""
        return self.wi_0 if self.gated else self.wi

    def forward(self, x: Tensor) -> Tensor:
        kernel = _compiled(int8_mlp) if self.compile_kernel else int8_mlp
        wi = self.first
        gate = self.wi_1.projection if self.gated else None
        return _by_row_blocks(
            x, wi.out_features, kernel, wi.projection, self.wo.projection, self.activation, gate, wi.norm
        )

    def extra_repr(self) -> str:
        return f"{self.activation}{', gated' if self.gated else ''}, int8"


def quantize_encoder(model: T5Model, scheme: str = "int8", *, compile: bool = True) -> T5Model:
    """Replace the encoder's feed-forward layers with :class:`Int8MLP` and its other linear layers with
    :class:`Int8Linear` in place (see the module docstring), one at a time so the float weights are freed
    as it goes. Each block's two pre-norms are folded into the layers they feed (the fused QKV projection,
    the feed-forward) and replaced by identities. Call :func:`int8_unavailable` first; the model should be
    in eval mode with its other weights in the dtype it will compute in (bf16), and run without autocast."""
    if scheme not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {scheme!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if compile:
        import torch._dynamo

        # two functions, each specialised by Dynamo for sizes 0/1, dtype and bias/gate/norm present or not
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in model.encoder.blocks:
        attention = block.self_attention
        attention.qkv = Int8Linear.from_linear(attention.qkv, block.self_attn_norm, compile=compile)
        attention.o = Int8Linear.from_linear(attention.o, compile=compile)
        block.mlp = Int8MLP(block.mlp, block.mlp_norm, compile=compile)
        block.self_attn_norm, block.mlp_norm = nn.Identity(), nn.Identity()
        release_free_memory()
    if compile:  # compile now, at load: a first batch does not pay for it, and a failure shows here
        first = model.encoder.blocks[0]
        with torch.inference_mode():
            for layer in (first.self_attention.qkv, first.self_attention.o, first.mlp):
                inner = layer.first if isinstance(layer, Int8MLP) else layer
                layer(torch.zeros(2, inner.in_features, dtype=inner.compute_dtype, device=inner.weight.device))
    log.debug("quantized the encoder's linear layers to %s%s", scheme, " (compiled)" if compile else "")
    return model
