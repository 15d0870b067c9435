"""A saved predictor: ``RUN_DIR/predictor.json`` (task, classes, features and base model, head shape,
training options), ``RUN_DIR/head.safetensors`` (the head, its normalization included) and, after
fine-tuning, ``RUN_DIR/model/`` (the tuned encoder as a native checkpoint) or, after LoRA,
``RUN_DIR/adapters.safetensors`` (the adapters alone; the base model is loaded from its recorded
name/path and must have the recorded fingerprint). Loading executes no code.

    >>> predictor = load_predictor("runs/localization")
    >>> predictor.predict(["MKTAYIAKQR..."])  # ['Cytoplasm']
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..data.batching import DEFAULT_BATCH_TOKENS
from ..errors import CheckpointError, ConfigError
from ..inference.length import DEFAULT_CHUNK_OVERLAP, LengthPolicy, resolve
from ..sequence import DEFAULT_POLICY, SequencePolicy, clean_sequence
from .features import EmbeddingFeaturizer, make_featurizer
from .heads import Head
from .tasks import Task, label_text
from .training import FrozenRows, TokenRows, encoder_only, run_net

log = logging.getLogger(__name__)

FORMAT = "prott5nv-predictor"
FORMAT_VERSION = 1
ADAPTERS = "adapters.safetensors"


class Predictor:
    """A trained head with its features: frozen (a featurizer) or fine-tuned (its own encoder, or the base
    encoder with LoRA adapters)."""

    def __init__(self, task: Task, head: Head, *, featurizer: Any = None, model: Any = None,
                 max_length: int | None = None, batch_size: int = 64, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                 length: LengthPolicy | None = None, lora: dict[str, Any] | None = None,
                 layer: int | None = None) -> None:  # fmt: skip
        """`length`: the fine-tuned model's length policy (default: cut to `max_length`, else its limit).
        `lora`: `model` is a base model with LoRA adapters; ``{"model": base name/path, "fingerprint": of
        the base, "rank", "alpha", "modules"}`` (then only the adapters are saved). `layer`: the fine-tuned
        encoder's layer the head reads (an index; None: its output)."""
        if (featurizer is None) == (model is None):
            raise ConfigError("a predictor needs either a featurizer (frozen) or a model (fine-tuned)")
        self.task, self.head = task, head.eval()
        self.featurizer, self.model, self.lora, self.layer = featurizer, model, lora, layer
        self.max_length, self.batch_size, self.batch_tokens = max_length, batch_size, batch_tokens
        self.length = length if featurizer is None else getattr(featurizer, "length", None)
        if model is not None and length is None:
            self.length = resolve(model, max_length, "truncate")

    @property
    def finetuned(self) -> bool:
        return self.model is not None

    def predict_encoded(
        self, seqs: Sequence[str], progress: Callable[[int], None] | None = None
    ) -> tuple[list[Any], list[Any]]:
        """Encoded predictions (class indices / float arrays, per protein or per residue) and class
        probabilities, for already-cleaned sequences."""
        if not seqs:
            return [], []
        if self.model is not None:
            from .training import EncoderHead

            rows: Any = TokenRows(self.task, self.model, seqs, None, self.length, self.batch_tokens)
            net: Any = EncoderHead(self.model.model, self.head, self.model.tokenizer.num_special_suffix, self.layer)
            preds, probs, _ = run_net(net, self.head, self.task, rows, self.batch_size)
            if progress:
                progress(sum(map(len, seqs)))
            return preds, probs
        per = self.featurizer.per_residue if self.task.per_residue else self.featurizer.per_protein
        rows = FrozenRows(self.task, per(seqs, progress), None)
        preds, probs, _ = run_net(self.head, self.head, self.task, rows, self.batch_size)
        return preds, probs

    def predict(
        self, seqs: Sequence[str] | str, ids: Sequence[str] | None = None, policy: SequencePolicy = DEFAULT_POLICY
    ) -> list[Any]:
        """Predictions in the task's terms: a class name, a per-residue label string, a number (a list
        for several targets) or a per-residue float array. Proteins longer than the limit follow the
        length policy given to :func:`load_predictor` (refused by default; truncated ones get per-residue
        predictions for their first residues only)."""
        seqs = [seqs] if isinstance(seqs, str) else list(seqs)
        names = list(ids) if ids is not None else [f"sequence {i + 1}" for i in range(len(seqs))]
        clean = [clean_sequence(s, n, policy) for s, n in zip(seqs, names, strict=True)]
        preds, _ = self.predict_encoded(clean)
        return [self.decode(p) for p in preds]

    def decode(self, pred: Any) -> Any:
        if self.task.kind == "protein-classification":
            return self.task.classes[int(pred)]  # type: ignore[index]
        if self.task.kind == "residue-classification":
            return label_text(self.task, pred)
        if self.task.kind == "protein-regression":
            values = [float(v) for v in np.atleast_1d(pred)]
            return values[0] if len(values) == 1 else values
        return np.asarray(pred, dtype=np.float32)

    # ---------------------------------------------------------------------------------- saving
    def describe(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        layer = {} if self.layer is None else {"layer": self.layer}
        if self.lora is not None:
            features = {"type": "lora", "adapters": ADAPTERS, **self.lora, **layer}
        elif self.finetuned:
            features = {"type": "finetuned", "model": "model", **layer}
        else:
            features = self.featurizer.describe()
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "task": self.task.to_dict(),
                "features": features, "head": self.head.config(), "max_length": self.max_length,
                **(extra or {})}  # fmt: skip

    def save_into(self, directory: Path, extra: dict[str, Any] | None = None) -> None:
        """Write the predictor files into an existing directory (the caller makes it atomic)."""
        from ..checkpoint import write_native

        state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, str(directory / "head.safetensors"), metadata={"format": "pt"})
        if self.lora is not None:
            from .lora import adapter_state

            save_file(adapter_state(self.model.model), str(directory / ADAPTERS), metadata={"format": "pt"})
        elif self.model is not None:
            (directory / "model").mkdir()
            write_native(encoder_only(self.model.model), self.model.tokenizer, directory / "model")
        (directory / "predictor.json").write_text(json.dumps(self.describe(extra), indent=2) + "\n")


