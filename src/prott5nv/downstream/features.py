"""Features for downstream heads: frozen encoder embeddings (cached on disk) or the baselines without a
model: residue one-hot / amino-acid composition, one-hot windows (per residue), composition + dipeptide
frequencies (per protein); and the untrained copy of a model (:func:`save_untrained`), its step-0 baseline.

Embeddings come from the public API (:meth:`ProtT5nv.tokens_to_hiddens`, per-protein = mean over
residues) in token-budget batches (:func:`prott5nv.data.batching.token_budget_batches`). The cache is
keyed by a fingerprint of the model (weights, tokenizer, compute precision) and the MD5 of each (possibly
truncated) sequence, as bio_embeddings keys proteins: a second run with the same model reuses every
embedding it has. Each run adds one shard file (written to a temporary name, then renamed), so
concurrent runs and interrupted runs never leave a broken cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.batching import DEFAULT_BATCH_TOKENS
from ..errors import ConfigError
from ..inference.length import DEFAULT_CHUNK_OVERLAP, LengthPolicy, resolve
from ..sequence import RESIDUES, STANDARD_RESIDUES

log = logging.getLogger(__name__)

FEATURES = ("embeddings", "composition", "dipeptide", "onehot", "onehot-window")
PER_PROTEIN_ONLY = ("composition", "dipeptide")
PER_RESIDUE_ONLY = ("onehot-window",)
Progress = Callable[[int], None]  # called with the number of residues just featurized


def default_cache_dir() -> Path:
    """``$PROTT5NV_CACHE/embeddings``, else ``~/.cache/prott5nv/embeddings``."""
    root = os.environ.get("PROTT5NV_CACHE") or Path.home() / ".cache" / "prott5nv"
    return Path(root) / "embeddings"


def sequence_key(seq: str) -> str:
    return hashlib.md5(seq.encode()).hexdigest()


class OneHotFeaturizer:
    """Residue identity over the 25-letter alphabet: ``(L, 25)`` per residue; its mean over residues is
    the amino-acid composition (per protein)."""

    dim = len(RESIDUES)
    max_length: int | None = None

    def __init__(self, name: str = "onehot") -> None:
        self.name = name  # "composition" or "onehot": the same features, named as the user chose
        self._lut = np.full(256, -1, dtype=np.int64)
        for i, c in enumerate(RESIDUES):
            self._lut[ord(c)] = i

    def describe(self) -> dict[str, Any]:
        return {"type": self.name}

    def per_residue(self, seqs: Sequence[str], progress: Progress | None = None) -> list[np.ndarray]:
        eye = np.eye(self.dim, dtype=np.float32)
        out = [eye[self._lut[np.frombuffer(s.encode(), dtype=np.uint8)]] for s in seqs]
        if progress:
            progress(sum(map(len, seqs)))
        return out

    def per_protein(self, seqs: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        """Amino-acid composition: the mean of the one-hot rows, computed by counting."""
        out = np.zeros((len(seqs), self.dim), dtype=np.float32)
        for i, s in enumerate(seqs):
            out[i] = np.bincount(self._lut[np.frombuffer(s.encode(), dtype=np.uint8)], minlength=self.dim) / len(s)
        if progress:
            progress(sum(map(len, seqs)))
        return out


def _lookup(alphabet: str) -> np.ndarray:
    """A byte -> index table (-1 for letters outside `alphabet`)."""
    lut = np.full(256, -1, dtype=np.int64)
    for i, c in enumerate(alphabet):
        lut[ord(c)] = i
    return lut


_RESIDUE_LUT = _lookup(RESIDUES)
_STANDARD_LUT = _lookup(STANDARD_RESIDUES)


class OneHotWindowFeaturizer:
    """Per residue: the one-hot rows (25 letters, as `onehot`) of residues ``i-W .. i+W`` in that order,
    flattened to ``(L, (2W+1) * 25)``; positions past either end are zero rows. uint8 (0/1): a tenth of
    the memory of float32 features."""

    name = "onehot-window"
    max_length: int | None = None

    def __init__(self, window: int = 7) -> None:
        if window < 0:
            raise ConfigError(f"the one-hot window half-width must be >= 0, got {window}")
        self.window = window
        self.dim = (2 * window + 1) * len(RESIDUES)

    def describe(self) -> dict[str, Any]:
        return {"type": self.name, "window": self.window}

    def per_residue(self, seqs: Sequence[str], progress: Progress | None = None) -> list[np.ndarray]:
        w, out = self.window, []
        for s in seqs:
            idx = np.concatenate([np.full(w, -1), _RESIDUE_LUT[np.frombuffer(s.encode(), dtype=np.uint8)],
                                  np.full(w, -1)])  # fmt: skip
            win = np.lib.stride_tricks.sliding_window_view(idx, 2 * w + 1)  # [L, 2W+1]: residue i+k-W
            x = np.zeros((len(s), 2 * w + 1, len(RESIDUES)), dtype=np.uint8)
            i, k = np.nonzero(win >= 0)
            x[i, k, win[i, k]] = 1
            out.append(x.reshape(len(s), self.dim))
        if progress:
            progress(sum(map(len, seqs)))
        return out

    def per_protein(self, seqs: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        raise ConfigError("onehot-window features are per residue; use composition or dipeptide per protein")


class DipeptideFeaturizer:
    """Per protein: 20 amino-acid frequencies (count / length) and 400 dipeptide frequencies (count of the
    ordered pair ``ab`` of neighbours / (length - 1)), ``[N, 420]``; columns ``a`` then ``a * 20 + b`` over
    ``ACDEFGHIKLMNPQRSTVWY``. Other letters (X, B, Z, U, O) count in the length but in no column, and
    pairs containing them in no pair column."""

    name = "dipeptide"
    dim = 20 + 20 * 20
    max_length: int | None = None

    def describe(self) -> dict[str, Any]:
        return {"type": self.name}

    def per_residue(self, seqs: Sequence[str], progress: Progress | None = None) -> list[np.ndarray]:
        raise ConfigError("dipeptide features are per protein; use onehot or onehot-window per residue")

    def per_protein(self, seqs: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        out = np.zeros((len(seqs), self.dim), dtype=np.float32)
        for i, s in enumerate(seqs):
            idx = _STANDARD_LUT[np.frombuffer(s.encode(), dtype=np.uint8)]
            out[i, :20] = np.bincount(idx[idx >= 0], minlength=20) / len(s)
            a, b = idx[:-1], idx[1:]
            pair = (a >= 0) & (b >= 0)
            if len(s) > 1:
                out[i, 20:] = np.bincount(a[pair] * 20 + b[pair], minlength=400) / (len(s) - 1)
        if progress:
            progress(sum(map(len, seqs)))
        return out


def model_fingerprint(model: Any) -> str:
    """A hash of everything that determines a model's embeddings: weights, tokenizer, compute dtype,
    quantization."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(model.tokenizer.to_dict(), sort_keys=True).encode())
    h.update(str(model.dtype).encode())
    quantize = getattr(model, "quantize", None)
    if quantize is not None:
        h.update(f"quantize:{quantize}".encode())
    for name, t in sorted(model.model.state_dict().items()):
        if name.startswith("decoder.") or name == "lm_head_bias":
            continue  # embeddings use the encoder only
        if type(t) is not torch.Tensor and hasattr(t, "dequantize"):  # a quantized weight (torchao)
            t = t.dequantize()
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update((t.float() if t.is_floating_point() else t).numpy().tobytes())
    return h.hexdigest()


