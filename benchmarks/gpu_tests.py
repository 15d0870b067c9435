"""CUDA checks, run by benchmarks/gpu_check.sh on a machine with a GPU: ``pytest benchmarks/gpu_tests.py``.

Not part of tests/ (which must pass on a CPU-only machine, without skips): this file is only ever run where
a GPU is, and fails -- does not skip -- without one. Real proteins (tests/data/swissprot_3k.fasta.gz):

* embeddings on CUDA in float32 equal CPU float32's; bfloat16 and float16 equal float32 within tolerance
  (per protein and per residue), for the bundled model (megatron family) and a t5-family model; through
  the library and through `prott5nv embed`;
* pretraining on CUDA: two processes (nccl) give the losses of one process accumulating the same global
  batch, when two GPUs are present; else one process trains a few steps to finite, falling losses.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from prott5nv.api import ProtT5nv, load
from prott5nv.cli import main
from prott5nv.fasta import read_fasta, write_fasta
from prott5nv.model.config import preset
from prott5nv.model.t5 import T5Model
from prott5nv.tokenizer import ProteinTokenizer

REPO = Path(__file__).resolve().parents[1]
SWISSPROT = REPO / "tests" / "data" / "swissprot_3k.fasta.gz"
# minimum cosine to float32 (per protein, per residue) by compute precision
TOLERANCE = {"bfloat16": (0.999, 0.99), "float16": (0.9999, 0.999)}

assert torch.cuda.is_available(), "benchmarks/gpu_tests.py needs a CUDA device (run it through gpu_check.sh)"


@pytest.fixture(scope="module")
def proteins() -> list[tuple[str, str]]:
    """64 real proteins of 30-500 residues."""
    picked = (r for r in read_fasta(SWISSPROT) if 30 <= len(r.sequence) <= 500)
    return [(r.id, r.sequence) for r in itertools.islice(picked, 64)]


def t5_model() -> tuple[T5Model, ProteinTokenizer]:
    """A random t5-family model (relative positions, RMSNorm, ReLU) at ProtT5-XL's layout, scaled down."""
    torch.manual_seed(0)
    cfg = preset("tiny").replace(family="t5", activation="relu", d_kv=32, num_heads=4, max_position_embeddings=0,
                                 initializer_std=1.0, layer_norm_epsilon=1e-6)  # fmt: skip
    return T5Model(cfg).eval(), ProteinTokenizer.for_layout("rostlab")


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def states(model: ProtT5nv, seqs: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hiddens, mask = model.seqs_to_hiddens(seqs)
    return model.hiddens_to_embedding(hiddens, mask).cpu(), hiddens.cpu(), mask.cpu()


@pytest.mark.parametrize("which", ["prott5nv-demo", "t5"])
def test_half_precision_embeddings_match_float32(which, proteins):
    seqs = [s for _, s in proteins]

    def build(device: str, dtype: str) -> ProtT5nv:
        if which == "t5":
            model, tok = t5_model()
            return ProtT5nv(model, tok, device=device, dtype=dtype)
        return load(which, device=device, dtype=dtype)

    cpu, _, _ = states(build("cpu", "float32"), seqs)
    ref, ref_h, mask = states(build("cuda", "float32"), seqs)
    assert cosines(ref, cpu).min() > 0.99999  # CUDA fp32 = CPU fp32 (up to summation order)
    for dtype, (per_protein, per_residue) in TOLERANCE.items():
        emb, h, _ = states(build("cuda", dtype), seqs)
        assert cosines(emb, ref).min() >= per_protein, dtype
        assert cosines(h[mask], ref_h[mask]).min() >= per_residue, dtype


def test_embed_command_on_cuda(tmp_path, proteins):
    import h5py

    fasta = tmp_path / "in.fasta"
    write_fasta(proteins, fasta)
    for name, flags in {"cpu": ["--device", "cpu"], "cuda": ["--device", "cuda", "--dtype", "bfloat16"]}.items():
        assert main(["embed", str(fasta), "-o", str(tmp_path / f"{name}.h5"), *flags]) == 0
    with h5py.File(tmp_path / "cpu.h5") as a, h5py.File(tmp_path / "cuda.h5") as b:
        x = torch.from_numpy(np.stack([a[rid][()] for rid, _ in proteins]))
        y = torch.from_numpy(np.stack([b[rid][()] for rid, _ in proteins]))
    assert cosines(x, y).min() >= TOLERANCE["bfloat16"][0]


# ------------------------------------------------------------------------------------------ pretraining
def _pretrain(nproc: int, *args: object) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "prott5nv", "pretrain", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_pretraining_on_cuda(tmp_path):
    data = tmp_path / "data"
    assert main(["preprocess", str(SWISSPROT), "-o", str(data), "--max-length", "256", "--val", "64"]) == 0
    common = ["--data", data, "--device", "cuda", "--precision", "bf16", "--preset", "tiny", "--seq-length", 128,
              "--seq-length-dec", 48, "--val-samples", 32, "--log-every", 1, "--max-steps", 8, "--micro-batch-size",
              8, "--lr", "1e-3", "--dropout", 0.0, "--val-every", 8, "--save-every", 8]  # fmt: skip
    one = _pretrain(1, *common, "--out", tmp_path / "one", "--accumulate", 2)
    assert one.returncode == 0, one.stderr[-3000:]
    a = _losses(tmp_path / "one")
    assert sorted(a) == list(range(1, 9)) and all(np.isfinite(list(a.values())))
    assert a[8] < a[1]
    if torch.cuda.device_count() >= 2:  # nccl: two ranks, the same global batch
        two = _pretrain(2, *common, "--out", tmp_path / "two", "--accumulate", 1)
        assert two.returncode == 0, two.stderr[-3000:]
        b = _losses(tmp_path / "two")
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=2e-3), step
