"""Downstream predictors on ProtT5nv features: task files, heads, frozen-feature training, fine-tuning
and LoRA (`lora.py`, peft), metrics, plots, saved predictors (`load_predictor(RUN_DIR).predict(seqs)`).

Imports are lazy so that ``import prott5nv.downstream`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Task": "tasks", "TaskData": "tasks", "load_task": "tasks", "KINDS": "tasks",
    "FitOptions": "options", "FitResult": "training", "fit_frozen": "training", "fit_finetune": "training",
    "Head": "heads",
    "EmbeddingFeaturizer": "features", "OneHotFeaturizer": "features", "make_featurizer": "features",
    "OneHotWindowFeaturizer": "features", "DipeptideFeaturizer": "features", "save_untrained": "features",
    "Predictor": "predictor", "load_predictor": "predictor", "merge_lora": "predictor",
    "finetune_task": "run", "predict_file": "run",
    "classification_metrics": "metrics", "regression_metrics": "metrics",
    "PretrainProbe": "probe",
}  # fmt: skip

#: Head kinds (defined here, torch-free, so the CLI can list them without importing torch).
HEADS = ("linear", "mlp", "cnn")

__all__ = sorted([*_EXPORTS, "HEADS"])


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'prott5nv.downstream' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
