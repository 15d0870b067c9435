"""Shared fixtures: real protein data (tests/data: subsets of ../shared/data), real proteins, a tiny model."""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import pytest
import torch

from prott5nv.api import ProtT5nv
from prott5nv.fasta import read_fasta
from prott5nv.model.config import preset
from prott5nv.model.t5 import T5Model
from prott5nv.tokenizer import ProteinTokenizer

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"  # real subsets shipped with the repo (see tests/data/README.md)
SWISSPROT = TEST_DATA / "swissprot_3k.fasta.gz"  # first 3,000 records of swissprot_dev_100k
PROTEOME = TEST_DATA / "proteome_HG003687.faa"  # 2,100 Prodigal proteins with '*' stops
SAMPLE_FASTA = REPO / "examples" / "sample.fasta"
DEMO_DIR = REPO / "src" / "prott5nv" / "pretrained" / "prott5nv-demo"
DEMO_DIM = json.loads((DEMO_DIR / "config.json").read_text())["model"]["d_model"]  # the bundled model's width


@pytest.fixture(scope="session")
def test_data() -> Path:
    return TEST_DATA


@pytest.fixture(scope="session")
def real_proteins() -> list[tuple[str, str]]:
    """Eight real Swiss-Prot proteins of mixed lengths (30..500 residues), in file order."""
    picked = (r for r in read_fasta(SWISSPROT) if 30 <= len(r.sequence) <= 500)
    return [(r.id, r.sequence) for r in itertools.islice(picked, 8)]


@pytest.fixture(scope="session")
def tiny_model() -> ProtT5nv:
    """A `tiny` megatron-family model with fixed random weights (seed 1234), eval mode, fp32."""
    torch.manual_seed(1234)
    return ProtT5nv(T5Model(preset("tiny")).eval(), ProteinTokenizer())


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_model` saved as a native checkpoint directory: a fast `--model` for CLI tests whose subject is
    not the bundled model (streaming, memory, limits)."""
    from prott5nv.checkpoint import save_pretrained

    return save_pretrained(tiny_model.model, tiny_model.tokenizer, tmp_path_factory.mktemp("tiny") / "tiny")


# ---- data pipeline (issue 3) ----
@pytest.fixture(scope="session")
def swissprot_2k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 2,000 records of swissprot_dev_100k.fasta.gz, copied verbatim (plain text)."""
    import gzip

    out = tmp_path_factory.mktemp("swissprot") / "swissprot_2k.fasta"
    records = 0
    with gzip.open(SWISSPROT, "rb") as src, open(out, "wb") as dst:
        for line in src:
            if line.startswith(b">"):
                records += 1
                if records > 2000:
                    break
            dst.write(line)
    return out


def _naive_fasta(path: Path) -> list[tuple[str, str, int]]:
    """(id, sequence, header line) by a plain line loop, independent of prott5nv.fasta."""
    import gzip

    out: list[tuple[str, str, int]] = []
    with (gzip.open if path.read_bytes()[:2] == b"\x1f\x8b" else open)(path, "rt") as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if line.startswith(">"):
                out.append((line[1:].split()[0], "", n))
            elif line:
                rid, seq, at = out[-1]
                out[-1] = (rid, seq + line.upper(), at)
    return [(rid, seq.removesuffix("*"), at) for rid, seq, at in out]


@pytest.fixture(scope="session")
def naive_fasta():
    """A reference FASTA parser for checking counts and contents independently."""
    return _naive_fasta


def _spm_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _spm_field(num: int, payload: bytes) -> bytes:
    return _spm_varint(num << 3 | 2) + _spm_varint(len(payload)) + payload


def _spm_model_bytes(pieces) -> bytes:
    """A SentencePiece ModelProto written by hand (protobuf wire format), independent of the readers under
    test: piece types unk (id 0), control (ids 1-3), user-defined (`<mask>`), normal (the rest), and a
    trainer_spec saying CHAR so that the real `sentencepiece` accepts it."""
    import struct

    out = b""
    for i, piece in enumerate(pieces):
        kind = 2 if i == 0 else 3 if i < 4 else 4 if piece == "<mask>" else 1
        msg = _spm_field(1, piece.encode()) + _spm_varint(2 << 3 | 5) + struct.pack("<f", -float(i))
        out += _spm_field(1, msg + _spm_varint(3 << 3 | 0) + _spm_varint(kind))
    return out + _spm_field(2, _spm_varint(3 << 3 | 0) + _spm_varint(4))


@pytest.fixture(scope="session")
def spm_model_bytes():
    """`spm_model_bytes(pieces) -> bytes`: a SentencePiece `.model` file with these pieces in id order."""
    return _spm_model_bytes


class LiveFloat32:
    """A dispatch mode recording the most float32 bytes alive at once among the tensors PyTorch operations
    see (inputs and outputs, counted by storage): how a test tells a loader that holds a float32 copy of the
    weights from one that converts them one tensor at a time."""

    def __init__(self) -> None:
        self.peak = 0

    def __enter__(self) -> LiveFloat32:
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        seen: dict[int, tuple[weakref.ref, int]] = {}
        watch = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves((args, kwargs, out)):
                    if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu":
                        storage = t.untyped_storage()
                        seen[storage.data_ptr()] = (weakref.ref(t), storage.nbytes())
                live = sum(n for ref, n in seen.values() if ref() is not None)
                watch.peak = max(watch.peak, live)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)

def copy_first_records(path: Path, n: int, out: Path) -> Path:
    """The first `n` records of a real FASTA file, copied verbatim."""
    opener = gzip.open if path.read_bytes()[:2] == b"\x1f\x8b" else open
    count = 0
    with opener(path, "rt") as src, open(out, "w") as dst:
        for line in src:
            count += line.startswith(">")
            if count > n:
                break
            dst.write(line)
    return out
