"""Issue 15: any encoder layer (`embed --layers`, `seqs_to_hiddens(layers=...)`) and cluster-scale embedding
(`embed --shard K/N`, `prott5nv merge`): shards merged equal a one-process run bit for bit, a killed shard
resumes, and bad sets of shards are refused in one line. Real proteins from tests/data throughout."""

from __future__ import annotations

import filecmp
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import SWISSPROT, copy_first_records

import prott5nv
from prott5nv.cli import main
from prott5nv.errors import ConfigError
from prott5nv.fasta import write_fasta
from prott5nv.inference import store
from prott5nv.inference.chunking import chunk_starts, stitch
from prott5nv.inference.embed import EmbedOptions, embed_fasta
from prott5nv.inference.shards import in_shard, shard_size
from prott5nv.inference.store import partial_path
from prott5nv.inference.writers import read_output

# a cheap embedding of real proteins: 60 Swiss-Prot records cut to 200 residues, windows of 7 records
# (9 windows: the 4 shards get 3, 2, 2 and 2 windows), the tiny 2-layer model
FLAGS = ["--truncate", "--max-length", "200", "--window", "7", "--batch-tokens", "1024", "--threads", "1"]
OPTIONS = dict(max_length=200, long_policy="truncate", window=7, batch_tokens=1024)
EXT = {"h5": ".h5", "npy": "", "parquet": ".parquet"}




def h5_contents(path: Path) -> tuple[dict, dict[str, tuple[np.ndarray, dict]]]:
    """File attributes and every dataset (with its attributes) by path."""
    out: dict[str, tuple[np.ndarray, dict]] = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, obj: out.__setitem__(name, (obj[()], dict(obj.attrs)))
                     if isinstance(obj, h5py.Dataset) else None)  # fmt: skip
        return dict(f.attrs), out


def assert_same_output(a: Path, b: Path, fmt: str) -> None:
    """`b` is `a` bit for bit: every array, attribute, id and record number, in the same order."""
    if fmt == "h5":  # HDF5 files carry creation times: compare contents
        attrs_a, data_a = h5_contents(a)
        attrs_b, data_b = h5_contents(b)
        assert attrs_a == attrs_b and list(data_a) == list(data_b)
        for name, (values, attrs) in data_a.items():
            assert values.dtype == data_b[name][0].dtype and np.array_equal(values, data_b[name][0]), name
            assert attrs == data_b[name][1], name
    elif fmt == "npy":
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        _, mismatch, errors = filecmp.cmpfiles(a, b, [p.name for p in a.iterdir()], shallow=False)
        assert mismatch == errors == []
    else:
        assert filecmp.cmp(a, b, shallow=False)


# ------------------------------------------------------------------------------------------- layers
def test_layer_numbers_follow_fair_esm(tiny_model):
    cfg = tiny_model.config  # 2 blocks: layers 0 (embedding output), 1, 2 (after the final norm)
    assert cfg.encoder_layers([-1, 0, 1]) == (2, 0, 1) and cfg.encoder_layers(-3) == (0,)
    for bad, message in (([3], "layer 3 is not a layer of this 2-layer encoder: use 0..2 or -3..-1"),
                         ([-4], "layer -4 is not a layer"), ([-1, 2], "layer 2 is given twice"), ([], "no layer")):
        with pytest.raises(ConfigError, match=message):
            cfg.encoder_layers(bad)


