"""The pretraining loop: T5 span corruption on a sequence store, AdamW + inverse-sqrt schedule, data
parallel over torchrun ranks (DDP, or FSDP2 with `fsdp`: :mod:`prott5nv.train.fsdp`), atomic checkpoints
with exact resume, validation, JSON-lines metrics.

Exactness: the loss of a step is the sum of target-token cross-entropies over the whole global batch
divided by its token count (all-reduced before the backward passes), so one process with accumulation
and N processes with the same global batch compute the same gradient. Samples are masked
deterministically from (seed, epoch, index), and a checkpoint stores the consumed-sample count and the
RNG states, so a resumed run continues exactly where the checkpoint was taken.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..checkpoint import load_checkpoint, save_pretrained
from ..data.dataset import T5PretrainingDataset
from ..data.masking import build_masker, collate_t5
from ..data.sampler import DistributedShuffleSampler
from ..data.store import SequenceStore, load_manifest
from ..device import resolve_device
from ..errors import ConfigError, StoreError
from ..model.config import preset
from ..model.fast import apply_speedups
from ..model.t5 import T5Model
from ..tokenizer import ProteinTokenizer
from .checkpointing import list_checkpoints, load_checkpoint_state, save_checkpoint
from .config import TrainConfig
from .distributed import DistInfo, all_reduce_sum, init_distributed, shutdown_distributed
from .fsdp import gather_model, gather_optimizer_state, load_optimizer_state, set_gradient_sync, shard_model
from .optim import build_optimizer, inverse_sqrt_lr, set_lr

log = logging.getLogger(__name__)

AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainSummary:
    steps: int
    tokens: int
    seconds: float
    final_loss: float
    val_loss: float | None
    val_ppl: float | None
    val_residue_ppl: float | None
    model_dir: str

    def line(self) -> str:
        val = (
            f", val loss {self.val_loss:.4f} (perplexity {self.val_ppl:.2f}; masked residues "
            f"{self.val_residue_ppl:.2f})"
            if self.val_loss is not None
            else ""
        )
        return (
            f"trained {self.steps} steps, {self.tokens:,} tokens in {self.seconds:.0f} s "
            f"({self.tokens / max(self.seconds, 1e-9):,.0f} tokens/s), final loss {self.final_loss:.4f}{val} "
            f"-> {self.model_dir}"
        )


# ----------------------------------------------------------------------------------------- building
def set_dropout(model: nn.Module, p: float) -> None:
    """Set every dropout probability of the network (hidden, attention, embedding) to `p`."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        if hasattr(m, "dropout") and isinstance(m.dropout, float):
            m.dropout = p


def build_model(cfg: TrainConfig) -> tuple[T5Model, ProteinTokenizer]:
    """A fresh model from the preset and overrides, or the weights of `init_from`."""
    if cfg.init_from:
        model, tokenizer = load_checkpoint(cfg.init_from)
        wanted = preset(cfg.preset).replace(**cfg.model) if cfg.model else None
        if wanted is not None:
            mismatch = {k: (getattr(model.config, k), v) for k, v in cfg.model.items() if getattr(model.config, k) != v}
            if mismatch:
                raise ConfigError(f"--init-from {cfg.init_from}: model settings differ from the checkpoint: {mismatch}")
    else:
        config = preset(cfg.preset).replace(**cfg.model)
        model, tokenizer = T5Model(config), ProteinTokenizer()
        if cfg.position_init == "sinusoidal":
            if not config.absolute_positions:
                raise ConfigError(f"position_init sinusoidal: the {config.family} family has no position table")
            model.embeddings.init_positions_sinusoidal(config.initializer_std)
        elif cfg.position_init == "local":
            if config.absolute_positions:
                raise ConfigError(f"position_init local: the {config.family} family has no relative attention bias")
            model.init_locality_prior()
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(
            f"tokenizer has {tokenizer.vocab_size} tokens, the model's vocabulary {model.config.vocab_size}"
        )
    if model.config.max_length is not None and cfg.seq_length > model.config.max_length:
        raise ConfigError(
            f"seq_length {cfg.seq_length} exceeds the model's {model.config.max_length} positions"
        )
    if model.decoder is None:
        raise ConfigError("pretraining needs an encoder-decoder model; this checkpoint is encoder-only")
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    return model, tokenizer


