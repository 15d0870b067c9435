"""Training throughput of prott5nv's `T5Model` against transformers' `T5ForConditionalGeneration`.

Training tokens/s = (encoder + decoder non-pad tokens) / time of forward + backward + gradient clipping +
AdamW step, on T5-masked batches of real Swiss-Prot proteins (`T5Masker` + `collate_t5`, the recipe's
15 % single-residue masking), identical for every model. Models, per preset:

* ``prott5nv``: our `megatron` family, as pretraining builds it (learned absolute positions, LayerNorm
  with bias, tanh-GELU, biases everywhere, tied LM head + output bias);
* ``transformers``: HF T5 of the same shape (d_model, d_ff, heads, d_kv, layers, vocabulary 128) -- the
  architecture differs in the details: relative position buckets, RMSNorm, ReLU, no biases;
* ``prott5nv-t5``: our `t5` family loaded from those HF weights (`load_hf`): an exact like-for-like.

Each precision (fp32, bf16 autocast) runs with dropout 0.1 (the recipe) and 0.0. Steps alternate between
the models (this machine is noisy) and every model sees the same batches. Ratios are prott5nv / transformers.
On GPU, `--peak-tflops` adds model FLOPs utilisation (matmul FLOPs of the padded batch, x3 for training).

    python benchmarks/train_throughput.py [--presets tiny prott5nv-base] [--threads 1] [--steps 3]
        [--batch-size 8] [--max-residues 256] [--device cpu|cuda] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _data import swissprot  # benchmarks/_data.py, beside this script

from prott5nv.checkpoint.hf import load_hf
from prott5nv.data.masking import T5Masker, collate_t5
from prott5nv.fasta import read_fasta
from prott5nv.model.config import T5Config, preset
from prott5nv.model.fast import apply_speedups
from prott5nv.model.t5 import T5Model
from prott5nv.tokenizer import ProteinTokenizer
from prott5nv.train.trainer import set_dropout

Batch = dict[str, torch.Tensor]


def make_batches(path: Path, n: int, batch_size: int, max_residues: int) -> list[Batch]:
    """`n` masked batches of consecutive real proteins (cut to `max_residues`), padded per batch."""
    tok = ProteinTokenizer()
    masker = T5Masker(tok, seq_length=max_residues + 2, seq_length_dec=max_residues, seed=0)
    records = itertools.islice(read_fasta(path), n * batch_size)
    samples = [masker(tok.encode_residues(r.sequence[:max_residues], r.id), i) for i, r in enumerate(records)]
    return [collate_t5(samples[i : i + batch_size], tok.pad_id) for i in range(0, len(samples), batch_size)]


def tokens_of(batch: Batch) -> int:
    return int(batch["enc_mask"].sum()) + int(batch["dec_mask"].sum())


def hf_model(cfg: T5Config, dropout: float):
    import transformers

    transformers.utils.logging.disable_progress_bar()
    hf_cfg = transformers.T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, num_heads=cfg.num_heads, d_ff=cfg.d_ff,
        num_layers=cfg.num_layers, num_decoder_layers=cfg.num_decoder_layers, feed_forward_proj="relu",
        dropout_rate=dropout, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(hf_cfg)


def ours_forward(model: T5Model, b: Batch) -> torch.Tensor:
    return model(b["text_enc"], b["enc_mask"], b["text_dec"])


def hf_forward(model, b: Batch) -> torch.Tensor:
    return model(input_ids=b["text_enc"], attention_mask=b["enc_mask"], decoder_input_ids=b["text_dec"]).logits


class Trainee:
    """A model, its AdamW optimizer and forward function; `step` runs one timed training step."""

    def __init__(self, name: str, model: torch.nn.Module, forward: Callable, device: torch.device) -> None:
        self.name, self.forward, self.device = name, forward, device
        self.model = model.to(device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01)
        self.seconds, self.tokens = 0.0, 0

    def step(self, batch: Batch, dtype: torch.dtype | None, timed: bool = True) -> None:
        b = {k: v.to(self.device) for k, v in batch.items()}
        sync()
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        amp = torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with amp:
            logits = self.forward(self.model, b)
        ce = F.cross_entropy(logits.float().flatten(0, 1), b["labels"].flatten(), reduction="none")
        mask = b["loss_mask"].flatten().float()
        ((ce * mask).sum() / mask.sum()).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        sync()
        if timed:
            self.seconds += time.perf_counter() - start
            self.tokens += tokens_of(batch)


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def train_flops(cfg: T5Config, batch: Batch) -> float:
    """Matmul FLOPs of one training step (forward x 3) on the padded batch shapes."""
    b, se = batch["text_enc"].shape
    sd = batch["text_dec"].shape[1]
    d, inner, ff, v = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, cfg.vocab_size
    ffn = (3 if cfg.activation.startswith("gated-") else 2) * d * ff  # MLP parameters
    enc_layer = 2 * b * se * (4 * d * inner + ffn) + 4 * b * se * se * inner
    dec_layer = (
        2 * b * sd * (4 * d * inner + 2 * d * inner + ffn)  # self qkv+o, cross q+o, MLP
        + 2 * b * se * 2 * d * inner  # cross k, v from the encoder states
        + 4 * b * sd * (sd + se) * inner  # self- and cross-attention scores and weighted sums
    )
    head = 2 * b * sd * d * v
    return 3.0 * (cfg.num_layers * enc_layer + cfg.num_decoder_layers * dec_layer + head)


def run_preset(name: str, batches: list[Batch], args: argparse.Namespace, device: torch.device) -> None:
    cfg = preset(name)
    print(f"\n== {name}: d_model {cfg.d_model}, d_ff {cfg.d_ff}, {cfg.num_heads} heads x {cfg.d_kv}, "
          f"{cfg.num_layers}+{cfg.num_decoder_layers} layers; {len(batches)} batches of {args.batch_size}, "
          f"{sum(map(tokens_of, batches)):,} tokens")  # fmt: skip
    flops = sum(train_flops(cfg, b) for b in batches)
    for precision, dropout in itertools.product(args.precisions, args.dropouts):
        dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
        torch.manual_seed(0)
        ours = apply_speedups(T5Model(cfg))
        set_dropout(ours, dropout)
        hf = hf_model(cfg, dropout)
        trainees = [Trainee("prott5nv", ours, ours_forward, device), Trainee("transformers", hf, hf_forward, device)]
        if args.like_for_like:
            with tempfile.TemporaryDirectory() as tmp:
                hf.save_pretrained(tmp)
                twin = apply_speedups(load_hf(tmp)[0])
            set_dropout(twin, dropout)
            trainees.append(Trainee("prott5nv-t5", twin, ours_forward, device))
        for t in trainees:  # warm-up (allocator, kernels, optimizer state)
            t.step(batches[0], dtype, timed=False)
        for batch in batches:
            for t in trainees:
                t.step(batch, dtype)
        base = trainees[1].tokens / trainees[1].seconds
        parts = []
        for t in trainees:
            rate = t.tokens / t.seconds
            mfu = f", MFU {flops / t.seconds / (args.peak_tflops * 1e12):.1%}" if args.peak_tflops else ""
            parts.append(f"{t.name} {rate:8.0f} tok/s ({rate / base:.2f}x){mfu}")
        print(f"{precision} dropout {dropout}: " + " | ".join(parts), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=swissprot(), help="real proteins (default: %(default)s)")
    ap.add_argument("--presets", nargs="+", default=["tiny", "prott5nv-base"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-residues", type=int, default=256, help="proteins are cut to this many residues")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per model (each on a new batch)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    ap.add_argument("--dropouts", nargs="+", type=float, default=[0.1, 0.0])
    ap.add_argument("--no-like-for-like", dest="like_for_like", action="store_false",
                    help="skip our t5 family loaded from the transformers weights")  # fmt: skip
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak (dense, at the precision)")
    args = ap.parse_args()
    device = torch.device(args.device)
    batches = make_batches(args.data, args.steps, args.batch_size, args.max_residues)
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"# {torch.get_num_threads()} threads, {device}, torch {torch.__version__}")
        for name in args.presets:
            run_preset(name, batches, args, device)


if __name__ == "__main__":
    main()