def load_predictor(
    run_dir: str | os.PathLike,
    *,
    model: Any = None,
    device: str = "cpu",
    dtype: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    long_policy: str = "refuse",
    max_length: int | None = None,
    chunk_size: int | None = None,
    chunk_overlap: int | None = None,
) -> Predictor:
    """Load a predictor saved by ``prott5nv finetune``. A frozen-feature or LoRA predictor loads its base
    model from the recorded name/path unless `model` (a loaded :class:`~prott5nv.api.ProtT5nv`) is given;
    either way the model's fingerprint must match the one it was trained on. Proteins longer than the
    limit (the recorded one, or a smaller `max_length`) follow `long_policy` (refuse, truncate or chunk:
    :mod:`prott5nv.inference.length`); windows default to the recorded ones."""
    from ..api import load

    run = Path(run_dir)
    desc_path = run / "predictor.json"
    try:
        desc = json.loads(desc_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{desc_path}: cannot read predictor description: {exc}") from None
    if desc.get("format") != FORMAT:
        raise CheckpointError(f"{desc_path}: not a prott5nv predictor")
    if desc.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{desc_path}: predictor format {desc['format_version']} is newer than supported")
    try:
        task = Task.from_dict(desc["task"])
        head = Head.from_config(desc["head"])
        state = load_file(str(run / "head.safetensors"))
        head.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError, OSError, SafetensorError) as exc:
        raise CheckpointError(f"{run}: invalid predictor files: {exc}") from None
    features = desc["features"]
    recorded = desc.get("max_length")
    if max_length is not None and recorded is not None and max_length > recorded:
        raise ConfigError(f"--max-length {max_length} exceeds the predictor's maximum of {recorded} residues")
    max_length = max_length or recorded
    overlap = chunk_overlap if chunk_overlap is not None else features.get("chunk_overlap", DEFAULT_CHUNK_OVERLAP)
    size = chunk_size if chunk_size is not None else features.get("chunk_size")
    if features["type"] in ("finetuned", "lora"):
        lora = None
        if features["type"] == "lora":
            tuned = _with_adapters(run, features, model, device, dtype)
            lora = {k: v for k, v in features.items() if k not in ("type", "adapters", "layer")}
        else:
            tuned = load(run / features["model"], device=device, dtype=dtype)
        length = resolve(tuned, max_length, long_policy, size, overlap)
        if length.window is not None:
            raise ConfigError("a fine-tuned predictor reads whole proteins: use --truncate, not --chunk")
        return Predictor(task, head.to(tuned.device), model=tuned, max_length=max_length, batch_tokens=batch_tokens,
                         length=length, lora=lora, layer=features.get("layer"))  # fmt: skip
    if features["type"] == "embeddings":
        if model is None:
            if not features.get("model"):
                raise ConfigError(f"{desc_path}: the base model was not recorded; pass model=")
            model = load(features["model"], device=device, dtype=dtype or features.get("dtype"))
        length = resolve(model, max_length, long_policy, size, overlap)
        featurizer = EmbeddingFeaturizer(model, cache_dir=cache_dir, batch_tokens=batch_tokens, length=length,
                                         model_name=features.get("model", ""), layer=features.get("layer"))  # fmt: skip
        if featurizer.fingerprint != features.get("fingerprint"):
            raise CheckpointError(
                f"{run}: the base model {features.get('model') or getattr(model, 'name', '')!r} is not the one this "
                "predictor was trained on (its weights differ)"
            )
        return Predictor(task, head, featurizer=featurizer, max_length=max_length)
    try:
        feat = make_featurizer(features["type"], window=features.get("window", 7))
    except ConfigError as exc:
        raise CheckpointError(f"{desc_path}: {exc}") from None
    return Predictor(task, head, featurizer=feat)


