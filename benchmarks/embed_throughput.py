"""Embedding throughput of `prott5nv embed` against HF transformers `T5EncoderModel` on the same weights.

A random-weight HF `T5EncoderModel` of ProtT5nv's size (d_model 768, 12 heads of 64, d_ff 3072, 12
layers, ReLU, vocabulary 128) is saved to a temporary directory and loaded into prott5nv's `t5` family
with `prott5nv.checkpoint.hf.load_hf` (transformers cannot run ProtT5nv's own `megatron` family), so every
contender runs identical weights on identical token ids (Rostlab layout, `</s>` appended). Proteins:
the first N of at most 512 residues of real Swiss-Prot proteins (--fasta; default: benchmarks/_data.py).

Contenders, all in one run (residues/s = residues / wall time; per-protein mean over residues):
  * transformers, the usual way: fp32, batches of 8 in file order, padding="longest", torch.no_grad
  * transformers, the best way: weights in bf16, length-sorted token-budget batches, inference_mode
  * ONNX Runtime fp32 (prott5nv's ONNX export of the same weights), length-sorted token-budget batches
  * prott5nv embed (the whole command path: validation, batching, partial output, HDF5), bf16
    (and fp32 with --with-fp32)
Cosine similarity of each per-protein embedding to the fp32 reference is reported (min over proteins),
and model FLOPs utilisation against a bf16 / fp32 matmul peak measured in the same run.

    python benchmarks/embed_throughput.py [--proteins 500] [--max-length 512] [--threads 2] [--with-fp32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _data import swissprot  # benchmarks/_data.py, beside this script

from prott5nv.api import ProtT5nv
from prott5nv.checkpoint.hf import load_hf
from prott5nv.data.batching import token_budget_batches
from prott5nv.fasta import read_fasta, write_fasta
from prott5nv.inference.embed import EmbedOptions, embed_fasta

D_MODEL, HEADS, D_KV, D_FF, LAYERS = 768, 12, 64, 3072, 12


def build_hf(path: Path):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=128, d_model=D_MODEL, d_kv=D_KV, num_heads=HEADS, d_ff=D_FF, num_layers=LAYERS,
        feed_forward_proj="relu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    hf = transformers.T5EncoderModel(cfg).eval()
    hf.save_pretrained(path)
    return hf


def model_flops(lengths: list[int]) -> float:
    """Forward FLOPs of the encoder over unpadded sequences (`lengths` in tokens): projections, MLP and
    the two attention matmuls (2 FLOPs per multiply-add)."""
    inner = HEADS * D_KV
    per_token = 2 * LAYERS * (4 * D_MODEL * inner + 2 * D_MODEL * D_FF)
    return float(sum(per_token * n + LAYERS * 4 * n * n * inner for n in lengths))


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    """Best FLOP/s of an n x n matmul in `dtype` (the machine's practical peak for this thread count)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b)[1] for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def mean_pool(hidden: torch.Tensor, lengths: list[int]) -> list[np.ndarray]:
    return [hidden[i, :n].float().mean(0).numpy() for i, n in enumerate(lengths)]


def pad(tokens: list[np.ndarray], batch: list[int], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad one batch to its longest member ("longest" padding): (input_ids, attention_mask)."""
    longest = max(len(tokens[i]) for i in batch)
    ids = np.full((len(batch), longest), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for j, i in enumerate(batch):
        ids[j, : len(tokens[i])] = tokens[i]
        mask[j, : len(tokens[i])] = 1
    return ids, mask


def hf_embed(hf, tokens: list[np.ndarray], batches: list[list[int]], pad_id: int, grad_ctx) -> list[np.ndarray]:
    """HF encoder over `batches` (index lists)."""
    out: list[np.ndarray | None] = [None] * len(tokens)
    for batch in batches:
        ids, mask = pad(tokens, batch, pad_id)
        with grad_ctx():
            hidden = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
        for j, v in enumerate(mean_pool(hidden, [len(tokens[i]) - 1 for i in batch])):  # drop </s>
            out[batch[j]] = v
    return out


def ort_embed(session, tokens: list[np.ndarray], batches: list[list[int]], pad_id: int) -> list[np.ndarray]:
    out: list[np.ndarray | None] = [None] * len(tokens)
    for batch in batches:
        ids, mask = pad(tokens, batch, pad_id)
        hidden = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        for j, i in enumerate(batch):
            out[i] = hidden[j, : len(tokens[i]) - 1].mean(0)
    return out


def cosine_min(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    x, y = np.stack(a).astype(np.float64), np.stack(b).astype(np.float64)
    return float(((x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)).min())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fasta", type=Path, default=swissprot(), help="real proteins (default: %(default)s)")
    ap.add_argument("--proteins", type=int, default=500)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--skip-usual", action="store_true", help="skip the slow fp32 file-order baseline")
    ap.add_argument("--with-fp32", action="store_true", help="also time prott5nv embed in fp32 (slow)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    from prott5nv.inference.onnx_export import export_onnx

    records = (r for r in read_fasta(args.fasta) if len(r.sequence) <= args.max_length)
    proteins = [(r.id, r.sequence) for _, r in zip(range(args.proteins), records, strict=False)]
    residues = sum(len(s) for _, s in proteins)
    results: dict[str, tuple[float, list[np.ndarray]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf = build_hf(tmp / "hf")
        model, tokenizer = load_hf(tmp / "hf")
        export_onnx(model, tmp / "encoder.onnx")
        fasta = tmp / "proteins.fasta"
        write_fasta(proteins, fasta)
        tokens = [tokenizer.encode(s, rid) for rid, s in proteins]
        lengths = [len(t) for t in tokens]
        in_order = [list(range(i, min(i + 8, len(tokens)))) for i in range(0, len(tokens), 8)]
        sorted_batches = token_budget_batches(lengths, args.batch_tokens)
        peak_bf16, peak_fp32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
        print(f"{len(proteins)} proteins, {residues} residues ({min(lengths) - 1}-{max(lengths) - 1}), "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}; matmul peak bf16 "
              f"{peak_bf16 / 1e9:.0f} GFLOP/s, fp32 {peak_fp32 / 1e9:.0f} GFLOP/s")  # fmt: skip

        def ours(dtype: str) -> tuple[float, list[np.ndarray]]:
            m = ProtT5nv(load_hf(tmp / "hf")[0], tokenizer, dtype=dtype, name="bench")
            out = tmp / f"ours_{dtype}.h5"
            opt = EmbedOptions(batch_tokens=args.batch_tokens)
            summary, seconds = _timed(lambda: embed_fasta(m, fasta, out, opt))
            import h5py

            with h5py.File(out) as f:
                return seconds, [f[rid][()] for rid, _ in proteins]

        if not args.skip_usual:
            results["transformers fp32, batch 8 in file order"] = _timed(
                lambda: hf_embed(hf, tokens, in_order, tokenizer.pad_id, torch.no_grad)
            )[::-1]
        results["ONNX Runtime fp32, length-sorted"] = _timed(
            lambda: ort_embed(_ort_session(ort, tmp / "encoder.onnx", args.threads), tokens, sorted_batches,
                              tokenizer.pad_id)
        )[::-1]  # fmt: skip
        if args.with_fp32 or args.skip_usual:
            results["prott5nv embed fp32"] = ours("float32")
        hf_bf16 = hf.to(torch.bfloat16)
        results["transformers bf16, length-sorted"] = _timed(
            lambda: hf_embed(hf_bf16, tokens, sorted_batches, tokenizer.pad_id, torch.inference_mode)
        )[::-1]
        results["prott5nv embed bf16"] = ours("bfloat16")
    usual_name = "transformers fp32, batch 8 in file order"
    reference = (results[usual_name] if usual_name in results else results["prott5nv embed fp32"])[1]
    flops = model_flops(lengths)
    print(f"{'contender':44s} {'residues/s':>10s} {'vs usual':>8s} {'vs best':>8s} {'MFU':>6s} {'cos min':>8s}")
    usual = results.get("transformers fp32, batch 8 in file order", (None,))[0]
    best = results["transformers bf16, length-sorted"][0]
    for name, (seconds, embs) in results.items():
        peak = peak_bf16 if "bf16" in name else peak_fp32
        vs_usual = f"{usual / seconds:7.2f}x" if usual else "    n/a"
        print(f"{name:44s} {residues / seconds:10.0f} {vs_usual:>8s} {best / seconds:7.2f}x "
              f"{flops / seconds / peak:6.1%} {cosine_min(embs, reference):8.5f}")  # fmt: skip


def _ort_session(ort, path: Path, threads: int):  # noqa: ANN001, ANN202
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


if __name__ == "__main__":
    main()
