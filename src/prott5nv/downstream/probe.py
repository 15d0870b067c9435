"""A downstream probe for pretraining (BioNeMo's ``dwnstr_task_validation``): every N steps, embed a small
labelled task with the current encoder, train a quick linear head on the frozen embeddings and report
its accuracy and macro-F1 on the test split (val when there is none)."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from ..data.batching import DEFAULT_BATCH_TOKENS
from ..errors import ConfigError
from .features import EmbeddingFeaturizer
from .tasks import load_task
from .training import FitOptions, fit_frozen

log = logging.getLogger(__name__)


class PretrainProbe:
    """``probe(model, tokenizer) -> {"probe_accuracy", "probe_macro_f1"}`` for a per-protein or
    per-residue classification task file (read once, at construction)."""

    def __init__(self, task_file: str | os.PathLike, *, seed: int = 0, max_epochs: int = 30,
                 batch_tokens: int = DEFAULT_BATCH_TOKENS) -> None:  # fmt: skip
        self.data = load_task(task_file, seed=seed)
        if not self.data.task.classification:
            raise ConfigError(f"--probe-task {task_file}: the probe needs a classification task, "
                              f"got {self.data.task.kind}")  # fmt: skip
        self.options = FitOptions(head="linear", max_epochs=max_epochs, patience=5, seed=seed)
        self.batch_tokens = batch_tokens
        self.split = "test" if "test" in self.data.splits else "val"

    def __call__(self, model: Any, tokenizer: Any) -> dict[str, float]:
        """Probe a T5Model in training. Its train/eval mode and the torch RNG state are restored afterwards,
        so probing does not change the training run (dropout, exact resume)."""
        from ..api import ProtT5nv

        was_training = model.training
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            try:
                wrapped = ProtT5nv(model, tokenizer, device=device)
                featurizer = EmbeddingFeaturizer(wrapped, batch_tokens=self.batch_tokens)
                metrics = fit_frozen(self.data, featurizer, self.options).metrics[self.split]
            finally:
                model.train(was_training)
        return {"probe_accuracy": metrics["accuracy"], "probe_macro_f1": metrics["macro_f1"]}