def _base_model(run: Path, features: dict[str, Any], model: Any, device: str) -> Any:
    """The base model of a LoRA predictor (the given one, or loaded from its recorded name/path, float32),
    checked against the recorded fingerprint."""
    from ..api import load
    from .features import model_fingerprint

    if model is None:
        if not features.get("model"):
            raise ConfigError(f"{run / 'predictor.json'}: the base model was not recorded; pass model=")
        model = load(features["model"], device=device)
    if model_fingerprint(model) != features.get("fingerprint"):
        name = features.get("model") or getattr(model, "name", "")
        raise CheckpointError(f"{run}: the base model {name!r} is not the one these LoRA adapters were trained on "
                              "(its weights or precision differ)")  # fmt: skip
    return model


def _with_adapters(run: Path, features: dict[str, Any], model: Any, device: str, dtype: str | None) -> Any:
    """A LoRA predictor's encoder: a copy of the base encoder with the saved adapters (not merged, so it
    computes exactly what training computed)."""
    from ..api import ProtT5nv
    from .lora import add_adapters, load_adapters

    if dtype not in (None, "float32"):
        raise ConfigError("a LoRA predictor runs in float32, as trained (merge it with `prott5nv convert "
                          "--merge-lora` for a checkpoint in another precision)")  # fmt: skip
    base = _base_model(run, features, model, device)
    encoder = encoder_only(base.model)
    add_adapters(encoder, features)
    try:
        state = load_file(str(run / features["adapters"]))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{run / features['adapters']}: cannot read the adapters: {exc}") from None
    load_adapters(encoder, state, str(run / features["adapters"]))
    for p in encoder.parameters():
        p.requires_grad_(False)
    return ProtT5nv(encoder, base.tokenizer, device=base.device, name=str(run))


def merge_lora(run_dir: str | os.PathLike, *, model: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """The base model of a LoRA predictor with its adapters folded into the encoder's weights: a plain
    T5Model (decoder included, as the base has it), its tokenizer, and provenance for the checkpoint's
    ``extra``. `model`: the base as a loaded :class:`~prott5nv.api.ProtT5nv` (default: the recorded one;
    its fingerprint must match either way)."""
    from .lora import merge_adapters

    run = Path(run_dir)
    desc_path = run / "predictor.json"
    try:
        features = json.loads(desc_path.read_text())["features"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{desc_path}: cannot read predictor description: {exc}") from None
    if features.get("type") != "lora":
        raise ConfigError(f"{run}: not a LoRA predictor (features {features.get('type')!r}); --merge-lora needs a "
                          "run of `prott5nv finetune --lora`")  # fmt: skip
    base = _base_model(run, features, model, "cpu")
    try:
        state = load_file(str(run / features["adapters"]))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{run / features['adapters']}: cannot read the adapters: {exc}") from None
    merged = merge_adapters(copy.deepcopy(base.model), features, state, str(run / features["adapters"]))
    extra = {"merged_lora": str(run.resolve()), "base_model": features.get("model", ""),
             "lora": {k: features[k] for k in ("rank", "alpha", "modules")}}  # fmt: skip
    return merged.eval(), base.tokenizer, extra
