"""int8 encoder (`embed --quantize int8`, `prott5nv.load(..., quantize="int8")`): close to float32 on real
proteins with the bundled model, compiled as users run it; refused with one line where it cannot run fast."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from conftest import SAMPLE_FASTA

import prott5nv
from prott5nv.cli import main
from prott5nv.errors import ConfigError
from prott5nv.model import quantize as q


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_this_machine_runs_int8():
    """The test machine has AVX512-VNNI and a C++ compiler: the checks below run the real thing, not a
    refusal."""
    assert q.int8_unavailable(torch.device("cpu")) is None


def test_int8_linear_is_integer_arithmetic(real_proteins):
    """The layer computes exactly what its definition says: rows quantized with their own scale, an int32
    product of the int8 values, rescaled (checked against int64 arithmetic), compiled and eager alike; and
    it is close to the float layer it came from."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40).to(torch.bfloat16)
    x = torch.randn(3, 7, 96, dtype=torch.bfloat16)
    layer = q.Int8Linear.from_linear(linear)
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (40, 96) and layer.weight.abs().max() == 127
    xq, xs = q.quantize_rows(x.reshape(-1, 96))
    exact = (xq.long() @ layer.weight.long().t()).double() * xs.double() * layer.weight_scale.double()
    expected = (exact + linear.bias.double()).to(torch.bfloat16).reshape(3, 7, 40)
    with torch.inference_mode():
        compiled = layer(x)
        layer.compile_kernel = False
        eager = layer(x)
        ref = linear(x)
    assert compiled.dtype == torch.bfloat16 and compiled.shape == (3, 7, 40)
    torch.testing.assert_close(eager.float(), expected.float(), rtol=0.01, atol=0.01)
    torch.testing.assert_close(compiled.float(), expected.float(), rtol=0.01, atol=0.01)
    assert torch.nn.functional.cosine_similarity(compiled.float(), ref.float(), dim=-1).min() > 0.999


def test_int8_linear_in_blocks_of_rows(monkeypatch):
    """A wide layer works through its rows in blocks (its int32 product then stays in cache); each row has
    its own scale, so the blocks give exactly the one-block result, and no block is a single row."""
    torch.manual_seed(1)
    layer = q.Int8Linear.from_linear(torch.nn.Linear(64, 40).to(torch.bfloat16), compile=False)
    x = torch.randn(2, 13, 64, dtype=torch.bfloat16)
    real, seen = q.int8_linear, []

    def recording(rows, *args):
        seen.append(len(rows))
        return real(rows, *args)

    monkeypatch.setattr(q, "int8_linear", recording)
    with torch.inference_mode():
        whole = layer(x)
        assert seen == [26]
        seen.clear()
        monkeypatch.setattr(q, "ROW_BLOCK_ELEMENTS", 40 * 4)  # at most 4 rows' products per block
        blocked = layer(x)
        assert seen == [4, 4, 4, 4, 4, 3, 3]
        seen.clear()
        layer(x[:, :3])  # 6 rows, asked for 2 blocks of 4 at most: 3 + 3
        assert seen == [3, 3]
        seen.clear()
        monkeypatch.setattr(q, "ROW_BLOCK_ELEMENTS", 40)  # one row's products per block: never a block of one
        layer(x[:1, :5])
        assert seen == [3, 2]
    assert torch.equal(whole, blocked)


