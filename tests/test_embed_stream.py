"""`embed` at scale: resume after SIGKILL/Ctrl-C, bounded memory, long-protein chunking, batch invariance,
output formats, sharding over processes, ONNX export. Real proteins from tests/data throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import DEMO_DIM, PROTEOME, SAMPLE_FASTA, SWISSPROT, copy_first_records

import prott5nv
from prott5nv.cli import main
from prott5nv.device import bf16_supported, resolve_dtype
from prott5nv.fasta import write_fasta
from prott5nv.inference.chunking import chunk_starts, owned_spans, owners
from prott5nv.inference.embed import EmbedOptions, embed_fasta
from prott5nv.inference.store import PartialRun, partial_path

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "prott5nv", *map(str, args)]




def read_h5(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path) as f:
        return {k: f[k][()] for k in f}


# ------------------------------------------------------------------------------------------- resume
def test_sigkill_and_ctrl_c_then_resume_gives_the_uninterrupted_file(tmp_path, tiny_checkpoint):
    """Interrupt a run twice (SIGINT, then SIGKILL mid-write), rerun the same command: the finished file
    has the same datasets and bit-identical values as an uninterrupted run, and nothing is recomputed."""
    fasta = copy_first_records(SWISSPROT, 250, tmp_path / "sp250.fasta")
    flags = ["--per-residue", "--pooling", "mean,max", "--chunk", "--batch-tokens", "1024", "--window", "100",
             "--threads", "1", "--model", str(tiny_checkpoint)]  # fmt: skip
    whole, resumed = tmp_path / "whole.h5", tmp_path / "resumed.h5"
    subprocess.run(cli("embed", fasta, "-o", whole, *flags), env=ENV, check=True, capture_output=True)
    journal = partial_path(resumed) / "rank0.journal"
    done_counts = []
    for sig in (signal.SIGINT, signal.SIGKILL):
        proc = subprocess.Popen(cli("embed", fasta, "-o", resumed, *flags), env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        target = (done_counts[-1] if done_counts else 0) + 3
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if journal.exists() and journal.read_bytes().count(b"\n") >= target:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0 and not resumed.exists()
        if sig == signal.SIGINT:
            assert b"rerun the same command to resume" in err and b"Traceback" not in err
        done_counts.append(sum(len(json.loads(x)) for x in journal.read_bytes().splitlines()))
    assert 0 < done_counts[0] < done_counts[1] < 250
    res = subprocess.run(cli("embed", fasta, "-o", resumed, *flags), env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"; {done_counts[1]} resumed from an interrupted run" in res.stdout
    assert "embedded 250 proteins" in res.stdout
    assert not partial_path(resumed).exists()
    with h5py.File(whole) as a, h5py.File(resumed) as b:
        assert sorted(a) == sorted(b) == ["max", "mean", "per_residue"]
        for group in a:
            assert sorted(a[group]) == sorted(b[group]) and len(a[group]) == 250
            for k in a[group]:
                np.testing.assert_array_equal(a[group][k][()], b[group][k][()])


def test_torn_journal_line_is_dropped_on_resume(tmp_path):
    """A kill during the journal write leaves a partial last line (and data after the last complete
    batch): resume keeps the complete batches only and truncates both files."""
    settings = {"k": 1}
    run = PartialRun(tmp_path / "o.h5", settings)
    done = run.open(10)
    run.append([(0, "a", 3, np.arange(4, dtype=np.float32)), (3, "b", 2, np.ones(4, np.float32))])
    run.append([(5, "c", 1, np.zeros(4, np.float32))])
    run.close()
    bin_path, journal = run.dir / "rank0.bin", run.dir / "rank0.journal"
    with open(bin_path, "ab") as fh:
        fh.write(b"\x00" * 10)
    with open(journal, "ab") as fh:
        fh.write(b'[[7,"d",1,48,16')  # torn
    again = PartialRun(tmp_path / "o.h5", settings)
    done = again.open(10)
    assert np.flatnonzero(done).tolist() == [0, 3, 5] and again.resumed == 3
    assert bin_path.stat().st_size == 48 and journal.read_bytes().count(b"\n") == 2
    again.append([(7, "d", 1, np.full(4, 7, np.float32))])
    again.finish()
    stored = {p.id: p.data.tolist() for p in again.proteins()}
    assert stored == {"a": [0, 1, 2, 3], "b": [1] * 4, "c": [0] * 4, "d": [7] * 4}
    with pytest.raises(prott5nv.ProtT5nvError, match="other settings .*k: 1 before, 2 now.*--restart"):
        PartialRun(tmp_path / "o.h5", {"k": 2}).open(10)
    assert not PartialRun(tmp_path / "o.h5", {"k": 2}).open(10, restart=True).any()


def test_resume_with_other_settings_refused_then_restart(tmp_path, capsys):
    fasta = copy_first_records(PROTEOME, 20, tmp_path / "p.faa")
    out = tmp_path / "o.h5"
    run = PartialRun(out, {"stale": True})  # an interrupted run made with other settings
    run.open(20)
    run.close()
    assert main(["embed", str(fasta), "-o", str(out), "--truncate"]) == 2
    err = capsys.readouterr().err
    assert "holds an interrupted run with other settings" in err and "--restart" in err
    assert main(["embed", str(fasta), "-o", str(out), "--truncate", "--restart"]) == 0
    assert len(read_h5(out)) == 20 and not partial_path(out).exists()


# ------------------------------------------------------------------------------------------- memory
_RSS_SCRIPT = r"""
import gzip, resource, sys
from prott5nv.fasta import read_fasta
from prott5nv.cli import main
src, copies, out, model = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
real = [(r.id, r.sequence) for r in read_fasta(src)]
with open(out + ".fasta", "w") as fh:  # real sequences repeated under new ids
    for c in range(copies):
        for rid, seq in real:
            fh.write(f">{rid}_copy{c}\n{seq}\n")