def test_each_layer_is_its_module_output_and_the_last_is_the_default(tiny_model, real_proteins):
    seqs = [s for _, s in real_proteins[:5]]
    default, mask = tiny_model.seqs_to_hiddens(seqs)
    stacked, mask2 = tiny_model.seqs_to_hiddens(seqs, layers=[-1, 0, 1])
    assert stacked.shape == (3, *default.shape) and torch.equal(mask, mask2)
    assert torch.equal(stacked[0], default)  # -1 is the default output, bit for bit
    net, captured = tiny_model.model, {}
    hooks = [net.embeddings.register_forward_hook(lambda m, i, o: captured.__setitem__(0, o)),
             net.encoder.blocks[0].register_forward_hook(lambda m, i, o: captured.__setitem__(1, o))]  # fmt: skip
    try:
        tiny_model.seqs_to_hiddens(seqs)
    finally:
        for h in hooks:
            h.remove()
    for k in (0, 1):  # 0: the embedding output, 1: block 1's output (no norm), padding zeroed
        assert torch.equal(stacked[k + 1], captured[k].masked_fill(~mask[..., None], 0.0))
    one, _ = tiny_model.seqs_to_hiddens(seqs, layers=1)
    assert torch.equal(one, stacked[2])  # one number: [B, L, D] of that layer
    emb = tiny_model.seqs_to_embedding(seqs, layers=[0, -1])
    assert emb.shape == (2, 5, tiny_model.embedding_dim)
    assert torch.equal(emb[1], tiny_model.seqs_to_embedding(seqs))
    torch.testing.assert_close(emb[0], tiny_model.hiddens_to_embedding(stacked[1], mask), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", list(EXT))
def test_two_layer_layout_of_each_format(tmp_path, tiny_checkpoint, fmt):
    """Several layers: one output per layer and kind, named layer{k}_{kind}; the last layer's outputs are
    the default run's, bit for bit; layer 0 is the embedding output."""
    fasta = copy_first_records(SWISSPROT, 12, tmp_path / "sp12.fasta")
    out, default = tmp_path / f"two{EXT[fmt]}", tmp_path / "default.h5"
    flags = [*FLAGS, "--model", str(tiny_checkpoint), "--pooling", "mean", "--per-residue"]
    assert main(["embed", str(fasta), "-o", str(out), *flags, "--layers", "-1,0"]) == 0
    assert main(["embed", str(fasta), "-o", str(default), *flags]) == 0
    names = ["layer2_mean", "layer2_per_residue", "layer0_mean", "layer0_per_residue"]
    records = list(prott5nv.read_fasta(fasta))
    model = prott5nv.load(str(tiny_checkpoint))
    _, base = h5_contents(default)
    if fmt == "h5":
        attrs, data = h5_contents(out)
        assert attrs["layers"] == "2,0" and sorted({n.split("/")[0] for n in data}) == sorted(names)
        got = {(n, r.id): data[f"{n}/{r.id}"][0] for n in names for r in records}
        assert all(data[f"layer0_mean/{r.id}"][1]["record"] == i for i, r in enumerate(records))
    elif fmt == "npy":
        header, *lines = (out / "index.tsv").read_text().splitlines()
        assert header.split("\t") == ["record", "id", "length", *names] and len(lines) == 12
        assert "layers\t2,0" in (out / "attrs.tsv").read_text().splitlines()
        got = {}
        for i, line in enumerate(lines):
            record, rid, _, *files = line.split("\t")
            assert (int(record), rid) == (i, records[i].id) and files[0] == f"{rid}.layer2_mean.npy"
            got.update({(n, rid): np.load(out / f) for n, f in zip(names, files, strict=True)})
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(out)
        assert table.column_names == ["record", "id", "length", *names]
        assert table.schema.metadata[b"layers"] == b"2,0" and table["record"].to_pylist() == list(range(12))
        got = {(n, rid): np.asarray(table[n][i].as_py(), np.float32)
               for n in names for i, rid in enumerate(table["id"].to_pylist())}  # fmt: skip
    for r in records:
        assert np.array_equal(got[("layer2_mean", r.id)], base[f"mean/{r.id}"][0])
        assert np.array_equal(got[("layer2_per_residue", r.id)], base[f"per_residue/{r.id}"][0])
        want, _ = model.seqs_to_hiddens([r.sequence[:200]], layers=0)  # a lookup: batch-independent
        assert np.array_equal(got[("layer0_per_residue", r.id)], want[0].numpy())
        assert got[("layer0_mean", r.id)].shape == (model.embedding_dim,)


def test_resume_with_other_layers_is_refused(tmp_path, tiny_checkpoint, capsys):
    fasta = copy_first_records(SWISSPROT, 30, tmp_path / "sp30.fasta")
    out = tmp_path / "o.h5"
    model = prott5nv.load(str(tiny_checkpoint))

    def interrupt(proteins: int, residues: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_fasta(model, fasta, out, EmbedOptions(layers=(-1, 1), **OPTIONS), on_batch=interrupt)
    assert partial_path(out).is_dir() and not out.exists()
    flags = [*FLAGS, "--model", str(tiny_checkpoint)]
    assert main(["embed", str(fasta), "-o", str(out), *flags, "--layers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "layers: [2, 1] before, [1] now" in err and "--restart" in err
    assert main(["embed", str(fasta), "-o", str(out), *flags, "--layers", "-1,1"]) == 0
    assert "resumed from an interrupted run" in capsys.readouterr().out


# ------------------------------------------------------------------------------- layers x long proteins
# --chunk windows of 200 residues overlapping by 50; blocks of 64 KiB: a protein of up to 128 residues is
# read back whole, longer ones as strided rows on disk (DiskRows), 128 residues a block
CHUNK = ["--chunk", "--max-length", "200", "--chunk-overlap", "50", "--per-residue", "--pooling", "mean,max,first",
         "--threads", "1"]  # fmt: skip


def long_and_short(path: Path) -> tuple[Path, list]:
    """Real Swiss-Prot proteins: two short (one piece, read back whole), one of 300-600 residues and the
    first of over 1,000 (chunked, streamed)."""
    recs = list(prott5nv.read_fasta(SWISSPROT))
    chosen = [r for r in recs if len(r.sequence) <= 100][:2]
    chosen += [next(r for r in recs if 300 <= len(r.sequence) <= 600), next(r for r in recs if len(r.sequence) > 1000)]
    write_fasta([(r.id, r.sequence) for r in chosen], path)
    return path, chosen


def read_all(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every protein's arrays by id (rows on disk read in while their file is open)."""
    return {rid: {k: np.asarray(v) for k, v in arrays.items()} for _, rid, _, arrays in read_output(path).proteins()}


@pytest.mark.parametrize("fmt", list(EXT))
def test_chunked_proteins_stream_every_layer(tmp_path, tiny_checkpoint, monkeypatch, fmt):
    """--chunk with two layers and every output: a long protein is streamed window by window (rows of all
    layers together) and each layer read back on its own; each layer's per-residue output is the stitching
    of that layer's window states (each window embedded alone), its poolings are over the stitched
    residues, and the last layer's outputs are the single-layer run's bit for bit."""
    monkeypatch.setattr(store, "BLOCK_BYTES", 1 << 16)
    fasta, recs = long_and_short(tmp_path / "in.fasta")
    flags = [*CHUNK, "--model", str(tiny_checkpoint)]
    out, single = tmp_path / f"layers{EXT[fmt]}", tmp_path / f"single{EXT[fmt]}"
    assert main(["embed", str(fasta), "-o", str(out), *flags, "--layers", "-1,1"]) == 0
    assert main(["embed", str(fasta), "-o", str(single), *flags]) == 0
    got, base = read_all(out), read_all(single)
    assert list(got) == list(base) == [r.id for r in recs]
    model = prott5nv.load(str(tiny_checkpoint))
    for r in recs:
        for kind in ("mean", "max", "first", "per_residue"):
            assert np.array_equal(got[r.id][f"layer2_{kind}"], base[r.id][kind]), (r.id, kind)
        n = len(r.sequence)
        starts = chunk_starts(n, 200, 50)
        size = min(n, 200)
        windows = [model.seqs_to_hiddens([r.sequence[s : s + size]], layers=[-1, 1])[0][:, 0] for s in starts]
        stitched = stitch([w.numpy().transpose(1, 0, 2) for w in windows], starts, n)  # [n, layers, D]
        for k, layer in enumerate((2, 1)):
            rows = got[r.id][f"layer{layer}_per_residue"]
            assert rows.shape == (n, model.embedding_dim) and rows.dtype == np.float32
            np.testing.assert_allclose(rows, stitched[:, k], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(got[r.id][f"layer{layer}_mean"], rows.mean(0, dtype=np.float64), rtol=1e-6,
                                       atol=1e-7)  # fmt: skip
            assert np.array_equal(got[r.id][f"layer{layer}_max"], rows.max(0))
            assert np.array_equal(got[r.id][f"layer{layer}_first"], rows[0])


@pytest.mark.parametrize("fmt", list(EXT))
def test_shards_of_chunked_layered_runs_merge_bit_for_bit(tmp_path, tiny_checkpoint, monkeypatch, fmt, capsys):
    """Shards (windows of one record) of a run with chunked proteins, two layers and per-residue output
    merge into the one-process output bit for bit; merge copies the long proteins' rows block by block
    (HDF5 and .npy shards read them as rows on disk; a Parquet row is one value, read whole)."""
    monkeypatch.setattr(store, "BLOCK_BYTES", 1 << 16)
    fasta, recs = long_and_short(tmp_path / "in.fasta")
    flags = [*CHUNK, "--model", str(tiny_checkpoint), "--layers", "0,-1", "--window", "1"]
    one = tmp_path / f"one{EXT[fmt]}"
    assert main(["embed", str(fasta), "-o", str(one), *flags]) == 0
    assert "residues, 2 chunked)" in capsys.readouterr().out
    parts = [tmp_path / f"part{k}{EXT[fmt]}" for k in (1, 2)]
    for k, part in enumerate(parts, 1):
        assert main(["embed", str(fasta), "-o", str(part), *flags, "--shard", f"{k}/2"]) == 0
        assert "residues, 1 chunked)" in capsys.readouterr().out  # its own share: records 2 and 3 are long
    on_disk = {rid for _, rid, _, arrays in read_output(parts[1]).proteins()
               if not isinstance(arrays["layer0_per_residue"], np.ndarray)}  # fmt: skip
    assert on_disk == (set() if fmt == "parquet" else {recs[3].id})  # records 1 and 3: the short and the longest
    merged = tmp_path / f"merged{EXT[fmt]}"
    assert main(["merge", str(merged), *map(str, parts)]) == 0
    assert_same_output(one, merged, fmt)


# ------------------------------------------------------------------------------------------- shards
def test_shards_are_whole_windows_dealt_round_robin():
    assert [k for k in range(1, 4) if in_shard(10, 4, (k, 3))] == [3]  # record 10 is in window 2
    assert [i for i in range(20) if in_shard(i, 3, (2, 4))] == [3, 4, 5, 15, 16, 17]
    assert [shard_size(60, 7, (k, 4)) for k in range(1, 5)] == [18, 14, 14, 14]
    assert sum(shard_size(1000, 64, (k, 5)) for k in range(1, 6)) == 1000


@pytest.mark.parametrize("fmt", list(EXT))
def test_four_shards_one_killed_and_rerun_merge_into_the_one_process_output(tmp_path, tiny_checkpoint, fmt, capsys):
    fasta = copy_first_records(SWISSPROT, 60, tmp_path / "sp60.fasta")
    flags = [*FLAGS, "--model", str(tiny_checkpoint), "--pooling", "mean,max", "--per-residue", "--layers", "-1,1"]
    one = tmp_path / f"one{EXT[fmt]}"
    assert main(["embed", str(fasta), "-o", str(one), *flags]) == 0
    parts = [tmp_path / "shards" / f"part{k}{EXT[fmt]}" for k in range(1, 5)]
    # shard 2 is stopped after its first batch (as Ctrl-C or a kill stops it): no output, a partial one
    model = prott5nv.load(str(tiny_checkpoint))
    options = EmbedOptions(per_residue=True, poolings=("mean", "max"), layers=(-1, 1), shard=(2, 4), **OPTIONS)

    def interrupt(proteins: int, residues: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_fasta(model, fasta, parts[1], options, on_batch=interrupt)
    for k in (1, 3, 4):
        assert main(["embed", str(fasta), "-o", str(parts[k - 1]), *flags, "--shard", f"{k}/4"]) == 0
        assert f"embedded {shard_size(60, 7, (k, 4))} proteins" in capsys.readouterr().out
    merged = tmp_path / f"merged{EXT[fmt]}"
    assert main(["merge", str(merged), *map(str, parts)]) == 2
    err = capsys.readouterr().err
    assert f"{parts[1]}: no such file or directory (a shard writes its output only when it finishes)" in err
    assert not merged.exists()
    assert main(["embed", str(fasta), "-o", str(parts[1]), *flags, "--shard", "2/4"]) == 0  # rerun: resumes
    out = capsys.readouterr().out
    assert "embedded 14 proteins" in out and "resumed from an interrupted run" in out
    assert not partial_path(parts[1]).exists()
    assert main(["merge", str(merged), *map(str, reversed(parts))]) == 0  # any order
    assert "merged 4 shards (60 proteins)" in capsys.readouterr().out
    assert_same_output(one, merged, fmt)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["shards", "sp60.fasta", one.name, merged.name])


@pytest.fixture(scope="module")
def h5_shards(tmp_path_factory, tiny_checkpoint):
    """Four complete HDF5 shards of 30 real proteins (windows of 7: 2, 1, 1 and 1 windows)."""
    tmp = tmp_path_factory.mktemp("shards")
    fasta = copy_first_records(SWISSPROT, 30, tmp / "sp30.fasta")
    flags = [*FLAGS, "--model", str(tiny_checkpoint)]
    parts = [tmp / f"part{k}.h5" for k in range(1, 5)]
    for k, part in enumerate(parts, 1):
        assert main(["embed", str(fasta), "-o", str(part), *flags, "--shard", f"{k}/4"]) == 0
    return fasta, flags, parts


def test_merge_refuses_missing_repeated_mismatched_and_altered_shards(h5_shards, tmp_path, capsys):
    fasta, flags, parts = h5_shards
    other = tmp_path / "other4.h5"  # shard 4 made with another layer
    assert main(["embed", str(fasta), "-o", str(other), *flags, "--shard", "4/4", "--layers", "1"]) == 0
    altered = tmp_path / "altered1.h5"  # shard 1 with a protein deleted
    altered.write_bytes(parts[0].read_bytes())
    with h5py.File(altered, "a") as f:
        del f[next(iter(f))]
    whole = tmp_path / "whole.h5"
    assert main(["embed", str(fasta), "-o", str(whole), *flags]) == 0
    capsys.readouterr()
    cases = [
        (parts[:3], "missing shard 4/4: give the output of every shard"),
        ([parts[0], parts[2]], "missing shards 2/4, 4/4"),
        ([*parts[:3], parts[2], parts[3]], f"shard 3/4 is given twice: {parts[2]} and {parts[2]}"),
        ([*parts[:3], other], f"{other} was made with other settings than {parts[0]} (layers: [2] vs [1])"),
        ([altered, *parts[1:]], f"{altered}: holds 8 of shard 1/4's 9 proteins (incomplete or altered"),
        ([whole, *parts[1:]], f"{whole}: not a shard (no 'shard' attribute)"),
    ]
    for shards, message in cases:
        out = tmp_path / "merged.h5"
        assert main(["merge", str(out), *map(str, shards)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert not out.exists() and not list(tmp_path.glob(".merged*"))
    assert main(["merge", str(tmp_path / "m.parquet"), *map(str, parts)]) == 2
    assert "the shards are h5, the output" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "merged.h5"), *map(str, parts)]) == 0
    assert_same_output(whole, tmp_path / "merged.h5", "h5")


def test_empty_shards_still_merge(tmp_path, tiny_checkpoint, caplog):
    """An input of fewer windows than shards leaves shards empty (a warning says why); they merge (Parquet:
    the format whose empty file needs the schema)."""
    fasta = copy_first_records(SWISSPROT, 10, tmp_path / "sp10.fasta")
    flags = [*FLAGS, "--model", str(tiny_checkpoint), "--window", "8"]  # 2 windows for 3 shards
    parts = [tmp_path / f"p{k}.parquet" for k in range(1, 4)]
    for k, part in enumerate(parts, 1):
        assert main(["embed", str(fasta), "-o", str(part), *flags, "--shard", f"{k}/3"]) == 0
    assert "shard 3/3 of" in caplog.text and "is empty: its 10 records make 2 window(s)" in caplog.text
    assert main(["embed", str(fasta), "-o", str(tmp_path / "one.parquet"), *flags]) == 0
    assert main(["merge", str(tmp_path / "m.parquet"), *map(str, parts)]) == 0
    assert_same_output(tmp_path / "one.parquet", tmp_path / "m.parquet", "parquet")
