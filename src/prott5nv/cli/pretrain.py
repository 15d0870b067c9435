"""`prott5nv pretrain --data DATA_DIR --out RUN_DIR ...`: the ProtT5nv pretraining recipe.

Flags map 1:1 onto :class:`~prott5nv.train.config.TrainConfig` fields (`--max-steps` -> `max_steps`);
`--config FILE` reads the same keys from YAML, flags override it, and the run directory records the
result in `config.yaml`. Launch with `torchrun --nproc-per-node N -m prott5nv pretrain ...` for data
parallelism (DDP; with --fsdp the model is sharded over the ranks).
"""

from __future__ import annotations

import argparse

import yaml
from tqdm import tqdm

from ..errors import ConfigError
from ..fsutil import check_output
from ..precision import ALIASES, PRECISIONS
from ..train.config import TrainConfig
from .common import description, existing, with_default

# (field, type, help) -- every TrainConfig field settable from the command line; "(default: X)" is added
# from TrainConfig (helps that say "default" themselves describe a default computed from other settings)
FLAGS: list[tuple[str, type, str]] = [
    ("data", str, "data directory written by `prott5nv preprocess`"),
    ("out", str, "run directory (checkpoints, metrics.jsonl, config.yaml, final model/)"),
    ("preset", str, "model shape: tiny, small, prott5nv-base"),
    ("init_from", str, "start from these weights (native, .nemo or HF) with a fresh optimizer"),
    ("position_init", str, "positions of a fresh model: normal (NeMo's), sinusoidal (megatron family: "
     "sin/cos start of the table) or local (t5 family: relative bias starts with ALiBi's locality "
     "prior); both still trained, attention finds neighbours sooner"),
    ("max_steps", int, "optimizer steps"),
    ("max_minutes", float, "also stop after this many minutes of training (checkpoint and model saved; "
     "rerunning resumes)"),
    ("micro_batch_size", int, "sequences per rank per forward pass"),
    ("accumulate", int, "micro-batches per optimizer step"),
    ("global_batch_size", int, "sequences per step over all ranks; sets --accumulate"),
    ("lr", float, "peak learning rate"),
    ("warmup_steps", int, "linear warmup steps (default: 1%% of --max-steps)"),
    ("min_lr", float, "learning rate after --max-steps"),
    ("weight_decay", float, "decoupled weight decay on weights and embeddings"),
    ("clip_grad", float, "gradient-norm clipping"),
    ("precision", str, f"one of {', '.join(PRECISIONS)} ({', '.join(ALIASES)} accepted)"),
    ("dropout", float, "dropout everywhere (default: the model's, 0.1)"),
    ("seq_length", int, "encoder length"),
    ("seq_length_dec", int, "decoder length (default: 256 for span, --seq-length for denoise/mixed)"),
    ("masked_lm_prob", float, "fraction of tokens masked"),
    ("mean_span_length", float, "mean masked span length (1 = single tokens, as ProtT5nv)"),
    ("objective", str, "span (T5 span corruption, ProtT5nv's), denoise (Rostlab ProtT5's: 15%% of "
     "residues masked in place, the decoder rebuilds the whole sequence) or mixed (each sample one or the other)"),
    ("denoise_fraction", float, "mixed: share of samples denoised"),
    ("encoder_loss_weight", float, "denoise/mixed: add this weight x the cross-entropy of every residue predicted "
     "from the encoder's state at its position by the (tied) LM head: the features must keep each residue and "
     "infer the corrupted ones from context"),
    ("seed", int, "seed for initialisation, shuffling and masking"),
    ("val_every", int, "validate every N steps"),
    ("val_samples", int, "validation sequences used"),
    ("save_every", int, "checkpoint every N steps"),
    ("keep_last", int, "checkpoints kept"),
    ("log_every", int, "metrics row every N steps"),
    ("num_workers", int, "DataLoader worker processes"),
    ("device", str, "cpu, cuda or auto"),
    ("threads", int, "torch threads per process (default: PyTorch's)"),
    ("probe_task", str, "downstream classification task file (CSV, see `finetune`): a linear probe on frozen "
     "embeddings is trained and scored at step 0 and every --probe-every steps (rank 0; metrics.jsonl probe_accuracy)"),
    ("probe_every", int, "steps between downstream probes"),
]
DEFAULTS = TrainConfig()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain a model with T5 span corruption (the ProtT5nv recipe)",
        description=description(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML file of settings (keys as the flags, with underscores)")
    for name, typ, help_ in FLAGS:
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                       help=with_default(help_, getattr(DEFAULTS, name)))  # fmt: skip
    p.add_argument(
        "--model-override", action="append", default=[], metavar="KEY=VALUE",
        help="override a model config field, e.g. num_layers=4 (repeatable)",
    )  # fmt: skip
    p.add_argument("--fsdp", action="store_true", default=None,
                   help="shard parameters, gradients and optimizer state over the torchrun ranks (PyTorch FSDP2 "
                   "fully_shard) instead of replicating them (DDP): for models too large for one device")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="require a checkpoint to resume from (default: auto)")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> TrainConfig:
    settings = TrainConfig.from_yaml(args.config) if args.config else {}
    for name, _, _ in FLAGS:
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
    if args.fsdp:
        settings["fsdp"] = True
    if args.model_override:
        model = dict(settings.get("model") or {})
        for item in args.model_override:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--model-override {item!r}: expected KEY=VALUE")
            model[key] = yaml.safe_load(value)
        settings["model"] = model
    return TrainConfig.from_dict(settings)


def run(args: argparse.Namespace) -> int:
    from ..train.trainer import Pretrainer

    cfg = build_config(args)
    if cfg.out:  # a run directory: new, empty, or an earlier run's (resumed); never an input, '.', unwritable
        inputs = existing(cfg.data, cfg.init_from, args.config, cfg.probe_task)
        check_output(cfg.out, inputs=inputs, overwrite=True, kind="dir", marker="config.yaml")
    probe = None
    if cfg.probe_task:
        from ..downstream.probe import PretrainProbe

        probe = PretrainProbe(cfg.probe_task, seed=cfg.seed)
    trainer = Pretrainer(cfg, resume=True if args.resume else None, probe=probe)
    clean = False
    try:
        show = trainer.info.is_main
        bar = tqdm(total=cfg.max_steps, initial=trainer.step, desc="pretrain", unit="step", disable=not show,
                   dynamic_ncols=True)  # fmt: skip

        def on_step(m: dict) -> None:
            bar.update(1)
            post = {"loss": f"{m['loss']:.3f}", "lr": f"{m['lr']:.2e}"}
            if "tokens_per_s" in m:
                post["tok/s"] = f"{m['tokens_per_s']:.0f}"
            if "val_loss" in m:
                post["val_ppl"] = f"{m['val_ppl']:.2f}"
            bar.set_postfix(post, refresh=False)

        summary = trainer.train(on_step)
        bar.close()
        if show:
            print(summary.line())
        clean = True
    finally:
        trainer.close(clean)
    return 0