class EmbeddingCache:
    """Shard files ``<dir>/<fingerprint>/<kind>-<uuid>.npz`` holding ``keys`` (MD5s) and, per protein,
    ``emb [N, D]`` float32, or per residue ``emb [sum L, D]`` float16 with ``offsets [N + 1]``."""

    def __init__(self, root: str | Path, fingerprint: str) -> None:
        self.dir = Path(root) / fingerprint

    def load(self, kind: str, wanted: set[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        if not self.dir.is_dir():
            return found
        for shard in sorted(self.dir.glob(f"{kind}-*.npz")):
            try:
                with np.load(shard, allow_pickle=False) as z:
                    keys = z["keys"].astype(str).tolist()
                    hits = [i for i, k in enumerate(keys) if k in wanted and k not in found]
                    if not hits:
                        continue
                    emb = z["emb"]
                    if kind == "residue":
                        off = z["offsets"]
                        found.update({keys[i]: emb[off[i] : off[i + 1]] for i in hits})
                    else:
                        found.update({keys[i]: emb[i] for i in hits})
            except (OSError, ValueError, KeyError) as exc:  # a damaged shard is ignored, not fatal
                log.warning("ignoring unreadable embedding cache shard %s: %s", shard, exc)
        return found

    def save(self, kind: str, items: dict[str, np.ndarray]) -> None:
        if not items:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        keys = np.array(list(items), dtype="S32")
        if kind == "residue":
            arrays = list(items.values())
            offsets = np.cumsum([0] + [len(a) for a in arrays]).astype(np.int64)
            payload = {"emb": np.concatenate(arrays).astype(np.float16), "offsets": offsets}
        else:
            payload = {"emb": np.stack(list(items.values())).astype(np.float32)}
        name = f"{kind}-{uuid.uuid4().hex}.npz"
        tmp = self.dir / f".{name}.partial"
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, keys=keys, **payload)
            os.replace(tmp, self.dir / name)
        finally:
            tmp.unlink(missing_ok=True)


class EmbeddingFeaturizer:
    """Frozen-encoder features of a loaded :class:`~prott5nv.api.ProtT5nv`. Proteins longer than the
    limit follow the `length` policy (:mod:`prott5nv.inference.length`): refused, truncated (counted in
    :attr:`truncated`) or embedded as overlapping windows stitched back together as ``embed --chunk``
    does (counted in :attr:`chunked`; per protein: the mean over the stitched residues). Without
    `length`, the limit is the model's (or a smaller `max_length`) and long proteins are truncated, or
    chunked in windows of the limit when `chunk_overlap` is given."""

    name = "embeddings"

    def __init__(
        self,
        model: Any,
        *,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        cache_dir: str | Path | None = None,
        model_name: str = "",
        max_length: int | None = None,
        chunk_overlap: int | None = None,
        length: LengthPolicy | None = None,
    ) -> None:
        self.model = model
        self.dim = model.embedding_dim
        self.batch_tokens = batch_tokens
        if length is None:
            mode = "truncate" if chunk_overlap is None else "chunk"
            length = resolve(model, max_length, mode, chunk_overlap=chunk_overlap or DEFAULT_CHUNK_OVERLAP)
        self.length = length
        self.max_length = length.limit
        self.chunk_overlap = length.chunk_overlap if length.window is not None else None
        self.model_name = model_name or getattr(model, "name", "")
        self._fingerprint: str | None = None
        self.cache = EmbeddingCache(cache_dir, self.fingerprint) if cache_dir else None
        self.truncated = 0
        self.chunked = 0

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        window = self.length.window
        chunk = {} if window is None else {"chunk_overlap": self.chunk_overlap, "chunk_size": window}
        return {"type": self.name, "model": self.model_name, "fingerprint": self.fingerprint,
                "max_length": self.max_length, "pooling": "mean", **chunk,
                "dtype": str(self.model.dtype).removeprefix("torch.")}  # fmt: skip

    def _long(self, seq: str) -> bool:
        return self.length.too_long(len(seq))

    def _cut(self, seqs: Sequence[str]) -> list[str]:
        if self.max_length is None:
            return list(seqs)
        n = self.length.check([f"sequence {i + 1}" for i in range(len(seqs))], [len(s) for s in seqs])
        if self.chunk_overlap is not None:
            self.chunked = n
            if n:
                log.info("%d protein(s) longer than %d residues: embedded in overlapping windows", n, self.max_length)
            return list(seqs)
        self.truncated = n
        if n:
            log.info("%d protein(s) longer than %d residues: using their first %d", n, self.max_length,
                     self.max_length)  # fmt: skip
        return [self.length.cut(s) for s in seqs]

    def _key(self, seq: str) -> str:
        """MD5 of the sequence; a chunked protein's key also names the windows (another overlap, another
        key). A truncating run never stores a protein longer than the limit, so the keys cannot meet."""
        return sequence_key(f"{seq}:chunk{self.length.window},{self.chunk_overlap}" if self._long(seq) else seq)

    def _embed(self, seqs: list[str], per_residue: bool, progress: Progress | None) -> list[np.ndarray]:
        from ..data.batching import token_budget_batches

        tokens = self.model.encode(seqs)
        out: list[np.ndarray] = [np.empty(0)] * len(seqs)
        for batch in token_budget_batches([len(t) for t in tokens], self.batch_tokens):
            hiddens, mask = self.model.tokens_to_hiddens([tokens[i] for i in batch])
            if per_residue:
                for j, i in enumerate(batch):
                    out[i] = hiddens[j, : len(seqs[i])].cpu().numpy().astype(np.float16)
            else:
                pooled = self.model.hiddens_to_embedding(hiddens, mask).cpu().numpy()
                for j, i in enumerate(batch):
                    out[i] = pooled[j]
            if progress:
                progress(sum(len(seqs[i]) for i in batch))
        return out

    def _compute(self, seqs: list[str], per_residue: bool, progress: Progress | None) -> list[np.ndarray]:
        """Features of proteins that fit the limit, and of longer ones (only with chunking) from windows."""
        from ..inference.chunking import stitch

        long = [i for i, s in enumerate(seqs) if self._long(s)]
        if not long:
            return self._embed(seqs, per_residue, progress)
        short = [i for i, s in enumerate(seqs) if not self._long(s)]
        out: list[np.ndarray] = [np.empty(0)] * len(seqs)
        for i, f in zip(short, self._embed([seqs[i] for i in short], per_residue, progress), strict=True):
            out[i] = f
        size, windows, starts = self.length.window, [], {}
        for i in long:
            starts[i] = self.length.starts(len(seqs[i]))
            windows += [seqs[i][a : a + size] for a in starts[i]]  # type: ignore[operator]
        pieces = iter(self._embed(windows, True, None))
        for i in long:
            full = stitch([next(pieces) for _ in starts[i]], starts[i], len(seqs[i]))
            out[i] = full if per_residue else full.astype(np.float32).mean(0)
            if progress:
                progress(len(seqs[i]))
        return out

    def _features(self, seqs: Sequence[str], per_residue: bool, progress: Progress | None) -> list[np.ndarray]:
        seqs = self._cut(seqs)
        kind = "residue" if per_residue else "protein"
        keys = [self._key(s) for s in seqs]
        have = self.cache.load(kind, set(keys)) if self.cache else {}
        todo: dict[str, str] = {}
        for k, s in zip(keys, seqs, strict=True):
            if k not in have:
                todo.setdefault(k, s)
        if have:
            log.info("embedding cache: %d of %d proteins found", len(seqs) - sum(k in todo for k in keys), len(seqs))
            if progress:
                progress(sum(len(s) for k, s in zip(keys, seqs, strict=True) if k not in todo))
        if todo:
            new = dict(zip(todo, self._compute(list(todo.values()), per_residue, progress), strict=True))
            if self.cache:
                self.cache.save(kind, new)
            have.update(new)
        return [have[k] for k in keys]

    def per_residue(self, seqs: Sequence[str], progress: Progress | None = None) -> list[np.ndarray]:
        return self._features(seqs, True, progress)

    def per_protein(self, seqs: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        feats = self._features(seqs, False, progress)
        return np.stack(feats).astype(np.float32) if feats else np.zeros((0, self.dim), np.float32)


Featurizer = OneHotFeaturizer | OneHotWindowFeaturizer | DipeptideFeaturizer | EmbeddingFeaturizer


def make_featurizer(kind: str, model: Any = None, *, window: int = 7, **options: Any) -> Featurizer:
    """`embeddings` (needs `model`; `options` go to :class:`EmbeddingFeaturizer`), or no model:
    `composition` / `onehot`, `dipeptide` (composition + dipeptide frequencies), `onehot-window` (one-hot
    rows of residues i-`window` .. i+`window`)."""
    if kind in ("composition", "onehot"):
        return OneHotFeaturizer(kind)
    if kind == "dipeptide":
        return DipeptideFeaturizer()
    if kind == "onehot-window":
        return OneHotWindowFeaturizer(window)
    if kind != "embeddings":
        raise ConfigError(f"unknown features {kind!r}; choose one of {', '.join(FEATURES)}")
    return EmbeddingFeaturizer(model, **options)


def save_untrained(
    model: str | os.PathLike, out: str | os.PathLike, *, seed: int = 0, run: str | os.PathLike | None = None
) -> Path:
    """The network of checkpoint `model` at its own initialisation, saved as a native checkpoint directory
    `out`: the step-0 baseline a trained model's features must beat (its weights, hence its embedding-cache
    fingerprint, differ from the trained model's). With `run` (the pretraining run directory `model` came
    from, or the first phase of it), exactly the network that run started from, rebuilt from its
    ``config.yaml`` (seed, position init); else ``torch.manual_seed(seed)`` and
    :meth:`T5Model.reset_parameters` (the same scheme, not a given run's exact weights)."""
    import torch

    from ..checkpoint import load_checkpoint, save_pretrained

    net, tokenizer = load_checkpoint(model)
    if run is not None:
        from ..train.config import TrainConfig
        from ..train.trainer import initial_model

        cfg = TrainConfig.from_dict(TrainConfig.from_yaml(Path(run) / "config.yaml"))
        start, _ = initial_model(cfg)
        if start.config != net.config:
            raise ConfigError(f"{run} started a {start.config} network, {model} is a {net.config}")
        net = start
        extra = {"weights": f"untrained: the initial network of pretraining run {run}", "source": str(model)}
    else:
        torch.manual_seed(seed)
        net.reset_parameters()
        extra = {"weights": "untrained: reset_parameters() of the network of the source", "source": str(model),
                 "seed": seed}  # fmt: skip
    return save_pretrained(net, tokenizer, out, extra=extra)
