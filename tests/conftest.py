"""Shared fixtures: real protein data (tests/data: subsets of ../shared/data), real proteins, a tiny model."""

from __future__ import annotations

import itertools
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
