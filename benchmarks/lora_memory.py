"""LoRA against frozen features and full fine-tuning on the same task: trainable parameters, peak memory,
CPU time, test metric, saved predictor size.

Each mode runs through `prott5nv finetune`'s code (`prott5nv.downstream.finetune_task`) in a fresh
process, so its peak resident memory is its own: the peak (VmHWM) is reset through
``/proc/self/clear_refs`` after the model and the task are loaded, and read after the run (Linux); the
table shows it and its growth over the resident memory before the run. The modes share the task, the
seeded subsample, the head, the length cut and (for the two that train through the encoder) the number
of optimizer steps:

  frozen   embeddings computed once (no cache), the head trained on them
  lora     LoRA adapters (--rank, --alpha, --targets) on the frozen encoder + the head
  full     the whole encoder + the head (--finetune)

    python benchmarks/lora_memory.py --model prott5nv-demo --max-train 400 --max-eval 200 --steps 100

On ../shared/data/localization_dev.csv.gz (beside the repository; its train/val/test split). The
equivalent commands:

    prott5nv finetune DATA --head linear --max-train 400 --max-eval 200 --truncate --max-length 256 --no-cache -o R
    prott5nv finetune DATA --lora --head linear ... --max-steps 100 --max-epochs 100 -o R
    prott5nv finetune DATA --finetune --head linear ... --max-steps 100 --max-epochs 100 -o R
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "../shared/data/localization_dev.csv.gz"
MODES = ("frozen", "lora", "full")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _cpu_seconds() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def worker(args: argparse.Namespace) -> dict:
    import torch

    import prott5nv
    from prott5nv.downstream.options import FitOptions
    from prott5nv.downstream.run import finetune_task

    torch.set_num_threads(args.threads)
    model = prott5nv.load(args.model)
    mode = args.worker
    opts = FitOptions(head=args.head, lora=mode == "lora", finetune=mode == "full", lora_rank=args.rank,
                      lora_alpha=args.alpha, lora_targets=args.targets, batch_size=args.batch_size,
                      max_steps=None if mode == "frozen" else args.steps,
                      max_epochs=args.frozen_epochs if mode == "frozen" else 10**6,
                      patience=args.patience, lr=args.lr)  # fmt: skip
    out = Path(args.out_dir) / mode
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident size (VmHWM) to the current one
    before = _status_kib("VmRSS")
    start, cpu = time.perf_counter(), _cpu_seconds()
    summary = finetune_task(args.data, out, model=model, options=opts, max_train=args.max_train,
                            max_eval=args.max_eval, max_length=args.max_length, long_policy="truncate",
                            cache_dir=None)  # fmt: skip
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    peak = _status_kib("VmHWM")
    test = summary.metrics["test"]
    files = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.suffix != ".png")
    report = json.loads((out / "metrics.json").read_text())
    return {"mode": mode, "trainable": summary.trainable, "rss_before_mib": before / 1024, "peak_mib": peak / 1024,
            "growth_mib": (peak - before) / 1024, "seconds": seconds, "cpu_seconds": cpu, "accuracy": test["accuracy"],
            "macro_f1": test["macro_f1"], "predictor_bytes": files, "best_epoch": summary.best_epoch,
            "steps": report["history"][-1]["step"] if report["history"] else 0}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="default: ../shared/data/localization_dev.csv.gz")
    ap.add_argument("--model", default="prott5nv-demo")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--max-train", type=int, default=400)
    ap.add_argument("--max-eval", type=int, default=200)
    ap.add_argument("--max-length", type=int, default=256, help="proteins cut to this many residues")
    ap.add_argument("--head", default="linear")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps of lora and full")
    ap.add_argument("--frozen-epochs", type=int, default=100, help="epochs at most of the frozen head")
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--lr", type=float, default=None, help="default: each mode's (FitOptions)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--targets", default="q,k,v,o")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default=None, help="run directories and results.json (default: a temp dir)")
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="lora_memory_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--out-dir", str(out_dir), "--worker", mode]  # last wins
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"{mode} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"{mode} done in {rows[-1]['seconds']:.0f} s", file=sys.stderr)
    (out_dir / "results.json").write_text(json.dumps({"settings": vars(args) | {"data": str(args.data)},
                                                       "rows": rows}, indent=2) + "\n")  # fmt: skip
    print(f"{args.data.name}: {args.max_train} train / {args.max_eval} val and test proteins, cut to "
          f"{args.max_length} residues, {args.head} head, {args.steps} steps of batch {args.batch_size} (lora, full)")
    print("| mode | trained parameters | peak RSS (MiB) | growth in the run (MiB) | CPU time (s) | test accuracy | "
          "macro-F1 | predictor files |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['mode']} | {r['trainable']:,} | {r['peak_mib']:.0f} | {r['growth_mib']:.0f} | "
              f"{r['cpu_seconds']:.0f} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | "
              f"{r['predictor_bytes'] / 1e6:.2f} MB |")
    print(f"results -> {out_dir / 'results.json'}")


if __name__ == "__main__":
    main()
