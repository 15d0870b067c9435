"""End-to-end downstream runs (what `prott5nv finetune` / `prott5nv predict` call): read the task, train
on frozen features or fine-tune, evaluate every split, write the run directory atomically
(predictor + ``metrics.json`` + plots); predict a file with a saved run."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.batching import DEFAULT_BATCH_TOKENS
from ..errors import ConfigError
from ..fsutil import atomic_directory, atomic_text_file
from ..inference.length import DEFAULT_CHUNK_OVERLAP
from ..sequence import DEFAULT_POLICY, SequencePolicy, clean_sequence
from .features import PER_PROTEIN_ONLY, PER_RESIDUE_ONLY, make_featurizer, resolve_layer
from .metrics import summary_line, task_metrics
from .options import FitOptions
from .plots import write_plots
from .predictor import Predictor, load_predictor
from .tasks import TaskData, label_text, load_task, read_rows, resolve_columns
from .training import fit_finetune, fit_frozen

#: The entries of a run directory (what `finetune --overwrite` replaces; anything else there is kept).
RUN_FILES = ("predictor.json", "head.safetensors", "model", "metrics.json", "*.png")

log = logging.getLogger(__name__)

ProgressFactory = Callable[[str, int], Callable[[int], None]]  # (description, total residues) -> update


@dataclass
class RunSummary:
    run_dir: str
    metrics: dict[str, dict[str, Any]]
    counts: dict[str, int]
    best_epoch: int
    task: Any
    mode: str
    plots: list[str]
    trainable: int = 0  # parameters trained


    def lines(self) -> list[str]:
        out = [summary_line(self.task, m, split) for split, m in self.metrics.items() if split != "train"]
        counts = ", ".join(f"{n} {s}" for s, n in self.counts.items() if n)
        plots = ", ".join(self.plots) if self.plots else "plots skipped (matplotlib not installed)"
        out.append(f"{self.task.kind} ({self.mode}, {self.trainable:,} trained parameters; {counts}), best epoch "
                   f"{self.best_epoch}; {plots} -> {self.run_dir}")  # fmt: skip
        return out


def finetune_task(
    task_file: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: Any = "prott5nv-demo",
    features: str = "embeddings",
    window: int = 7,
    options: FitOptions | None = None,
    target: Sequence[str] | str | None = None,
    kind: str = "auto",
    labels: str | os.PathLike | None = None,
    sequence_column: str | None = None,
    mask_column: str | None = None,
    split_column: str | None = None,
    classes: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    max_train: int | None = None,
    max_eval: int | None = None,
    max_length: int | None = None,
    long_policy: str = "refuse",
    chunk_size: int | None = None,
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP,
    cache_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    batch_tokens: int | None = None,
    policy: SequencePolicy = DEFAULT_POLICY,
    progress: ProgressFactory | None = None,
    layer: int | None = None,
) -> RunSummary:
    """Train a predictor for `task_file` and save it in `out`. `model`: a name/path or a loaded
    :class:`~prott5nv.api.ProtT5nv` (ignored with the features without a model: composition, dipeptide,
    onehot, onehot-window, whose half-width is `window`). `max_train` / `max_eval` keep seeded random
    subsets of the training / of the val and test rows. Proteins longer than the limit (`max_length`,
    default the model's) follow `long_policy` (refuse, truncate or chunk: :mod:`prott5nv.inference.length`).
    `batch_tokens` defaults to the options'. `layer`: the encoder layer the head reads (fair-esm's
    numbering: 0 = the embedding output, k = block k, -1 = the output after the final norm, the default)."""
    from ..api import ProtT5nv, load
    from ..inference.length import resolve

    opts = options or FitOptions()
    batch_tokens = batch_tokens or opts.batch_tokens
    data = load_task(task_file, target=target, kind=kind, labels=labels, sequence_column=sequence_column,
                     mask_column=mask_column, split_column=split_column, classes=classes,
                     val_fraction=val_fraction, seed=opts.seed, policy=policy)  # fmt: skip
    if features in PER_PROTEIN_ONLY and data.task.per_residue:
        raise ConfigError(f"{features} features are per protein; use --features onehot or onehot-window for "
                          "per-residue tasks")  # fmt: skip
    if features in PER_RESIDUE_ONLY and not data.task.per_residue:
        raise ConfigError(f"{features} features are per residue; use --features composition or dipeptide for "
                          "per-protein tasks")  # fmt: skip
    if max_train is not None or max_eval is not None:
        data = subsample(data, opts.seed, train=max_train, val=max_eval, test=max_eval)
    counts = data.counts()
    log.info("%s: %s task, target %s, %s", task_file, data.task.kind, data.task.target, counts)
    if opts.trains_encoder and features != "embeddings":
        raise ConfigError(f"{'LoRA' if opts.lora else 'fine-tuning'} trains through the encoder: use --features "
                          "embeddings")  # fmt: skip
    if layer is not None and features != "embeddings":
        raise ConfigError(f"--layer picks an encoder layer; {features} features use no encoder")
    if opts.trains_encoder and dtype not in (None, "float32"):
        raise ConfigError(f"{'LoRA' if opts.lora else 'fine-tuning'} trains float32 weights: use --dtype float32")
    loaded = None
    if features == "embeddings" or opts.trains_encoder:
        loaded = model if isinstance(model, ProtT5nv) else load(model, device=device, dtype=dtype)
    length = None
    if loaded is not None:
        length = resolve(loaded, max_length, long_policy, chunk_size, chunk_overlap)
        if opts.trains_encoder and length.window is not None:
            raise ConfigError("fine-tuning trains the encoder on whole proteins: use --truncate, not --chunk")
        length.check(data.ids, [len(s) for s in data.sequences], source=str(task_file))
    model_name = getattr(loaded, "name", "") if isinstance(model, ProtT5nv) else str(model)
    if model_name and Path(model_name).exists():
        model_name = str(Path(model_name).resolve())
    total = sum(map(len, data.sequences))
    if opts.trains_encoder:
        lora = None
        if opts.lora:
            from .features import model_fingerprint

            lora = {"model": model_name, "fingerprint": model_fingerprint(loaded), **opts.lora_spec()}
        index = resolve_layer(loaded, layer)
        result = fit_finetune(data, loaded, opts, length=length, layer=index)
        tuned = ProtT5nv(result.encoder, loaded.tokenizer, device=loaded.device, dtype=loaded.dtype, name="model")
        predictor = Predictor(data.task, result.head, model=tuned, max_length=max_length, batch_tokens=batch_tokens,
                              length=length, lora=lora, layer=index)  # fmt: skip
    else:
        settings = {"batch_tokens": batch_tokens, "cache_dir": cache_dir, "model_name": model_name, "length": length,
                    "layer": layer}  # fmt: skip
        featurizer = make_featurizer(features, loaded, window=window, **(settings if loaded else {}))
        update = progress("features", total) if progress else None
        result = fit_frozen(data, featurizer, opts, progress=update)
        predictor = Predictor(data.task, result.head, featurizer=featurizer, max_length=featurizer.max_length)
    mode = "lora" if opts.lora else "finetuned" if opts.finetune else "frozen"
    extra = {"mode": mode, "base_model": model_name, "trainable_parameters": result.trainable,
             "options": opts.to_dict(), "trained_on": str(task_file)}  # fmt: skip
    report = {"task": data.task.to_dict(), "counts": counts, "best_epoch": result.best_epoch,
              "metrics": result.metrics, "history": result.history, **extra}  # fmt: skip
    shown = "test" if "test" in result.metrics else "val"
    with atomic_directory(out, owns=RUN_FILES) as tmp:
        predictor.save_into(tmp, extra)
        plots = write_plots(tmp, result.history, result.metrics[shown] if data.task.classification else None,
                            split=shown, score_name="accuracy" if data.task.classification else "Spearman")  # fmt: skip
        report["plots"] = plots or "skipped: matplotlib not installed"
        (tmp / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    return RunSummary(str(out), result.metrics, counts, result.best_epoch, data.task, mode, plots, result.trainable)


def subsample(data: TaskData, seed: int, **limits: int | None) -> TaskData:
    """Keep a seeded random subset of at most ``limits[split]`` rows of each split (None: all), in file
    order."""
    import numpy as np

    keep: list[int] = []
    for k, split in enumerate(("train", "val", "test")):
        rows = [i for i, s in enumerate(data.splits) if s == split]
        n = limits.get(split)
        rng = np.random.default_rng([seed, k])  # per split: the val/test subsets do not depend on `train`
        keep += rows if n is None or len(rows) <= n else rng.choice(rows, size=n, replace=False).tolist()
    return data.subset(sorted(keep))


@dataclass
class PredictSummary:
    output: str
    proteins: int
    metrics: dict[str, Any] | None
    task: Any

    def line(self) -> str:
        scored = f"; {summary_line(self.task, self.metrics, 'labelled input')}" if self.metrics else ""
        return f"predicted {self.proteins} proteins -> {self.output}{scored}"


def predict_file(
    run_dir: str | os.PathLike,
    input_file: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model: Any = None,
    device: str = "cpu",
    dtype: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    policy: SequencePolicy = DEFAULT_POLICY,
    progress: ProgressFactory | None = None,
    long_policy: str = "refuse",
    max_length: int | None = None,
    chunk_size: int | None = None,
    chunk_overlap: int | None = None,
) -> PredictSummary:
    """Predict every protein of a FASTA or CSV/TSV file; the output table (CSV, or TSV for .tsv) has
    ``id, sequence, <target>`` (+ ``probability`` for per-protein classes). When the input holds the
    target column, the predictions are scored too (metrics in the summary). Proteins longer than the
    predictor's limit follow `long_policy` (see :func:`load_predictor`)."""
    predictor = load_predictor(run_dir, model=model, device=device, dtype=dtype, cache_dir=cache_dir,
                               batch_tokens=batch_tokens, long_policy=long_policy, max_length=max_length,
                               chunk_size=chunk_size, chunk_overlap=chunk_overlap)  # fmt: skip
    task = predictor.task
    table = read_rows(input_file, policy=policy)
    cols = resolve_columns(table.columns, str(input_file), require_target=False)
    labelled = all(t in table.columns for t in task.targets)
    if labelled:
        data = load_task(input_file, target=task.targets, kind=task.kind, classes=task.classes, policy=policy,
                         assign=False)  # fmt: skip
        ids, seqs = data.ids, data.sequences
    else:
        ids, seqs = [], []
        for i, (row, where) in enumerate(zip(table.rows, table.where, strict=True)):
            rid = row[cols.id] if cols.id else f"row {i + 1}"
            path, line = where.rsplit(":", 1)
            ids.append(rid)
            seqs.append(clean_sequence(row[cols.sequence], rid, policy, source=path, line=int(line)))
    if not seqs:
        raise ConfigError(f"{input_file}: no proteins")
    if predictor.length is not None:
        predictor.length.check(ids, [len(s) for s in seqs], source=str(input_file))
    update = progress("predict", sum(map(len, seqs))) if progress else None
    preds, probs = predictor.predict_encoded(seqs, update)
    metrics = None
    if labelled:
        cut = [y[: len(p)] if task.per_residue else y for y, p in zip(data.labels, preds, strict=True)]
        metrics = task_metrics(task, cut, preds)
    sep = "\t" if str(output).lower().endswith((".tsv", ".tab")) else ","
    with_prob = task.kind == "protein-classification"
    with atomic_text_file(output) as fh:
        import csv

        writer = csv.writer(fh, delimiter=sep, lineterminator="\n")
        writer.writerow(["id", "sequence", task.target] + (["probability"] if with_prob else []))
        for rid, seq, p, q in zip(ids, seqs, preds, probs, strict=True):
            row = [rid, seq, label_text(task, p)]
            writer.writerow(row + ([f"{float(q.max()):.4f}"] if with_prob else []))
    return PredictSummary(str(output), len(seqs), metrics, task)