del real
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
code = main(["embed", out + ".fasta", "-o", out, "--per-residue", "--max-length", "64", "--truncate",
             "--window", "256", "--threads", "1", "--model", model])
print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
"""


def test_memory_stays_bounded_on_a_large_input(tmp_path, tiny_checkpoint):
    """Peak memory of embedding 18,000 proteins (295 MB of per-residue output) exceeds that of 3,000 by
    far less than the output size: results stream to disk, input streams from it."""
    peaks = {}
    for copies in (1, 6):
        out = tmp_path / f"o{copies}.h5"
        script = [sys.executable, "-c", _RSS_SCRIPT, str(SWISSPROT), str(copies), str(out), str(tiny_checkpoint)]
        res = subprocess.run(script, env={**ENV, "TQDM_DISABLE": "1"}, capture_output=True, text=True, check=True)
        code, kib = map(int, res.stdout.splitlines()[-1].split())
        assert code == 0
        peaks[copies] = kib * 1024
        with h5py.File(out) as f:
            assert len(f) == 3000 * copies
    output_bytes = 18000 * 64 * 64 * 4  # residues x tiny's width x fp32
    assert peaks[6] - peaks[1] < 0.5 * output_bytes, peaks  # reading blocks of 8 MiB adds ~30 MB


_PEAK_SCRIPT = r"""
import resource, sys
from prott5nv.cli import main
code = main(sys.argv[1:])
print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_a_protein_of_millions_of_residues_streams_in_bounded_memory(tmp_path, tiny_checkpoint):
    """`embed --chunk` on one 2,000,000-residue protein (real Swiss-Prot sequences, concatenated) with
    per-residue output: peak memory exceeds that of a run on three ordinary proteins by far less than the
    output (2M x 64 x 4 bytes = 512 MB; issue 16 measured 1 -> 5 GB with the demo model at 5M residues;
    here 59 MB more than for three proteins, where the code before held every window and was killed).
    The windows are embedded in order, each one's residues added to the poolings and written to disk at
    once, and the merge copies the rows into the HDF5 file block by block."""
    real = "".join(r.sequence for r in prott5nv.read_fasta(SWISSPROT))
    length = 2_000_000
    write_fasta([("concatenated", (real * (length // len(real) + 1))[:length])], tmp_path / "long.fa")
    copy_first_records(SWISSPROT, 3, tmp_path / "short.fa")
    peaks = {}
    for name in ("short", "long"):
        argv = ["embed", tmp_path / f"{name}.fa", "-o", tmp_path / f"{name}.h5", "--chunk", "--chunk-overlap", "64",
                "--per-residue", "--pooling", "mean,max", "--threads", "1", "--model", tiny_checkpoint]  # fmt: skip
        res = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, *map(str, argv)], env={**ENV, "TQDM_DISABLE": "1"},
                             capture_output=True, text=True, check=True)  # fmt: skip
        code, kib = map(int, res.stdout.splitlines()[-1].split())
        assert code == 0, res.stderr[-2000:]
        peaks[name] = kib * 1024
    output_bytes = length * 64 * 4
    assert peaks["long"] - peaks["short"] < 0.25 * output_bytes, peaks
    with h5py.File(tmp_path / "long.h5") as f:
        rows = f["per_residue"]["concatenated"]
        assert rows.shape == (length, 64)
        total, top = np.zeros(64), np.full(64, -np.inf, np.float32)
        for lo in range(0, length, 1 << 18):  # the file, read block by block
            block = rows[lo : lo + (1 << 18)]
            total += block.sum(0, dtype=np.float64)
            top = np.maximum(top, block.max(0))
        np.testing.assert_allclose(f["mean"]["concatenated"][()], total / length, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(f["max"]["concatenated"][()], top)


def test_progress_moves_within_a_chunked_protein(tmp_path, tiny_model):
    """The residues of a long protein are reported batch by batch as its windows are embedded, not only
    when it is complete (issue 16: the bar sat at 0% for 90 s); they add up to the protein's length."""
    recs = [r for r in prott5nv.read_fasta(SWISSPROT) if len(r.sequence) > 300][:10]
    long = "".join(r.sequence for r in recs)
    write_fasta([("short", recs[0].sequence[:50]), ("long", long)], tmp_path / "in.fa")
    calls = []
    opts = EmbedOptions(long_policy="chunk", max_length=64, chunk_overlap=16, batch_tokens=4 * 65)
    embed_fasta(tiny_model, tmp_path / "in.fa", tmp_path / "o.h5", opts, on_batch=lambda p, r: calls.append((p, r)))
    assert sum(r for _, r in calls) == 50 + len(long) and sum(p for p, _ in calls) == 2
    within = [r for p, r in calls if p == 0]  # batches that finished no protein: windows of the long one
    assert len(within) > 10 and all(0 < r <= 4 * 64 for r in within)


# ------------------------------------------------------------------------------------------- chunks
def test_owned_spans_are_the_farthest_from_edges_rule():
    """Each residue comes from the window in which it is farthest from an edge (ties: the earlier one):
    computed from the window starts alone (no residue-by-window table, which at 5M residues and 13,000
    windows would not fit in memory), checked against that table for every small layout."""
    for size in (2, 3, 8, 33, 64):
        for overlap in range(size):
            for length in range(1, 3 * size + 5):
                starts = chunk_starts(length, size, overlap)
                pos = np.arange(length)[None, :]
                s = np.asarray(starts)[:, None]
                margin = np.where((pos >= s) & (pos < s + size), np.minimum(pos - s, s + size - 1 - pos), -1)
                np.testing.assert_array_equal(owners(length, starts, size), margin.argmax(0))
                spans = owned_spans(length, starts, size)
                assert spans[0][0] == 0 and spans[-1][1] == length
                assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_chunk_windows_cover_with_overlap_and_owner_is_farthest_from_edges():
    assert chunk_starts(400, 512, 128) == [0]
    for length in (513, 700, 1000, 5000):
        starts = chunk_starts(length, 512, 128)
        assert starts[0] == 0 and starts[-1] == length - 512
        assert all(0 < b - a <= 512 - 128 for a, b in zip(starts, starts[1:], strict=False))
    starts = chunk_starts(1000, 512, 128)  # [0, 244, 488]
    own = owners(1000, starts, 512)
    for p in (0, 100, 377, 378, 600, 999):
        margins = [min(p - s, s + 511 - p) if s <= p < s + 512 else -1 for s in starts]
        assert own[p] == int(np.argmax(margins))
    assert own[377] == 0 and own[378] == 1  # the midpoint of the overlap of windows 0 and 1


def test_chunked_equals_unchunked_for_short_and_windows_for_long(tmp_path):
    """A protein shorter than the window is embedded identically with --chunk; a long one is stitched
    from its windows, each residue exactly as embedded in its owner window, mean over stitched residues."""
    recs = list(prott5nv.read_fasta(PROTEOME))
    short = [r for r in recs if len(r.sequence) < 150][:3]
    long = [r for r in recs if 700 <= len(r.sequence) <= 900][:1]
    fasta = tmp_path / "mix.fasta"
    write_fasta([(r.id, r.sequence) for r in short + long], fasta)
    plain, chunked = tmp_path / "plain.h5", tmp_path / "chunked.h5"
    assert main(["embed", str(fasta), "-o", str(plain), "--per-residue", "--pooling", "mean", "--truncate"]) == 0
    assert main(["embed", str(fasta), "-o", str(chunked), "--per-residue", "--pooling", "mean", "--chunk",
                 "--chunk-size", "300", "--chunk-overlap", "100", "--batch-tokens", "300"]) == 0  # fmt: skip
    with h5py.File(plain) as a, h5py.File(chunked) as b:
        assert b.attrs["long_policy"] == "chunk" and b.attrs["chunk_size"] == 300
        for r in short:  # each alone in a batch in both runs (batch tokens 300 vs one window)
            np.testing.assert_allclose(a["per_residue"][r.id][()], b["per_residue"][r.id][()], atol=1e-5)
        r = long[0]
        stitched = b["per_residue"][r.id][()]
        assert stitched.shape == (len(r.sequence), DEMO_DIM)
        np.testing.assert_allclose(b["mean"][r.id][()], stitched.mean(0), rtol=1e-5, atol=1e-6)
    model = prott5nv.load("prott5nv-demo")
    starts = chunk_starts(len(r.sequence), 300, 100)
    own = owners(len(r.sequence), starts, 300)
    for k, s in enumerate(starts):
        window, _ = model.seqs_to_hiddens([r.sequence[s : s + 300]])
        sel = np.flatnonzero(own == k)
        np.testing.assert_allclose(stitched[sel], window[0].numpy()[sel - s], atol=1e-5)


# ------------------------------------------------------------------------------------------- batches
def test_same_protein_same_embedding_whatever_its_batch(tmp_path):
    fasta = copy_first_records(SAMPLE_FASTA, 48, tmp_path / "s.fasta")
    alone, together = tmp_path / "alone.h5", tmp_path / "together.h5"
    assert main(["embed", str(fasta), "-o", str(alone), "--batch-tokens", "1"]) == 0
    assert main(["embed", str(fasta), "-o", str(together), "--batch-tokens", "100000"]) == 0
    a, b = read_h5(alone), read_h5(together)
    assert sorted(a) == sorted(b) and len(a) == 48
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- formats
def test_every_format_reads_back_the_same_values(tmp_path, capsys):
    records = list(prott5nv.read_fasta(SAMPLE_FASTA))
    args = ["--pooling", "mean,first", "--per-residue"]
    assert main(["embed", str(SAMPLE_FASTA), "-o", str(tmp_path / "e.h5"), *args]) == 0
    assert main(["embed", str(SAMPLE_FASTA), "-o", str(tmp_path / "e_npy"), *args]) == 0
    with h5py.File(tmp_path / "e.h5") as f:
        h5 = {k: {r.id: f[k][r.id][()] for r in records} for k in ("mean", "first", "per_residue")}
        assert f.attrs["pooling"] == "mean,first" and f["mean"][records[0].id].attrs["original_id"] == records[0].id
    lines = (tmp_path / "e_npy" / "index.tsv").read_text().splitlines()
    assert lines[0] == "record\tid\tlength\tmean\tfirst\tper_residue" and len(lines) == 49
    for line in lines[1:]:
        record, rid, length, mean, first, per_res = line.split("\t")
        assert records[int(record)].id == rid and len(records[int(record)].sequence) == int(length)
        np.testing.assert_array_equal(np.load(tmp_path / "e_npy" / mean), h5["mean"][rid])
        np.testing.assert_array_equal(np.load(tmp_path / "e_npy" / first), h5["per_residue"][rid][0])
        np.testing.assert_array_equal(np.load(tmp_path / "e_npy" / per_res), h5["per_residue"][rid])
    for rid, res in h5["per_residue"].items():
        np.testing.assert_allclose(h5["mean"][rid], res.mean(0), rtol=1e-5, atol=1e-6)
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pyarrow is the optional extra "parquet" (in "test"): without it, a clear error
        assert main(["embed", str(SAMPLE_FASTA), "-o", str(tmp_path / "e.parquet")]) == 2
        assert "Parquet output needs pyarrow: pip install 'prott5nv[parquet]'" in capsys.readouterr().err
        return
    assert main(["embed", str(SAMPLE_FASTA), "-o", str(tmp_path / "e.parquet"), *args]) == 0
    table = pq.read_table(tmp_path / "e.parquet").to_pydict()
    assert len(table["id"]) == 48 and sorted(table["record"]) == list(range(48))
    for i, rid in enumerate(table["id"]):
        np.testing.assert_array_equal(np.asarray(table["mean"][i], np.float32), h5["mean"][rid])
        np.testing.assert_array_equal(np.asarray(table["per_residue"][i], np.float32), h5["per_residue"][rid])


# ------------------------------------------------------------------------------------------- shards
def test_two_processes_by_torchrun_merge_into_one_file(tmp_path, tiny_checkpoint):
    fasta = copy_first_records(PROTEOME, 301, tmp_path / "p.faa")
    single, sharded = tmp_path / "single.h5", tmp_path / "sharded.h5"
    flags = ["--truncate", "--threads", "1", "--model", str(tiny_checkpoint)]
    subprocess.run(cli("embed", fasta, "-o", single, *flags), env=ENV, check=True, capture_output=True)
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "prott5nv", "embed", str(fasta), "-o", str(sharded), *flags]  # fmt: skip
    res = subprocess.run(run, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "embedded 301 proteins" in res.stdout and "rank 1; rank 0 merges" in res.stdout
    a, b = read_h5(single), read_h5(sharded)
    assert sorted(a) == sorted(b) and len(a) == 301
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.faa", "sharded.h5", "single.h5"]


def test_shard_of_each_rank_is_every_world_size_th_record(tmp_path):
    """Rank r embeds records r, r+W, ...; rank 0 waits for all ranks, then merges (file barrier)."""
    fasta = copy_first_records(SAMPLE_FASTA, 10, tmp_path / "s.fasta")
    model = prott5nv.load("prott5nv-demo")
    out = tmp_path / "o.h5"
    embed_fasta(model, fasta, out, EmbedOptions(rank=1, world_size=3))
    embed_fasta(model, fasta, out, EmbedOptions(rank=2, world_size=3))
    run = PartialRun(out, {}, 0, 3)
    assert sorted(p.record for p in run.proteins()) == [1, 2, 4, 5, 7, 8]
    summary = embed_fasta(model, fasta, out, EmbedOptions(rank=0, world_size=3))
    assert summary.proteins == 10 and len(read_h5(out)) == 10 and not partial_path(out).exists()


# ------------------------------------------------------------------------------------------- precision
def test_auto_dtype_and_bf16_weights():
    dev = torch.device("cpu")
    assert resolve_dtype("auto", dev) == (torch.bfloat16 if bf16_supported(dev) else torch.float32)
    half = prott5nv.load("prott5nv-demo", dtype="bfloat16")
    norms = [p for m in half.model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    assert half.model.encoder.blocks[0].mlp.wi.weight.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------- onnx
def test_onnx_export_matches_pytorch_on_dynamic_shapes(tmp_path, capsys):
    import onnxruntime as ort

    out = tmp_path / "encoder.onnx"
    assert main(["export-onnx", "prott5nv-demo", "-o", str(out)]) == 0
    assert "exported the encoder of prott5nv-demo" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model = prott5nv.load("prott5nv-demo")
    recs = list(prott5nv.read_fasta(SAMPLE_FASTA))
    for group in ([r.sequence for r in recs[:3]], [recs[10].sequence], [r.sequence for r in recs[20:25]]):
        ids, mask = model.collate(model.encode(group))
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        want, res_mask = model.tokens_to_hiddens(model.encode(group))
        m = res_mask.numpy()
        np.testing.assert_allclose(got[m], want.numpy()[m], atol=2e-3, rtol=1e-3)  # fp32 kernels differ
