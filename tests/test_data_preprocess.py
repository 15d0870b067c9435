"""`preprocess` on real files: exact counts, byte-exact round trips, reproducible splits, atomicity."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import pickle
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from prott5nv.cli import preprocess as cli
from prott5nv.data import preprocess as pp
from prott5nv.data.dataset import T5PretrainingDataset
from prott5nv.data.masking import T5Masker, collate_t5
from prott5nv.data.preprocess import PreprocessConfig, preprocess
from prott5nv.data.sampler import DistributedShuffleSampler
from prott5nv.data.store import SPLITS, SequenceStore, StoreError, load_manifest
from prott5nv.errors import ConfigError, InvalidSequenceError, OutputError
from prott5nv.tokenizer import ProteinTokenizer

CFG = PreprocessConfig(max_length=512, min_length=30, dedup=True, val=100, test=0.1, seed=7)


@pytest.fixture(scope="module")
def inputs(swissprot_2k: Path, test_data: Path) -> list[Path]:
    return [swissprot_2k, test_data / "proteome_HG003687.faa"]


@pytest.fixture(scope="module")
def expected(inputs, naive_fasta) -> list[tuple[str, str]]:
    """Records that survive the CFG filters, by a plain Python pass: in file order, first copy kept."""
    seen: set[str] = set()
    out = []
    for path in inputs:
        for rid, seq, _ in naive_fasta(path):
            if 30 <= len(seq) <= 512 and seq not in seen:
                seen.add(seq)
                out.append((rid, seq))
    return out


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pp") / "data"
    return out, preprocess(inputs, out, CFG)


def store_records(data: Path, split: str) -> list[tuple[str, str]]:
    store = SequenceStore.open(data, split)
    return [(store.id(i), store.sequence(i)) for i in range(len(store))]


def test_counts_are_exact(built, inputs, naive_fasta, expected) -> None:
    data, manifest = built
    raw = [r for p in inputs for r in naive_fasta(p)]
    assert len(raw) == 4100
    lengths = [len(s) for _, s, _ in raw]
    counts = manifest["counts"]
    assert counts["records"] == 4100
    assert counts["too_long"] == sum(n > 512 for n in lengths)
    assert counts["too_short"] == sum(n < 30 for n in lengths)
    in_range = sum(30 <= n <= 512 for n in lengths)
    assert counts["duplicates"] == in_range - len(expected)
    assert counts["kept"] == len(expected)
    sizes = {s: manifest["splits"][s]["sequences"] for s in SPLITS}
    assert sizes == {"val": 100, "test": round(0.1 * len(expected)), "train": len(expected) - 100 - sizes["test"]}
    assert load_manifest(data) == json.loads((data / "manifest.json").read_text())


def test_store_round_trips_every_sequence(built, expected) -> None:
    data, manifest = built
    stored = {s: store_records(data, s) for s in SPLITS}
    assert Counter(r for recs in stored.values() for r in recs) == Counter(expected)
    position = {r: i for i, r in enumerate(expected)}
    for split, recs in stored.items():
        assert [position[r] for r in recs] == sorted(position[r] for r in recs)  # file order kept
        info = manifest["splits"][split]
        assert info["residues"] == sum(len(s) for _, s in recs)
        assert sum(info["length_histogram"]["counts"]) == len(recs)
        assert info["max_length"] == max(len(s) for _, s in recs)
    store = SequenceStore.open(data, "train")
    assert np.array_equal(store.lengths, [len(s) for _, s in stored["train"]])
    assert store[-1] == stored["train"][-1][1].encode()


def test_split_is_the_seeded_choice_and_reproducible(built, inputs, expected, tmp_path) -> None:
    data, manifest = built
    n_test = manifest["splits"]["test"]["sequences"]
    chosen = np.random.default_rng(7).choice(len(expected), 100 + n_test, replace=False)
    assert store_records(data, "val") == [expected[i] for i in sorted(chosen[:100])]
    assert store_records(data, "test") == [expected[i] for i in sorted(chosen[100:])]
    again = preprocess(inputs, tmp_path / "again", CFG)
    for split in SPLITS:
        assert store_records(tmp_path / "again", split) == store_records(data, split)
    assert again["sources"] == manifest["sources"]
    other = preprocess(inputs, tmp_path / "other", PreprocessConfig(**{**CFG.__dict__, "seed": 8}))
    assert store_records(tmp_path / "other", "val") != store_records(data, "val")
    assert other["counts"] == manifest["counts"]


def test_manifest_sources_and_settings(built, inputs) -> None:
    _, manifest = built
    assert [s["sha256"] for s in manifest["sources"]] == [
        hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs
    ]
    assert [s["records"] for s in manifest["sources"]] == [2000, 2100]
    assert manifest["settings"]["max_length"] == 512 and manifest["settings"]["dedup"] is True
    assert manifest["settings"]["val"] == 100 and manifest["settings"]["test"] == 0.1


def test_gzip_input_and_no_filters(test_data, naive_fasta, tmp_path) -> None:
    path = test_data / "proteome_HG003687.faa"
    packed = tmp_path / "proteome.faa.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    manifest = preprocess([packed], tmp_path / "d", PreprocessConfig(max_length=None))
    assert manifest["counts"]["kept"] == 2100 and manifest["splits"]["train"]["sequences"] == 2100
    assert store_records(tmp_path / "d", "train") == [(r, s) for r, s, _ in naive_fasta(path)]
    assert SequenceStore.open(tmp_path / "d", "val").lengths.tolist() == []


def test_interrupted_run_leaves_nothing_loadable(inputs, tmp_path, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pp, "_write_splits", boom)
    with pytest.raises(KeyboardInterrupt):
        preprocess(inputs, tmp_path / "data", CFG)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    preprocess(inputs, tmp_path / "data", CFG)
    (tmp_path / "data" / "manifest.json").unlink()  # as if the run had stopped before its last step
    with pytest.raises(StoreError) as exc:
        SequenceStore.open(tmp_path / "data", "train")
    assert str(exc.value) == (
        f"{tmp_path / 'data'}: no manifest.json: not a prott5nv data store, or its preprocess run did not "
        "finish (run `prott5nv preprocess` again)"
    )


def test_refusals(inputs, tmp_path) -> None:
    preprocess(inputs[1:], tmp_path / "d", PreprocessConfig())
    with pytest.raises(OutputError, match="already exists"):
        preprocess(inputs[1:], tmp_path / "d", PreprocessConfig())
    manifest = preprocess(inputs[1:], tmp_path / "d", PreprocessConfig(val=5, overwrite=True))
    assert manifest["splits"]["val"]["sequences"] == 5 and load_manifest(tmp_path / "d") == manifest
    with pytest.raises(ConfigError) as exc:
        preprocess(inputs[1:], tmp_path / "e", PreprocessConfig(max_length=None, val=0.5, test=1100))
    assert str(exc.value) == (
        "--val 0.5 and --test 1100 ask for 1050 + 1100 sequences but only 2100 remain after filtering"
    )
    with pytest.raises(ConfigError, match=r"--val 1.5: a fraction must be in \[0, 1\)"):
        preprocess(inputs[1:], tmp_path / "e", PreprocessConfig(val=1.5))
    assert not (tmp_path / "e").exists()


def test_invalid_and_duplicate_records(swissprot_2k, naive_fasta, tmp_path) -> None:
    recs = naive_fasta(swissprot_2k)[:10]
    text = "".join(f">{r}\n{s[:5] + 'J' + s[6:] if i == 3 else s}\n" for i, (r, s, _) in enumerate(recs))
    bad = tmp_path / "bad.fa"
    bad.write_text(text)
    with pytest.raises(InvalidSequenceError) as exc:
        preprocess([bad], tmp_path / "d", PreprocessConfig(max_length=None))
    msg = f"{bad}:7, record '{recs[3][0]}': unknown residue 'J' (use --unknown-to-x to map unknown letters to X)"
    assert str(exc.value) == msg + " at position 6"
    manifest = preprocess([bad], tmp_path / "d", PreprocessConfig(max_length=None, skip_invalid=True))
    assert manifest["counts"]["invalid"] == 1 and manifest["counts"]["kept"] == 9
    assert manifest["skipped_messages"] == [msg + " at position 6"]

    good = tmp_path / "good.fa"
    good.write_text("".join(f">{r}\n{s}\n" for r, s, _ in recs))
    with pytest.raises(InvalidSequenceError) as exc:
        preprocess([good, good], tmp_path / "e", PreprocessConfig(max_length=None))
    assert str(exc.value) == f"{good}:1: record '{recs[0][0]}': duplicate id (first seen at {good}:1)"
    m = preprocess([good, good], tmp_path / "e", PreprocessConfig(max_length=None, skip_invalid=True))
    assert m["counts"]["duplicate_ids"] == 10 and m["counts"]["kept"] == 10
    again = tmp_path / "again.fa"  # record 4's id once more, after a record too long to keep
    again.write_text(good.read_text() + f">{recs[9][0]}_long\n{recs[9][1] * 9}\n>{recs[4][0]}\n{recs[0][1]}\n")
    with pytest.raises(InvalidSequenceError) as exc:
        preprocess([again], tmp_path / "f", PreprocessConfig(max_length=3000))
    assert str(exc.value) == f"{again}:23: record '{recs[4][0]}': duplicate id (first seen at {again}:9)"


def test_cli_summary(inputs, tmp_path, capsys) -> None:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    out = tmp_path / "cli"
    args = parser.parse_args(["preprocess", *map(str, inputs), "-o", str(out), "--min-length", "30", "--dedup",
                              "--val", "100", "--test", "0.1", "--seed", "7"])  # fmt: skip
    assert args.func(args) == 0
    line = capsys.readouterr().out.strip()
    manifest = load_manifest(out)
    c, s = manifest["counts"], manifest["splits"]
    assert line.startswith(
        f"preprocess: 4100 records -> {c['kept']} kept (train {s['train']['sequences']}, val 100, test "
        f"{s['test']['sequences']}); dropped {c['too_long']} too long, {c['too_short']} too short, "
        f"{c['duplicates']} duplicates, 0 invalid;"
    )
    assert manifest["settings"] == {
        "max_length": 512, "min_length": 30, "dedup": True, "val": 100, "test": 0.1, "seed": 7,
        "skip_invalid": False, "policy": {"strip_gaps": False, "unknown_to_x": False},
    }  # fmt: skip


def test_dataset_with_workers_matches_single_process(built) -> None:
    data, _ = built
    store = SequenceStore.open(data, "train")
    tok = ProteinTokenizer()
    ds = T5PretrainingDataset(store, tok, T5Masker(tok, seed=3), epoch=2)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.store._maps is None and np.array_equal(clone[5].text_enc, ds[5].text_enc)
    sampler = DistributedShuffleSampler(len(store), rank=1, world_size=2, seed=3, epoch=2)
    collate = partial(collate_t5, pad_id=tok.pad_id)
    single = list(torch.utils.data.DataLoader(ds, batch_size=16, sampler=sampler, collate_fn=collate))
    multi = list(
        torch.utils.data.DataLoader(ds, batch_size=16, sampler=sampler, collate_fn=collate, num_workers=2)
    )
    assert len(single) == len(multi) == -(-len(sampler) // 16)
    for a, b in zip(single, multi, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("parser", ["c", "numpy"])
def test_small_units_and_flushes_give_the_same_store(built, inputs, tmp_path, monkeypatch, parser) -> None:
    """Many FASTA units, many hash-partition flushes and split chunks, with either FASTA parser (the C
    accelerator or the numpy path that replaces it): the same bytes as one big step."""
    from prott5nv.data import fastscan

    if parser == "numpy":
        monkeypatch.setattr(fastscan, "_fastscan", None)
    monkeypatch.setattr(fastscan, "_CHUNK", 4096)
    monkeypatch.setattr(pp._HashPartitions, "_FLUSH", 300)
    monkeypatch.setattr(pp, "_CHUNK_RECORDS", 257)
    data, manifest = built
    again = preprocess(inputs, tmp_path / "small", CFG)
    assert again["counts"] == manifest["counts"] and again["splits"] == manifest["splits"]
    for name in ("residues.bin", "ids.bin", "offsets.npy", "id_offsets.npy"):
        assert (tmp_path / "small" / "sequences" / name).read_bytes() == (data / "sequences" / name).read_bytes()
    for split in SPLITS:
        assert np.array_equal(np.load(tmp_path / "small" / f"{split}.npy"), np.load(data / f"{split}.npy"))


@pytest.mark.parametrize("flush", [97, 1 << 22])
def test_hash_partitions_confirm_matches_on_the_bytes(swissprot_2k, naive_fasta, tmp_path, flush) -> None:
    """Duplicates found one partition at a time (spilled to disk) or all at once (in memory) equal a
    plain first-occurrence pass, even when distinct sequences are given the same hash (the bytes
    decide)."""
    seqs = [s for _, s, _ in naive_fasta(swissprot_2k)[:300]]
    seqs = seqs + seqs[::7] + seqs[:40:3]  # exact copies, some twice
    colliding = set(seqs[:300:5])  # distinct sequences given one hash
    hashes = np.array([hash(seqs[0]) if s in colliding else hash(s) for s in seqs], np.int64)
    parts = pp._HashPartitions(tmp_path, "h")
    parts._FLUSH, parts._BATCH = flush, 41  # spilled: in batches of about 41 pairs
    for a in range(0, len(seqs), 50):
        parts.append(hashes[a : a + 50], np.arange(a, min(a + 50, len(seqs))))
    keep = np.ones(len(seqs), bool)
    keep[3] = False  # already dropped: never a first copy
    count, pairs = parts.duplicates(lambda i, j: seqs[i] == seqs[j], keep, 5)
    expected, seen = np.ones(len(seqs), bool), set()
    expected[3] = False
    for i, s in enumerate(seqs):
        if i != 3:
            expected[i] = s not in seen
            seen.add(s)
    assert np.array_equal(keep, expected) and count == int((~expected).sum()) - 1
    assert [later for _, later in pairs] == np.flatnonzero(~expected)[1:6].tolist()
    assert all(seqs[first] == seqs[later] and first < later for first, later in pairs)
    assert not any(p.exists() for p in parts.paths)


def test_true_positions_match_flatnonzero(monkeypatch) -> None:
    monkeypatch.setattr(pp, "_CHUNK_RECORDS", 10)
    mask = np.random.default_rng(0).random(1000) < 0.3
    ranks = np.random.default_rng(1).choice(int(mask.sum()), 50, replace=False)
    assert np.array_equal(pp._true_positions(mask, ranks), np.flatnonzero(mask)[ranks])


def test_preprocess_imports_no_torch() -> None:
    """`prott5nv preprocess` starts without the model stack (fast start, small memory): neither the
    command's modules nor the whole `prott5nv` parser (every sub-command registered) import torch."""
    import subprocess
    import sys

    code = ("import sys, prott5nv.cli, prott5nv.cli.preprocess, prott5nv.data.preprocess; prott5nv.cli.build_parser(); "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
    from prott5nv.cli.common import DTYPE_NAMES
    from prott5nv.device import DTYPES

    assert DTYPE_NAMES == tuple(DTYPES)