def initial_model(cfg: TrainConfig) -> tuple[T5Model, ProteinTokenizer]:
    """The network a fresh run of `cfg` starts from: seeded, so the same in every process and every run
    (the step-0 baseline a trained model is judged against)."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg)


class _EpochStream:
    """Batch sampler over an endless sequence of epochs for one rank: yields lists of (epoch, index)
    keys, `micro_batch_size` at a time, starting after `consumed_samples` (global count)."""

    def __init__(self, num_samples: int, info: DistInfo, seed: int, consumed: int, micro_batch_size: int):
        self.num_samples, self.info, self.seed = num_samples, info, seed
        self.consumed, self.mbs = consumed, micro_batch_size
        self.per_epoch = (num_samples // info.world_size) * info.world_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, offset = divmod(self.consumed, self.per_epoch)
        batch: list[tuple[int, int]] = []
        while True:
            sampler = DistributedShuffleSampler(
                self.num_samples, self.info.rank, self.info.world_size, self.seed, epoch, offset
            )
            for index in sampler:
                batch.append((epoch, index))
                if len(batch) == self.mbs:
                    yield batch
                    batch = []
            epoch, offset = epoch + 1, 0


def _batch_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device, encoder_loss: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the decoder's target tokens of a batch and, with `encoder_loss`, over
    the residues of denoise samples predicted from the encoder's state at their position (else 0)."""
    out = model(
        batch["text_enc"].to(device), batch["enc_mask"].to(device), batch["text_dec"].to(device),
        encoder_logits=encoder_loss,
    )  # fmt: skip
    logits, enc_logits = out if encoder_loss else (out, None)
    labels = batch["labels"].to(device)
    mask = batch["loss_mask"].to(device).float()
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    enc_ce = logits.new_zeros((), dtype=torch.float32)
    if enc_logits is not None:
        enc_labels = batch["encoder_labels"].to(device)
        enc_ce = F.cross_entropy(enc_logits.float().flatten(0, 1), enc_labels.flatten(), reduction="sum")
    return (ce * mask.flatten()).sum(), enc_ce


def _matmul_weights(model: T5Model) -> tuple[int, int]:
    """Weights a token multiplies by in the encoder and in the decoder (incl. the LM head): a training
    step costs about 6 FLOPs per weight per token (forward 2, backward 4; attention scores not counted),
    the usual numerator of MFU."""
    head = model.config.vocab_size * model.config.d_model

    def count(stack: nn.Module | None) -> int:
        if stack is None:
            return 0
        return sum(p.numel() for n, p in stack.named_parameters() if p.dim() == 2 and "relative" not in n)

    return count(model.encoder), count(model.decoder) + head