def make_norm(kind: str | None, width: int) -> torch.nn.Module | None:
    """A pre-norm with non-trivial weights (and bias): what quantize_encoder folds into the next layer."""
    from prott5nv.model.t5 import RMSNorm

    if kind is None:
        return None
    norm = RMSNorm(width, 1e-6) if kind == "rms" else torch.nn.LayerNorm(width, eps=1e-5)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.rand_like(p) + 0.5 if p is norm.weight else torch.randn_like(p) * 0.1)
    return norm.to(torch.bfloat16)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_int8_linear_folds_its_pre_norm(kind):
    """``Int8Linear.from_linear(linear, norm)`` computes ``linear(norm(x))``: the norm's weight (and bias)
    folded into the int8 weight (bias), the rows normalised on the fly -- the 1/rms rides on each row's
    scale (so a row scaled by 100 gives the same output)."""
    torch.manual_seed(3)
    linear, norm = torch.nn.Linear(96, 40).to(torch.bfloat16), make_norm(kind, 96)
    x = torch.randn(4, 11, 96, dtype=torch.bfloat16) + 0.3
    layer = q.Int8Linear.from_linear(linear, norm)
    assert layer.norm == (kind, norm.eps) and layer.bias.dtype == torch.float32
    with torch.inference_mode():
        ref, got = linear(norm(x)), layer(x)
        scaled = layer(x * 100)
    assert torch.nn.functional.cosine_similarity(got.float(), ref.float(), dim=-1).min() > 0.999
    torch.testing.assert_close(scaled, got, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("activation, norm_kind", [("relu", "rms"), ("gelu_tanh", "layer"), ("gated-gelu", None)])
def test_int8_feed_forward_is_integer_arithmetic(activation, norm_kind, monkeypatch):
    """The fused feed-forward quantizes its (normalised) input once, takes the hidden rows from the int32
    product through the activation (float32) to their own int8 rows, and multiplies again: checked against
    int64 arithmetic, compiled and eager, in one block of rows and in several (equal); close to the float
    ``mlp(norm(x))``."""
    from prott5nv.model.config import T5Config
    from prott5nv.model.t5 import MLP

    torch.manual_seed(2)
    cfg = T5Config(family="t5", d_model=48, d_ff=80, activation=activation, dropout_rate=0.0)
    mlp, norm = MLP(cfg).to(torch.bfloat16).eval(), make_norm(norm_kind, 48)
    x = torch.randn(2, 9, 48, dtype=torch.bfloat16)
    with torch.inference_mode():
        ref = mlp(norm(x) if norm is not None else x)
    fused = q.Int8MLP(mlp, norm)
    assert not any(isinstance(m, torch.nn.Linear) for m in mlp.modules())  # the float weights are gone

    def exact(rows, w, row_norm=None):  # int64 product, rescaled in float64
        rq, rs = q.quantize_rows(rows, row_norm)
        return (rq.long() @ w.weight.long().t()).double() * rs.double() * w.weight_scale.double() + (
            0 if w.bias is None else w.bias.double()
        )

    rows = x.reshape(-1, 48)
    h = q.ACTIVATIONS[fused.activation](exact(rows, fused.first, fused.first.norm).float())
    if fused.gated:
        h = h * exact(rows, fused.wi_1, fused.first.norm).float()
    expected = exact(h, fused.wo).to(torch.bfloat16).reshape(2, 9, 48)
    with torch.inference_mode():
        compiled = fused(x)
        monkeypatch.setattr(q, "ROW_BLOCK_ELEMENTS", 80 * 5)  # blocks of at most 5 rows of the hidden layer
        blocked = fused(x)
        fused.compile_kernel = False
        eager = fused(x)
    assert compiled.shape == x.shape and compiled.dtype == torch.bfloat16
    torch.testing.assert_close(eager.float(), expected.float(), rtol=0.02, atol=0.02)
    torch.testing.assert_close(compiled.float(), expected.float(), rtol=0.02, atol=0.02)
    torch.testing.assert_close(blocked, compiled, rtol=0, atol=0)
    assert torch.nn.functional.cosine_similarity(compiled.float(), ref.float(), dim=-1).min() > 0.99


def test_int8_embeddings_close_to_float32(real_proteins):
    """Per protein >= 0.99 and per residue >= 0.98 cosine to float32, with the linear layers really int8."""
    seqs = [s[:300] for _, s in real_proteins]
    ref = prott5nv.load("prott5nv-demo")
    int8 = prott5nv.load("prott5nv-demo", dtype="bfloat16", quantize="int8")
    linears = [m for m in int8.model.encoder.modules() if isinstance(m, torch.nn.Linear | q.Int8Linear)]
    assert len(linears) == 4 * len(int8.model.encoder.blocks) and all(isinstance(m, q.Int8Linear) for m in linears)
    assert all(m.weight.dtype == torch.int8 and m.compile_kernel for m in linears)
    assert all(
        isinstance(b.self_attn_norm, torch.nn.Identity) and b.self_attention.qkv.norm[0] == "layer"
        for b in int8.model.encoder.blocks
    )  # the demo's LayerNorms folded into the next layers
    assert isinstance(int8.model.decoder.blocks[0].mlp.wi, torch.nn.Linear)  # the decoder is left alone
    h_ref, mask = ref.seqs_to_hiddens(seqs)
    h_int8, mask8 = int8.seqs_to_hiddens(seqs)
    assert torch.equal(mask, mask8)
    emb_ref, emb_int8 = ref.hiddens_to_embedding(h_ref, mask), int8.hiddens_to_embedding(h_int8, mask)
    per_protein = cosines(emb_ref.numpy(), emb_int8.numpy())
    per_residue = cosines(h_ref[mask].numpy(), h_int8[mask].numpy())
    assert per_protein.min() >= 0.99 and per_residue.min() >= 0.98, (per_protein.min(), per_residue.min())
    assert per_residue.mean() < 0.99999  # not the float32 model in disguise


def test_embed_command_quantized(tmp_path, capsys):
    out = tmp_path / "int8.h5"
    assert main(["embed", str(SAMPLE_FASTA), "-o", str(out), "--dtype", "bfloat16", "--quantize", "int8"]) == 0
    records = list(prott5nv.read_fasta(SAMPLE_FASTA))
    assert f"embedded {len(records)} proteins" in capsys.readouterr().out
    expected = prott5nv.load("prott5nv-demo").seqs_to_embedding([r.sequence for r in records]).numpy()
    with h5py.File(out) as f:
        got = np.stack([f[r.id][()] for r in records])
    assert cosines(got, expected).min() >= 0.99


@pytest.mark.parametrize(
    "case, message",
    [
        ("cuda", "int8 quantization runs on CPU"),
        ("no compiler", "needs a C++ compiler"),
        ("no vnni", "needs a CPU with AVX512-VNNI or AMX-INT8"),
    ],
)
def test_refused_where_it_cannot_run_fast(case, message, monkeypatch, tmp_path, capsys):
    device = torch.device("cpu")
    if case == "cuda":
        device = torch.device("cuda")
    elif case == "no compiler":
        monkeypatch.delenv("CXX", raising=False)
        monkeypatch.setattr(q.shutil, "which", lambda name: None)
    else:
        monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert message in q.int8_unavailable(device)
    if case == "cuda":
        return
    with pytest.raises(ConfigError, match="int8 quantization needs"):
        prott5nv.load("prott5nv-demo", quantize="int8")
    out = tmp_path / "x.h5"
    assert main(["embed", str(SAMPLE_FASTA), "-o", str(out), "--quantize", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not out.exists()
