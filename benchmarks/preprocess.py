"""Benchmark `prott5nv preprocess` against Biopython's FASTA parser on >= 1 GB of FASTA.

The input is made from the real Swiss-Prot sample (shared/data/swissprot_dev_100k.fasta.gz) repeated
with mutations: copy k renames every record (`..._k`) and substitutes residues with a copy-specific
permutation of the 20 standard amino acids, so copies are distinct sequences. Preprocess runs in a
subprocess (its peak RSS is measured); Biopython's `SeqIO.parse` reads the same file in the same run.

    python benchmarks/preprocess.py [--size-gb 1.0] [--workdir /tmp/prott5nv-bench] [--dedup] [--threads 1]
                                    [--repeats 3]

Both sides read the same plain (uncompressed) file from a warm page cache; Biopython only parses (one
thread), preprocess parses, filters, writes the store and checksums the input (a read-ahead thread
overlaps file reading and the checksum with parsing, a writer thread the store writes). `--threads` caps
numpy/BLAS threads of both. Each side runs `--repeats` times, interleaved, and its best run counts: on a
virtual machine the first writes into memory the guest has never touched cost several times more CPU
(the hypervisor backs each new page), which is noise of the machine, not of the code. Every run's times
are printed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "swissprot_dev_100k.fasta.gz"
STANDARD = b"ACDEFGHIKLMNPQRSTVWY"


def make_input(path: Path, size: float) -> int:
    """Write about `size` bytes of mutated copies of the sample to `path`; returns the byte count."""
    sample = gzip.decompress(SAMPLE.read_bytes())
    written, k = 0, 0
    rng = random.Random(0)
    with open(path, "wb") as fh:
        while written < size:
            perm = bytearray(STANDARD)
            rng.shuffle(perm)
            table = bytes.maketrans(STANDARD, bytes(perm))
            headers = sample.split(b"\n>")
            # Mutate sequence lines only: translate everything, then put the original header lines back.
            copy = b"\n>".join(
                h.split(b"\n", 1)[0] + b"_" + str(k).encode() + b"\n" + h.split(b"\n", 1)[1].translate(table)
                if b"\n" in h
                else h
                for h in headers
            )
            fh.write(copy if copy.endswith(b"\n") else copy + b"\n")
            written += len(copy)
            k += 1
    return path.stat().st_size


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def time_biopython(path: Path) -> tuple[float, float, int]:
    """Wall and CPU seconds of parsing `path` with Biopython, and the record count."""
    from Bio import SeqIO

    start, cpu = time.perf_counter(), cpu_seconds(resource.RUSAGE_SELF)
    n = sum(1 for _ in SeqIO.parse(str(path), "fasta"))
    return time.perf_counter() - start, cpu_seconds(resource.RUSAGE_SELF) - cpu, n


def time_preprocess(path: Path, out: Path, extra: list[str]) -> tuple[float, float, int, dict]:
    """Wall seconds, CPU seconds (all threads, start-up included), peak RSS and manifest of a run."""
    # the real command line (`prott5nv preprocess`): its start-up and imports count in the peak RSS
    cmd = [sys.executable, "-m", "prott5nv", "preprocess", str(path), "-o", str(out), "--overwrite", *extra]
    start, cpu = time.perf_counter(), cpu_seconds(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, env=os.environ)
    seconds = time.perf_counter() - start
    cpu = cpu_seconds(resource.RUSAGE_CHILDREN) - cpu
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB, max over children
    return seconds, cpu, peak_kb * 1024, json.loads((out / "manifest.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/prott5nv-bench"))
    ap.add_argument("--dedup", action="store_true", help="also de-duplicate sequences")
    ap.add_argument("--keep", action="store_true", help="keep the generated FASTA and store")
    ap.add_argument("--threads", type=int, default=1, help="numpy/BLAS threads (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each side; the best counts (default 3)")
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    fasta = args.workdir / "bench.fasta"
    if not fasta.exists() or fasta.stat().st_size < args.size_gb * 1e9:
        make_input(fasta, args.size_gb * 1e9)
    size = fasta.stat().st_size
    extra = ["--max-length", "512", "--val", "4350", "--test", "0.019", "--seed", "1"]
    extra += ["--dedup"] if args.dedup else []
    subprocess.run(["cat", str(fasta)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    runs, bio_runs = [], []
    for _ in range(args.repeats):  # interleaved, so that both sides see the same machine state
        runs.append(time_preprocess(fasta, args.workdir / "store", extra))
        bio_runs.append(time_biopython(fasta))
    pre_s, pre_cpu, peak, manifest = min(runs, key=lambda r: r[3]["seconds"])
    bio_s, bio_cpu, bio_n = min(bio_runs)
    peak = max(r[2] for r in runs)
    probe = "import sys, prott5nv.cli; prott5nv.cli.build_parser(); print('torch' not in sys.modules)"
    torch_free = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert bio_n == manifest["counts"]["records"], (bio_n, manifest["counts"])
    work_s = manifest["seconds"]  # the preprocess call itself, without interpreter start-up
    print("runs (preprocess s / Biopython s): "
          + ", ".join(f"{r[3]['seconds']:.2f} / {b[0]:.2f}" for r, b in zip(runs, bio_runs, strict=True)))
    pre_rate, bio_rate = size / 1e6 / work_s, size / 1e6 / bio_s
    print(f"input: {size / 1e9:.2f} GB, {bio_n} records ({fasta}); load average {os.getloadavg()[0]:.1f}")
    print(f"prott5nv preprocess {' '.join(extra)}: {work_s:.1f} s = {pre_rate:.0f} MB/s "
          f"({pre_s:.1f} s = {size / 1e6 / pre_s:.0f} MB/s with process start-up), CPU {pre_cpu:.1f} s "
          f"(all threads), peak RSS {peak / 2**20:.0f} MiB (command line torch-free: {torch_free.strip()}); "
          f"kept {manifest['counts']['kept']}")
    print(f"Biopython {__import__('Bio').__version__} SeqIO.parse: {bio_s:.1f} s = {bio_rate:.0f} MB/s, "
          f"CPU {bio_cpu:.1f} s")
    print(f"ratio preprocess / Biopython parse: {pre_rate / bio_rate:.2f}x wall, "
          f"{bio_cpu / pre_cpu:.2f}x CPU time (the fairer figure on a busy machine)")
    uniref_s = 25e9 / 1e6 / pre_rate
    print(f"extrapolated full UniRef50 (~25 GB, ~50M records): {uniref_s:.0f} s = {uniref_s / 60:.1f} min")
    print(f"peak RSS per input record: {peak / bio_n:.1f} bytes (includes the interpreter and fixed buffers)")
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
