"""Embedding throughput, accuracy, start-up and memory of `prott5nv embed` against HF transformers
`T5EncoderModel` (and ONNX Runtime) on the same weights, at ProtT5nv-base or ProtT5-XL shape.

Shapes (`--shape`), both T5 encoders of the `t5` family (relative position buckets, RMSNorm, ReLU,
vocabulary 128), so transformers can run them too (ProtT5nv's own `megatron` family it cannot):
  * base: ProtT5nv's size -- 12 layers, d_model 768, 12 heads of 64, d_ff 3072 (85M parameters)
  * xl:   Rostlab's ProtT5-XL-U50 encoder (`prot_t5_xl_half_uniref50-enc`, the `prot_t5_xl` preset) --
          24 layers, d_model 1024, 32 heads of 128, d_ff 16384 (1.2B parameters, 4.8 GB in fp32)
Random weights (HF's initialisation scales) are written once, one shard per layer, as an HF directory
(config.json + sharded model.safetensors, float32 unless --weights-dtype) that every contender loads.
Proteins: the first N of --min-length..--max-length residues of real Swiss-Prot proteins (--fasta; default:
benchmarks/_data.py).

Contenders, each in a subprocess of its own so that its peak resident memory (VmHWM) is its own:
  * usual:      transformers fp32, `from_pretrained`, batches of 8 in file order, padding="longest", no_grad
  * hf-bf16:    transformers bf16 (`from_pretrained(dtype=bfloat16)`, SDPA attention), length-sorted
                token-budget batches, inference_mode
  * ort:        ONNX Runtime fp32 (prott5nv's ONNX export of the same weights), length-sorted batches
  * ort-int8:   the same export dynamically quantized by onnxruntime.quantization (int8 weights, int8
                activations per tensor)
  * ours-fp32 / ours-bf16 / ours-fp16 / ours-int8: `prott5nv embed` (library path of the command: load,
                validation, batching, partial output, HDF5) with --dtype float32 / bfloat16 / float16 (CUDA) /
                bfloat16 --quantize int8 (CPU)
Residues/s count the embedding only (start-up excluded); start-up is the time from the subprocess's launch
to its first batch (prott5nv: the model loaded and the FASTA validated; transformers: `from_pretrained`
returned). Cosine to the fp32 reference (transformers fp32, else prott5nv fp32): per protein (mean over
residues, min over proteins) and per residue (min and mean over the residues of the first
--residue-proteins proteins, computed after the timed run). MFU is against a bf16 / fp32 matmul peak
measured in the same run. Default contenders: base all; xl all but ONNX (the export passes protobuf's
2 GB) and ours-fp32. `--device cuda` runs the transformers and prott5nv contenders on the GPU (peak GPU
memory reported too; the ONNX and int8 ones are CPU-only and dropped).

    python benchmarks/embed_throughput.py [--shape base|xl] [--proteins N] [--threads 2]
        [--contenders usual hf-bf16 ort ort-int8 ours-bf16 ours-int8 ours-fp32] [--weights-dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _data import swissprot  # benchmarks/_data.py, beside this script

SHAPES = {  # layers, d_model, heads, d_kv, d_ff
    "tiny": dict(num_layers=2, d_model=64, num_heads=4, d_kv=16, d_ff=256),  # checks the plumbing only
    "base": dict(num_layers=12, d_model=768, num_heads=12, d_kv=64, d_ff=3072),
    "xl": dict(num_layers=24, d_model=1024, num_heads=32, d_kv=128, d_ff=16384),
}
DEFAULTS = {  # proteins, min length, max length, contenders
    "tiny": (8, 1, 512, ["usual", "hf-bf16", "ort", "ort-int8", "ours-bf16", "ours-int8"]),
    "base": (500, 1, 512, ["usual", "hf-bf16", "ort", "ort-int8", "ours-bf16", "ours-int8"]),
    "xl": (24, 50, 500, ["usual", "hf-bf16", "ours-bf16", "ours-int8"]),
}
NAMES = {
    "usual": "transformers fp32, batch 8 in file order",
    "hf-bf16": "transformers bf16 + SDPA, length-sorted",
    "ort": "ONNX Runtime fp32, length-sorted",
    "ort-int8": "ONNX Runtime int8 (dynamic), length-sorted",
    "ours-fp32": "prott5nv embed fp32",
    "ours-bf16": "prott5nv embed bf16",
    "ours-fp16": "prott5nv embed fp16 (CUDA)",
    "ours-int8": "prott5nv embed int8 (bf16 + --quantize int8)",
}


# --------------------------------------------------------------------------------------------- weights
def write_weights(path: Path, shape: str, dtype: str) -> int:
    """A random-weight HF T5 encoder directory, one safetensors shard per layer (never the whole model in
    memory); returns the bytes of weights written."""
    import torch
    from safetensors.torch import save_file

    from prott5nv.checkpoint.hf import config_to_hf
    from prott5nv.model.config import T5Config
    from prott5nv.tokenizer import ProteinTokenizer

    s = SHAPES[shape]
    config = T5Config(family="t5", vocab_size=128, num_decoder_layers=0, activation="relu", layer_norm_epsilon=1e-6,
                      dropout_rate=0.0, attention_dropout_rate=0.0, max_position_embeddings=0, **s)  # fmt: skip
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    d, inner = s["d_model"], s["num_heads"] * s["d_kv"]

    def normal(shape: tuple[int, ...], std: float):  # noqa: ANN202
        return (torch.randn(shape, generator=gen) * std).to(torch_dtype)

    path.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    total = 0
    n = s["num_layers"]
    for i in range(-1, n):
        if i < 0:  # shared table and final norm
            state = {"shared.weight": normal((128, d), 1.0),
                     "encoder.final_layer_norm.weight": torch.ones(d, dtype=torch_dtype)}  # fmt: skip
        else:
            b = f"encoder.block.{i}.layer"
            state = {
                f"{b}.0.SelfAttention.q.weight": normal((inner, d), (d * s["d_kv"]) ** -0.5),
                f"{b}.0.SelfAttention.k.weight": normal((inner, d), d**-0.5),
                f"{b}.0.SelfAttention.v.weight": normal((inner, d), d**-0.5),
                f"{b}.0.SelfAttention.o.weight": normal((d, inner), inner**-0.5),
                f"{b}.0.layer_norm.weight": torch.ones(d, dtype=torch_dtype),
                f"{b}.1.DenseReluDense.wi.weight": normal((s["d_ff"], d), d**-0.5),
                f"{b}.1.DenseReluDense.wo.weight": normal((d, s["d_ff"]), s["d_ff"] ** -0.5),
                f"{b}.1.layer_norm.weight": torch.ones(d, dtype=torch_dtype),
            }
            if i == 0:
                state[f"{b}.0.SelfAttention.relative_attention_bias.weight"] = normal((32, s["num_heads"]), d**-0.5)
        name = f"model-{i + 2:05d}-of-{n + 1:05d}.safetensors"
        save_file(state, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(state, name))
        total += sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    hf_config = config_to_hf(config, ProteinTokenizer.for_layout("rostlab"), torch_dtype)
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    return total


def count_parameters(shape: str) -> int:
    s = SHAPES[shape]
    d, inner = s["d_model"], s["num_heads"] * s["d_kv"]
    return 128 * d + d + 32 * s["num_heads"] + s["num_layers"] * (4 * d * inner + 2 * d * s["d_ff"] + 2 * d)


def model_flops(shape: str, lengths: list[int]) -> float:
    """Forward FLOPs of the encoder over unpadded sequences (`lengths` in tokens): projections, MLP and
    the two attention matmuls (2 FLOPs per multiply-add)."""
    s = SHAPES[shape]
    inner, layers = s["num_heads"] * s["d_kv"], s["num_layers"]
    per_token = 2 * layers * (4 * s["d_model"] * inner + 2 * s["d_model"] * s["d_ff"])
    return float(sum(per_token * n + layers * 4 * n * n * inner for n in lengths))


def matmul_peak(dtype_name: str, device: str = "cpu", repeats: int = 3) -> float:
    """Best FLOP/s of an n x n matmul in `dtype` (the machine's practical peak for this thread count)."""
    import torch

    dtype, n = getattr(torch, dtype_name), 2048 if device == "cpu" else 8192
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# ---------------------------------------------------------------------------------------------- worker
def rss_mib(field: str) -> float:
    """VmRSS / VmHWM (peak) of this process in MiB (Linux); the peak from getrusage elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pad(tokens: list[np.ndarray], batch: list[int], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad one batch to its longest member ("longest" padding): (input_ids, attention_mask)."""
    longest = max(len(tokens[i]) for i in batch)
    ids = np.full((len(batch), longest), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for j, i in enumerate(batch):
        ids[j, : len(tokens[i])] = tokens[i]
        mask[j, : len(tokens[i])] = 1
    return ids, mask


def worker(args: argparse.Namespace) -> None:
    """Run one contender; write WORKDIR/NAME.json (times, memory) and NAME.npz (embeddings)."""
    import torch

    from prott5nv.data.batching import token_budget_batches
    from prott5nv.fasta import read_fasta
    from prott5nv.tokenizer import ProteinTokenizer

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    work, name = Path(args.workdir), args.worker
    hf_dir, fasta = work / "hf", work / "proteins.fasta"
    proteins = [(r.id, r.sequence) for r in read_fasta(fasta)]
    tokenizer = ProteinTokenizer.for_layout("rostlab")
    tokens = [tokenizer.encode(s, rid) for rid, s in proteins]
    lengths = [len(t) for t in tokens]
    sorted_batches = token_budget_batches(lengths, args.batch_tokens)
    check = list(range(min(args.residue_proteins, len(proteins))))
    if name.startswith("ours"):
        import h5py  # noqa: F401 - imported before the baseline below, as the libraries of the others

        import prott5nv.api  # noqa: F401
        import prott5nv.inference.embed  # noqa: F401
    elif name.startswith("ort"):
        import onnxruntime  # noqa: F401
    else:
        import transformers  # noqa: F401
    warm = torch.randn(256, 256)
    warm.to(torch.bfloat16) @ warm.to(torch.bfloat16).T  # PyTorch's one-time kernel set-up, not the model's
    report: dict = {"rss_after_import_mib": rss_mib("VmRSS")}

    def hidden_fn_hf(model, grad_ctx):  # noqa: ANN001, ANN202
        def run(batch: list[int]) -> list[np.ndarray]:
            ids, mask = pad(tokens, batch, tokenizer.pad_id)
            with grad_ctx():
                h = model(input_ids=torch.from_numpy(ids).to(device),
                          attention_mask=torch.from_numpy(mask).to(device)).last_hidden_state.float().cpu()  # fmt: skip
            return [h[j, : lengths[i] - 1].numpy() for j, i in enumerate(batch)]  # drop </s>

        return run

    def hidden_fn_ort(session):  # noqa: ANN001, ANN202
        def run(batch: list[int]) -> list[np.ndarray]:
            ids, mask = pad(tokens, batch, tokenizer.pad_id)
            h = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
            return [h[j, : lengths[i] - 1] for j, i in enumerate(batch)]

        return run

    if name.startswith("ours"):
        import h5py

        from prott5nv.api import load
        from prott5nv.inference.embed import EmbedOptions, embed_fasta

        dtype = {"ours-fp32": "float32", "ours-fp16": "float16"}.get(name, "bfloat16")
        model = load(hf_dir, device=device, dtype=dtype, quantize="int8" if name == "ours-int8" else None)
        marks: dict[str, float] = {}
        out = work / f"{name}.h5"
        opts = EmbedOptions(batch_tokens=args.batch_tokens)
        embed_fasta(model, fasta, out, opts, on_start=lambda p, r: marks.setdefault("ready", time.time()))
        report["ready"], report["seconds"] = marks["ready"], time.time() - marks["ready"]
        report["peak_rss_mib"] = rss_mib("VmHWM")
        with h5py.File(out) as f:
            means = [f[rid][()] for rid, _ in proteins]

        def run(batch: list[int]) -> list[np.ndarray]:
            hiddens, _ = model.tokens_to_hiddens([tokens[i] for i in batch])
            return [hiddens[j, : lengths[i] - 1].cpu().numpy() for j, i in enumerate(batch)]

    else:
        if name.startswith("ort"):
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
            onnx = work / ("encoder_int8.onnx" if name == "ort-int8" else "encoder.onnx")
            run = hidden_fn_ort(ort.InferenceSession(str(onnx), opts, providers=["CPUExecutionProvider"]))
            batches = sorted_batches
        else:
            import transformers

            transformers.utils.logging.disable_progress_bar()
            if name == "usual":
                hf = transformers.T5EncoderModel.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
                run, batches = hidden_fn_hf(hf, torch.no_grad), [list(range(i, min(i + 8, len(tokens))))
                                                                 for i in range(0, len(tokens), 8)]  # fmt: skip
            else:
                hf = transformers.T5EncoderModel.from_pretrained(hf_dir, dtype=torch.bfloat16,
                                                                 attn_implementation="sdpa")  # fmt: skip
                hf = hf.to(device).eval()
                run, batches = hidden_fn_hf(hf, torch.inference_mode), sorted_batches
        report["ready"] = time.time()
        means: list = [None] * len(tokens)
        for batch in batches:
            for i, h in zip(batch, run(batch), strict=True):
                means[i] = h.mean(0)
        report["seconds"] = time.time() - report["ready"]
        report["peak_rss_mib"] = rss_mib("VmHWM")
    if device.type == "cuda":
        report["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    by_index: dict[int, np.ndarray] = {}  # per-residue states of the first proteins, after the timed run
    for b in token_budget_batches([lengths[i] for i in check], args.batch_tokens):
        batch = [check[i] for i in b]
        by_index.update(zip(batch, run(batch), strict=True))
    residues = [by_index[i] for i in check]
    np.savez(work / f"{name}.npz", means=np.stack(means).astype(np.float32),
             **{f"r{i}": r.astype(np.float32) for i, r in zip(check, residues, strict=True)})  # fmt: skip
    (work / f"{name}.json").write_text(json.dumps(report))


# ---------------------------------------------------------------------------------------------- parent
def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def launch(name: str, work: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--workdir", str(work), "--threads", str(args.threads),
           "--batch-tokens", str(args.batch_tokens), "--residue-proteins", str(args.residue_proteins),
           "--device", args.device]  # fmt: skip
    start = time.time()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"contender {name} failed (exit {proc.returncode})")
    report = json.loads((work / f"{name}.json").read_text())
    report["startup"] = report["ready"] - start
    report["maxrss_mib"] = usage.ru_maxrss / 1024
    data = np.load(work / f"{name}.npz")
    report["means"] = data["means"]
    report["residues"] = {int(k[1:]): data[k] for k in data.files if k.startswith("r")}
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fasta", type=Path, default=swissprot(), help="real proteins (default: %(default)s)")
    ap.add_argument("--shape", choices=list(SHAPES), default="base")
    ap.add_argument("--proteins", type=int, default=None, help="default: 500 (base), 24 (xl)")
    ap.add_argument("--min-length", type=int, default=None, help="default: 1 (base), 50 (xl)")
    ap.add_argument("--max-length", type=int, default=None, help="default: 512 (base), 500 (xl)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--contenders", nargs="+", choices=list(NAMES), default=None)
    ap.add_argument("--weights-dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--residue-proteins", type=int, default=32, help="proteins whose per-residue cosine is checked")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (the ONNX and int8 contenders are CPU-only)")
    ap.add_argument("--weights-dir", type=Path, default=None,
                    help="keep the random weights here (an HF directory, reused when it exists; e.g. for `prott5nv "
                    "embed --model DIR`); default: a temporary directory")  # fmt: skip
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    proteins_n, min_len, max_len, contenders = DEFAULTS[args.shape]
    args.proteins = args.proteins or proteins_n
    min_len, max_len = args.min_length or min_len, args.max_length or max_len
    contenders = args.contenders or contenders
    if args.device != "cpu":
        contenders = [c for c in contenders if not c.startswith("ort") and c != "ours-int8"]

    import torch

    from prott5nv.fasta import read_fasta, write_fasta

    torch.set_num_threads(args.threads)
    records = (r for r in read_fasta(args.fasta) if min_len <= len(r.sequence) <= max_len)
    proteins = [(r.id, r.sequence) for _, r in zip(range(args.proteins), records, strict=False)]
    lengths = [len(s) + 1 for _, s in proteins]  # + </s>
    residues = sum(len(s) for _, s in proteins)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.weights_dir is not None and (args.weights_dir / "config.json").is_file():
            index = json.loads((args.weights_dir / "model.safetensors.index.json").read_text())
            weight_bytes = index["metadata"]["total_size"]
            print(f"reusing the weights in {args.weights_dir}")
        else:
            weight_bytes = write_weights(args.weights_dir or work / "hf", args.shape, args.weights_dtype)
        if args.weights_dir is not None:
            (work / "hf").symlink_to(args.weights_dir.resolve())
        params = count_parameters(args.shape)
        write_fasta(proteins, work / "proteins.fasta")
        if any(c.startswith("ort") for c in contenders):
            from prott5nv.checkpoint.hf import load_hf
            from prott5nv.inference.onnx_export import export_onnx

            export_onnx(load_hf(work / "hf")[0], work / "encoder.onnx")
            if "ort-int8" in contenders:
                from onnxruntime.quantization import QuantType, quantize_dynamic

                quantize_dynamic(str(work / "encoder.onnx"), str(work / "encoder_int8.onnx"),
                                 weight_type=QuantType.QInt8)  # fmt: skip
        peak = {"bfloat16": matmul_peak("bfloat16", args.device), "float32": matmul_peak("float32", args.device)}
        print(f"{args.shape} shape ({params / 1e6:.0f}M parameters, {weight_bytes / 2**30:.2f} GiB of "
              f"weights on disk; bf16 weights {params * 2 / 2**30:.2f} GiB); {len(proteins)} proteins, "
              f"{residues} residues ({min(lengths) - 1}-{max(lengths) - 1}), {args.threads} threads, torch "
              f"{torch.__version__}; matmul peak bf16 {peak['bfloat16'] / 1e9:.0f} GFLOP/s, fp32 "
              f"{peak['float32'] / 1e9:.0f} GFLOP/s", flush=True)  # fmt: skip
        results = {}
        for name in contenders:
            results[name] = launch(name, work, args)
            r = results[name]
            gpu = f", peak GPU memory {r['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in r else ""
            print(f"  {NAMES[name]}: {residues / r['seconds']:.0f} residues/s, start-up {r['startup']:.1f} s, "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB{gpu}", flush=True)  # fmt: skip
    ref_name = "usual" if "usual" in results else "ours-fp32" if "ours-fp32" in results else None
    flops = model_flops(args.shape, lengths)
    bf16_mib = params * 2 / 2**20
    print(f"\n{'contender':46s} {'res/s':>7s} {'vs usual':>8s} {'vs hf bf16':>10s} {'MFU':>6s} {'cos prot':>8s} "
          f"{'cos res min/mean':>17s} {'start s':>7s} {'peak RSS':>9s} {'/bf16 w':>7s} {'-import':>7s}")  # fmt: skip
    usual = results.get("usual", {}).get("seconds")
    best = results.get("hf-bf16", {}).get("seconds")
    for name, r in results.items():
        peak_flops = peak["float32"] if name in ("usual", "ort", "ours-fp32") else peak["bfloat16"]  # fp16: = bf16
        vs_usual = f"{usual / r['seconds']:7.2f}x" if usual else "n/a"
        vs_best = f"{best / r['seconds']:9.2f}x" if best else "n/a"
        if ref_name is not None:
            prot = f"{cosines(r['means'], results[ref_name]['means']).min():8.5f}"
            res = np.concatenate([cosines(r["residues"][i], results[ref_name]["residues"][i]) for i in r["residues"]])
            res_text = f"{res.min():.4f}/{res.mean():.5f}" if res.size else "n/a"
        else:
            prot, res_text = "n/a", "n/a"
        print(f"{NAMES[name]:46s} {residues / r['seconds']:7.0f} {vs_usual:>8s} {vs_best:>10s} "
              f"{flops / r['seconds'] / peak_flops:6.1%} {prot:>8s} {res_text:>17s} {r['startup']:7.1f} "
              f"{r['peak_rss_mib'] / 1024:7.2f}Gi {r['peak_rss_mib'] / bf16_mib:6.2f}x "
              f"{(r['peak_rss_mib'] - r['rss_after_import_mib']) / bf16_mib:6.2f}x")  # fmt: skip
    print(f"(cosines against {NAMES.get(ref_name, 'nothing')}; '/bf16 w': peak RSS over the bf16 weights' size "
          f"({bf16_mib:.0f} MiB); '-import': the same after subtracting the process's RSS once its libraries "
          "were imported and PyTorch had run a first bf16 matmul)")  # fmt: skip


if __name__ == "__main__":
    main()
