"""Load test of `prott5nv serve`: N concurrent clients for a fixed time against offline `embed`.

The same real proteins (the first `--proteins` of Swiss-Prot with at most 512 residues, from --fasta:
benchmarks/_data.py) are embedded twice on this machine in one run:

* offline: :func:`prott5nv.inference.embed.embed_fasta` -- what `prott5nv embed` runs -- in this process,
  with `--threads` torch threads, once before and once after the served phase (this machine is noisy;
  their mean is the reference);
* served: `python -m prott5nv serve --threads T` in a subprocess; `--clients` threads each send requests
  of `--per-request` proteins (cycling through the list) for `--duration` seconds with
  :class:`prott5nv.client.Client` (no retries, so every refusal counts as an error).

Prints throughput (residues/s and proteins/s), request latency p50/p99, errors, and the ratio
served/offline (target >= 0.8).

    python benchmarks/serve_load.py [--threads 1] [--clients 4] [--duration 20] [--per-request 16]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from _data import swissprot  # benchmarks/_data.py, beside this script

import prott5nv
from prott5nv.client import Client, ServerError
from prott5nv.fasta import read_fasta, write_fasta
from prott5nv.inference.embed import EmbedOptions, embed_fasta


def load_proteins(path: Path, n: int, max_length: int) -> list[tuple[str, str]]:
    out = []
    for rec in read_fasta(path):
        if len(rec.sequence) <= max_length:
            out.append((rec.id, rec.sequence))
            if len(out) == n:
                break
    return out


def offline(model: prott5nv.ProtT5nv, fasta: Path, batch_tokens: int) -> float:
    """Residues per second of the offline embedding pipeline (HDF5 output into a temporary file)."""
    with tempfile.TemporaryDirectory() as tmp:
        summary = embed_fasta(model, fasta, Path(tmp) / "out.h5", EmbedOptions(batch_tokens=batch_tokens))
    return summary.residues / summary.seconds


def start_server(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "prott5nv", "serve", "--model", args.model, "--port", str(port),
           "--threads", str(args.threads), "--batch-tokens", str(args.batch_tokens), "--no-access-log",
           "--max-queue", str(max(64, 4 * args.clients))]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("server did not start within 120 s")


def load(url: str, proteins: list[tuple[str, str]], args: argparse.Namespace) -> dict:
    """`clients` threads sending requests for `duration` seconds; latencies, residues, errors."""
    chunks = [proteins[i : i + args.per_request] for i in range(0, len(proteins), args.per_request)]
    lock = threading.Lock()
    state = {"next": 0, "latencies": [], "residues": 0, "proteins": 0, "errors": 0, "messages": set()}
    stop_at = time.perf_counter() + args.duration

    def client_loop() -> None:
        client = Client(url, retries=0)
        while time.perf_counter() < stop_at:
            with lock:
                chunk = chunks[state["next"] % len(chunks)]
                state["next"] += 1
            t0 = time.perf_counter()
            try:
                vectors = client.embed([s for _, s in chunk], [i for i, _ in chunk])
                ok = len(vectors) == len(chunk)
            except ServerError as exc:
                ok = False
                state["messages"].add(str(exc)[:200])
            latency = time.perf_counter() - t0
            with lock:
                if ok:
                    state["latencies"].append(latency)
                    state["residues"] += sum(len(s) for _, s in chunk)
                    state["proteins"] += len(chunk)
                else:
                    state["errors"] += 1

    client = Client(url)
    client.embed([proteins[0][1]])  # warm-up
    busy = client.health()["busy_s"]
    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state["seconds"] = time.perf_counter() - start
    state["utilisation"] = (client.health()["busy_s"] - busy) / state["seconds"]
    return state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="prott5nv-demo")
    ap.add_argument("--fasta", type=Path, default=swissprot(), help="real proteins (default: %(default)s)")
    ap.add_argument("--proteins", type=int, default=1000, help="distinct proteins used (default: 1000)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, server and offline (default: 1)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent client threads (default: 4)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load (default: 20)")
    ap.add_argument("--per-request", type=int, default=16, help="proteins per request (default: 16)")
    ap.add_argument("--batch-tokens", type=int, default=4096, help="server and offline (default: 4096)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    proteins = load_proteins(args.fasta, args.proteins, 512)
    residues = sum(len(s) for _, s in proteins)
    print(f"{len(proteins)} proteins ({residues} residues) from {args.fasta}; model {args.model}, "
          f"{args.threads} torch thread(s), batch tokens {args.batch_tokens}")  # fmt: skip
    model = prott5nv.load(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        fasta = Path(tmp) / "proteins.fasta"
        write_fasta(proteins, fasta)
        offline(model, fasta, args.batch_tokens)  # warm-up
        before = offline(model, fasta, args.batch_tokens)
        proc, url = start_server(args, Path(tmp) / "server.log")
        try:
            state = load(url, proteins, args)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        after = offline(model, fasta, args.batch_tokens)
    reference = (before + after) / 2
    served = state["residues"] / state["seconds"]
    lat = np.array(state["latencies"]) * 1000 if state["latencies"] else np.array([float("nan")])
    print(f"offline embed: {before:,.0f} / {after:,.0f} residues/s (before / after; mean {reference:,.0f})")
    print(f"served: {args.clients} clients x {args.per_request} proteins/request for {state['seconds']:.1f} s: "
          f"{len(state['latencies'])} requests, {state['proteins']} proteins, {served:,.0f} residues/s "
          f"({state['proteins'] / state['seconds']:.1f} proteins/s)")  # fmt: skip
    print(f"latency p50 {np.percentile(lat, 50):.0f} ms, p99 {np.percentile(lat, 99):.0f} ms; "
          f"errors {state['errors']}; model worker busy {100 * state['utilisation']:.0f}% of the time")  # fmt: skip
    for msg in sorted(state["messages"])[:5]:
        print(f"  error: {msg}")
    print(f"served / offline throughput: {served / reference:.2f} (target >= 0.80)")


if __name__ == "__main__":
    main()