# ------------------------------------------------------------------------------------------- the loop
class Pretrainer:
    def __init__(
        self,
        cfg: TrainConfig,
        resume: bool | None = None,
        probe: Callable[[T5Model, ProteinTokenizer], dict] | None = None,
    ) -> None:
        """`resume`: True requires a checkpoint in the run directory, None resumes when one exists,
        False refuses a run directory that already has checkpoints. `probe(model, tokenizer)` -> metrics
        is called on rank 0 at step 0 and every `cfg.probe_every` steps (the CLI passes a downstream probe
        for `cfg.probe_task`)."""
        self.cfg = cfg
        if not cfg.data or not cfg.out:
            raise ConfigError("both --data and --out are required")
        if cfg.probe_task and probe is None:
            raise ConfigError("probe_task needs a probe: pass Pretrainer(cfg, probe=...) (the CLI builds it)")
        self.device = resolve_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.info = init_distributed(self.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.info.local_rank)
            torch.cuda.set_device(self.device)
        if cfg.precision == "float16" and self.device.type == "cpu":
            log.warning("fp16 on CPU is slow and rarely supported; bf16 is the CPU half precision")
        self.run_dir = Path(cfg.out)
        self.accumulate = cfg.accumulation_for(self.info.world_size)
        load_manifest(cfg.data)  # clear error for a missing/incomplete store before anything else
        self.train_store = SequenceStore.open(cfg.data, "train")
        if not len(self.train_store):  # before the run directory is made: nothing is left behind
            raise StoreError(f"{cfg.data}: the train split is empty (preprocess with a smaller --val/--test)")
        self.val_store = self._open_val()

        checkpoints = list_checkpoints(self.run_dir)
        if resume and not checkpoints:
            raise ConfigError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}")
        if resume is False and checkpoints:
            raise ConfigError(f"{self.run_dir} already has checkpoints; resume it or choose another --out")
        self.step = self.consumed = self.tokens = 0
        tensors: dict[str, Any] | None = None
        if checkpoints:
            model, self.tokenizer, tensors, state = load_checkpoint_state(checkpoints[-1])
            if cfg.dropout is not None:
                set_dropout(model, cfg.dropout)
            self.step, self.consumed, self.tokens = state["step"], state["consumed_samples"], state["tokens"]
            log.info("resuming from %s (step %d)", checkpoints[-1], self.step)
        else:
            model, self.tokenizer = initial_model(cfg)
        self.model = apply_speedups(model.to(self.device).train())  # packing, CPU dropout: same results
        self.fsdp = cfg.fsdp
        if self.fsdp:
            if not self.info.enabled:
                raise ConfigError("--fsdp shards the model over torchrun ranks: launch with torchrun "
                                  "--nproc-per-node N (N >= 2)")  # fmt: skip
            shard_model(self.model, self.device, self.info)
        self.masker = build_masker(
            cfg.objective, self.tokenizer, seq_length=cfg.seq_length, seq_length_dec=cfg.seq_length_dec,
            masked_lm_prob=cfg.masked_lm_prob, mean_span_length=cfg.mean_span_length,
            denoise_fraction=cfg.denoise_fraction, seed=cfg.seed,
        )  # fmt: skip
        self.ddp = (
            DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.info.enabled and not self.fsdp
            else None
        )
        self.optimizer = build_optimizer(self.model, cfg)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "float16" else None
        if tensors is not None:
            if self.fsdp:
                load_optimizer_state(self.model, self.optimizer, tensors["optimizer"])
            else:
                self.optimizer.load_state_dict(tensors["optimizer"])
            if self.scaler is not None and tensors["scaler"]:
                self.scaler.load_state_dict(tensors["scaler"])
            ranks = tensors.get("rank_rng") or []
            same_ranks = len(ranks) == self.info.world_size  # else (another world size): rank 0's state
            torch.set_rng_state(ranks[self.info.rank] if same_ranks else tensors["torch_rng"])
            if torch.cuda.is_available() and tensors["cuda_rng"]:
                torch.cuda.set_rng_state_all(tensors["cuda_rng"])
        else:
            torch.manual_seed(cfg.seed + self.info.rank)  # dropout differs per rank
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._tb = None
        self.probe = probe if self.info.is_main else None

    def _open_val(self) -> SequenceStore | None:
        manifest = load_manifest(self.cfg.data)
        if manifest["splits"].get("val", {}).get("sequences", 0) == 0:
            log.warning("%s has no validation split: validation is skipped", self.cfg.data)
            return None
        return SequenceStore.open(self.cfg.data, "val")

    @property
    def global_batch_size(self) -> int:
        return self.cfg.micro_batch_size * self.accumulate * self.info.world_size

    # ------------------------------------------------------------------------------------ helpers
    def _loader(self) -> Iterator[dict[str, torch.Tensor]]:
        dataset = T5PretrainingDataset(self.train_store, self.tokenizer, self.masker)
        stream = _EpochStream(len(self.train_store), self.info, self.cfg.seed, self.consumed, self.cfg.micro_batch_size)
        pad = self.tokenizer.pad_id
        loader = DataLoader(
            dataset, batch_sampler=stream, num_workers=self.cfg.num_workers,
            collate_fn=lambda samples: collate_t5(samples, pad),
            generator=torch.Generator().manual_seed(self.cfg.seed),  # keep the global RNG (dropout) untouched
        )  # fmt: skip
        return iter(loader)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.precision == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST[self.cfg.precision])

    @torch.no_grad()
    def validate(self, store: SequenceStore | None = None) -> dict[str, float] | None:
        """Loss over all target tokens (NeMo's val loss) and perplexity over the residues hidden from the
        encoder only (``corrupted``), on the first `val_samples` sequences of `store` (default: the val
        split) masked as in epoch 0."""
        store = store or self.val_store
        if store is None:
            return None
        self.model.eval()
        n = min(self.cfg.val_samples, len(store))
        mine = list(range(self.info.rank, n, self.info.world_size))
        dataset = T5PretrainingDataset(store, self.tokenizer, self.masker)
        totals = torch.zeros(4, dtype=torch.float64)
        mbs = self.cfg.micro_batch_size
        rows = len(range(0, n, self.info.world_size)) if self.fsdp else len(mine)  # FSDP: as many forwards
        for a in range(0, rows, mbs):  # as rank 0 on every rank (each forward gathers weights from all ranks)
            rows_a = mine[a : a + mbs]
            batch = collate_t5([dataset[(0, i)] for i in rows_a or [0]], self.tokenizer.pad_id)
            with self._autocast():
                logits = self.model(
                    batch["text_enc"].to(self.device), batch["enc_mask"].to(self.device),
                    batch["text_dec"].to(self.device),
                )  # fmt: skip
            if not rows_a:  # this rank had no rows left: the forward only kept the others company
                continue
            labels = batch["labels"].to(self.device)
            mask = batch["loss_mask"].to(self.device).bool()
            ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
            residue = mask & batch["corrupted"].to(self.device)
            totals += torch.tensor([ce[mask].sum().item(), mask.sum().item(), ce[residue].sum().item(),
                                    residue.sum().item()], dtype=torch.float64)  # fmt: skip
        totals = all_reduce_sum(totals, self.info)
        self.model.train()
        val_loss = float(totals[0] / max(totals[1], 1))
        residue_loss = float(totals[2] / max(totals[3], 1))
        return {"val_loss": val_loss, "val_ppl": math.exp(val_loss), "val_residue_ppl": math.exp(residue_loss)}

    def _log(self, row: dict[str, Any]) -> None:
        if not self.info.is_main:
            return
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, row["step"])

    def _prepare_run_dir(self) -> None:
        if not self.info.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cfg.save_yaml(self.run_dir / "config.yaml")
        for stale in (self.run_dir / "checkpoints").glob(".step_*"):  # temp dirs of a killed save
            shutil.rmtree(stale, ignore_errors=True)
        if self.metrics_path.exists():  # drop rows a killed run wrote after its last checkpoint
            rows = [r for r in self.metrics_path.read_text().splitlines() if r.strip()]
            kept = [r for r in rows if json.loads(r)["step"] <= self.step]
            self.metrics_path.write_text("".join(r + "\n" for r in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        except ImportError:
            self._tb = None

    def _plain_model(self) -> T5Model | None:
        """The model with its full weights, for saving and probing: itself, or under FSDP a copy gathered
        on rank 0 (None on the other ranks; every rank must call it)."""
        if not self.fsdp:
            return self.model
        return gather_model(self.model, self.info)

    def _save(self) -> None:
        model = self._plain_model()
        rank_rng = None
        if self.info.enabled:  # every rank's dropout stream, so that each continues its own on resume
            rank_rng = [torch.empty(0)] * self.info.world_size
            torch.distributed.all_gather_object(rank_rng, torch.get_rng_state())
        if self.fsdp:
            optimizer_state = gather_optimizer_state(self.model, self.optimizer, self.info)
        else:
            optimizer_state = self.optimizer.state_dict()
        if self.info.is_main:
            assert model is not None
            state = {"consumed_samples": self.consumed, "tokens": self.tokens, "config": self.cfg.to_dict(),
                     "global_batch_size": self.global_batch_size, "world_size": self.info.world_size,
                     "fsdp": self.fsdp}  # fmt: skip
            save_checkpoint(self.run_dir, self.step, model, self.tokenizer, optimizer_state, self.scaler, state,
                            self.cfg.keep_last, rank_rng)  # fmt: skip
        if self.info.enabled:
            torch.distributed.barrier()

    def _run_probe(self) -> None:
        """Log the downstream probe's metrics (rank 0; under FSDP every rank helps gather the weights)."""
        if not self.cfg.probe_task:
            return
        model = self._plain_model()
        if self.probe is not None and model is not None:
            self._log({"step": self.step, **self.probe(model, self.tokenizer)})

    def _out_of_time(self, start: float) -> bool:
        """Whether this invocation has trained for `max_minutes` (on any rank: all ranks stop together)."""
        if self.cfg.max_minutes is None:
            return False
        late = torch.tensor([float(time.perf_counter() - start > 60 * self.cfg.max_minutes)], dtype=torch.float64)
        return bool(all_reduce_sum(late, self.info).item() > 0)

    # ---------------------------------------------------------------------------------------- run
    def train(self, on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainSummary:
        cfg = self.cfg
        self._prepare_run_dir()
        net = self.ddp or self.model
        batches = self._loader()
        start = time.perf_counter()
        start_tokens = self.tokens
        loss = float("nan")
        val: dict[str, float] | None = None
        last_log = (time.perf_counter(), self.tokens)
        flops = 0.0  # model FLOPs since the last metrics row (6 x weights x tokens per stack)
        enc_weights, dec_weights = _matmul_weights(self.model)
        if self.step == 0:  # the untrained network: the curve's first point
            self._run_probe()
        try:
            while self.step < cfg.max_steps:
                set_lr(self.optimizer, inverse_sqrt_lr(self.step, cfg.lr, cfg.warmup, cfg.max_steps, cfg.min_lr))
                micro = [next(batches) for _ in range(self.accumulate)]
                counts = torch.tensor(
                    [sum(int(b["loss_mask"].sum()) for b in micro),
                     sum(int(b["enc_mask"].sum()) + int(b["loss_mask"].sum()) for b in micro),
                     sum(int((b["encoder_labels"] >= 0).sum()) for b in micro)],
                    dtype=torch.float64,
                )  # fmt: skip
                counts = all_reduce_sum(counts, self.info)
                n_targets, n_enc = float(counts[0]), float(counts[2])
                use_enc = cfg.encoder_loss_weight > 0 and n_enc > 0
                ce_total = torch.zeros(2, dtype=torch.float64)
                for i, batch in enumerate(micro):
                    sync = self.ddp is None or i == len(micro) - 1
                    if self.fsdp:
                        set_gradient_sync(self.model, i == len(micro) - 1)
                    with contextlib.nullcontext() if sync else self.ddp.no_sync(), self._autocast():
                        ce_sum, enc_sum = _batch_loss(net, batch, self.device, use_enc)
                    scaled = ce_sum * (self.info.world_size / n_targets)
                    if use_enc:
                        scaled = scaled + enc_sum * (cfg.encoder_loss_weight * self.info.world_size / n_enc)
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                    ce_total += torch.stack([ce_sum.detach(), enc_sum.detach()]).double().cpu()
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad))
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                lr = self.optimizer.param_groups[0]["lr"]
                self.step += 1
                self.consumed += self.global_batch_size
                self.tokens += int(counts[1])
                step_flops = 6.0 * float(enc_weights * (counts[1] - counts[0]) + dec_weights * counts[0])
                flops += step_flops / self.info.world_size
                ce_total = all_reduce_sum(ce_total, self.info)
                loss = float(ce_total[0] / n_targets)
                enc_loss = float(ce_total[1] / n_enc) if use_enc else None
                if not math.isfinite(loss) and self.scaler is None:
                    raise FloatingPointError(f"loss is {loss} at step {self.step}")
                row: dict[str, Any] | None = None
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    now = time.perf_counter()
                    tps = (self.tokens - last_log[1]) / max(now - last_log[0], 1e-9)
                    tflops = flops / max(now - last_log[0], 1e-9) / 1e12
                    last_log, flops = (now, self.tokens), 0.0
                    row = {"step": self.step, "loss": loss, "lr": lr, "tokens_per_s": tps, "grad_norm": grad_norm,
                           "model_tflops_per_s": tflops,
                           "consumed_samples": self.consumed, "tokens": self.tokens}  # fmt: skip
                    if enc_loss is not None:
                        row["encoder_loss"] = enc_loss
                    self._log(row)
                if self.step % cfg.val_every == 0 or self.step == cfg.max_steps:
                    val = self.validate()
                    if val is not None:
                        self._log({"step": self.step, **val})
                if self.step % cfg.probe_every == 0:
                    self._run_probe()
                if self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                    self._save()
                if on_step is not None:
                    on_step({"step": self.step, "loss": loss, "lr": lr, **(row or {}), **(val or {})})
                if self._out_of_time(start) and self.step < cfg.max_steps:
                    log.info("stopping at step %d: --max-minutes %s reached", self.step, cfg.max_minutes)
                    if self.step % cfg.save_every:
                        self._save()
                    break
            model_dir = self.run_dir / "model"
            final = self._plain_model()
            if self.info.is_main:
                assert final is not None
                extra = {"trained_steps": self.step, "tokens": self.tokens, "data": cfg.data,
                         "objective": cfg.objective}
                save_pretrained(final, self.tokenizer, model_dir, extra=extra)
        finally:
            if self._tb is not None:
                self._tb.close()
        seconds = time.perf_counter() - start
        val = val or {}
        return TrainSummary(
            steps=self.step, tokens=self.tokens - start_tokens, seconds=seconds, final_loss=loss,
            val_loss=val.get("val_loss"), val_ppl=val.get("val_ppl"), val_residue_ppl=val.get("val_residue_ppl"),
            model_dir=str(model_dir),
        )  # fmt: skip

    def close(self, clean: bool = True) -> None:
        """Leave the process group (see `shutdown_distributed`; `clean=False` after a failure)."""
        shutdown_distributed(clean)
        self.ddp = None  # the reducer's reference to the (now destroyed) group goes here, not at exit
