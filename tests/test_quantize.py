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
    """The test machine has AVX512-VNNI and torchao (the int8 extra is part of the test environment): the
    checks below run the real thing, not a refusal."""
    assert q.int8_unavailable(torch.device("cpu")) is None


def test_int8_embeddings_close_to_float32(real_proteins):
    """Per protein >= 0.99 and per residue >= 0.98 cosine to float32, with the linear layers really int8."""
    seqs = [s[:300] for _, s in real_proteins]
    ref = prott5nv.load("prott5nv-demo")
    int8 = prott5nv.load("prott5nv-demo", dtype="bfloat16", quantize="int8")
    linear = int8.model.encoder.blocks[0].mlp.wi
    assert type(linear.weight).__name__ == "Int8Tensor" and linear.weight.qdata.dtype == torch.int8
    assert type(ref.model.encoder.blocks[0].mlp.wi.weight) is torch.nn.Parameter
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
        ("no torchao", "pip install 'prott5nv[int8]'"),
        ("no vnni", "needs a CPU with AVX512-VNNI or AMX-INT8"),
    ],
)
def test_refused_where_it_cannot_run_fast(case, message, monkeypatch, tmp_path, capsys):
    device = torch.device("cpu")
    if case == "cuda":
        device = torch.device("cuda")
    elif case == "no torchao":
        monkeypatch.setattr(q.importlib.util, "find_spec", lambda name: None)
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
