"""A small client for `prott5nv serve`.

    >>> from prott5nv.client import Client
    >>> client = Client("http://127.0.0.1:8000")
    >>> vectors = client.embed(["MKTAYIAKQR", "MSEQ"])       # [(D,), (D,)] float32 arrays
    >>> scores = client.score(["MKTAYIAKQR"])                # [{"id", "length", "n_masked", "loss", ...}]

It uses only the standard library (``urllib``) and numpy, so it works with the core install -- `prott5nv
embed --server` needs no extra package, and a lab's script can talk to a shared server without FastAPI.
Long lists are sent in requests that respect the server's limits (read once from ``/v1/model``); arrays
travel as base64 float32. A 429 (queue full) or 503 (timed out) is retried after the server's
``Retry-After``; so are refused connections. Other errors raise :class:`ServerError` with the status and
the server's error body (``detail``, and for a bad sequence its ``id``, ``index`` and ``position``).
Duplicate ids are refused before anything is sent (:class:`~prott5nv.errors.InvalidSequenceError`).
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .errors import InvalidSequenceError, ProtT5nvError
from .serve.wire import decode_array

log = logging.getLogger(__name__)

RETRY_STATUSES = (429, 503)


class ServerError(ProtT5nvError):
    """The server refused a request (`status`, `detail`) or could not be reached (`status` 0)."""

    def __init__(self, status: int, detail: Any, url: str) -> None:
        self.status, self.detail, self.url = status, detail, url
        super().__init__(f"{url}: HTTP {status}: {_detail_text(detail)}" if status else f"{url}: {detail}")


def _detail_text(detail: Any) -> str:
    if isinstance(detail, dict):
        return str(detail.get("detail", detail))
    return str(detail)


class Client:
    """Talks to one server. `api_key` is sent as ``Authorization: Bearer``; `retries` bounds the retries of
    one request (429/503/connection refused), each waiting Retry-After (or `backoff` x 2^attempt) seconds,
    at most `max_wait` seconds."""

    def __init__(
        self, url: str, *, api_key: str | None = None, timeout: float = 300.0, retries: int = 8,
        backoff: float = 0.25, max_wait: float = 30.0,
    ) -> None:  # fmt: skip
        self.url = url.rstrip("/")
        self.api_key, self.timeout, self.retries = api_key, timeout, retries
        self.backoff, self.max_wait = backoff, max_wait
        self._info: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------ transport
    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One JSON request with retries; the decoded JSON answer."""
        url = self.url + path
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                payload = exc.read()
                try:
                    detail: Any = json.loads(payload)
                except ValueError:
                    detail = payload.decode("utf-8", errors="replace")
                if exc.code not in RETRY_STATUSES or attempt == self.retries:
                    raise ServerError(exc.code, detail, url) from None
                wait = _retry_after(exc.headers.get("Retry-After"), self.backoff * 2**attempt)
            except (urllib.error.URLError, ConnectionError) as exc:
                if attempt == self.retries:
                    reason = getattr(exc, "reason", exc)
                    raise ServerError(0, f"cannot reach the server ({reason})", url) from None
                wait = self.backoff * 2**attempt
            wait = min(wait, self.max_wait)
            log.debug("%s %s: retry %d in %.2f s", method, path, attempt + 1, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------------------ endpoints
    def health(self) -> dict[str, Any]:
        return self.request("GET", "/health")

    def model_info(self) -> dict[str, Any]:
        """``/v1/model`` (name, config, vocabulary, dims, limits), fetched once."""
        if self._info is None:
            self._info = self.request("GET", "/v1/model")
        return self._info

    def embed(
        self, seqs: Sequence[str], ids: Sequence[str] | None = None, *, per_residue: bool = False,
        batch_size: int | None = None, layers: Sequence[int] | None = None, **options: Any,
    ) -> list[np.ndarray]:  # fmt: skip
        """Per-protein embeddings `(D,)` (or per-residue `(L, D)`), float32, in input order; at most
        `batch_size` sequences per request. With `layers` (fair-esm's numbering, -1 = the last), those
        encoder layers: `(layers, D)` (or `(layers, L, D)`). `options`: ``strip_gaps``, ``unknown_to_x``."""
        out: list[np.ndarray] = []
        key = "per_residue" if per_residue else "embedding"
        residues = None
        if per_residue:  # keep each response within the server's per-residue output limit
            info = self.model_info()
            values = info["embedding_dim"] * (len(layers) if layers is not None else 1)
            residues = max(1, info["limits"]["max_output_values"] // values)
        extra = {} if layers is None else {"layers": list(layers)}
        for items in self._chunks(seqs, ids, batch_size, residues):
            body = {"sequences": items, "per_residue": per_residue, "encoding": "base64", **extra, **options}
            out += [decode_array(d[key]) for d in self.request("POST", "/v1/embeddings", body)["data"]]
        return out

    def score(self, seqs: Sequence[str], ids: Sequence[str] | None = None, **options: Any) -> list[dict[str, Any]]:
        """Masked-token loss per protein: ``{"id", "length", "n_masked", "loss", "perplexity"}``. `options`:
        ``seed``, ``mask_prob``, ``strip_gaps``, ``unknown_to_x``."""
        return self._post_all("/v1/score", seqs, ids, options)

    def generate(self, seqs: Sequence[str], ids: Sequence[str] | None = None, **settings: Any) -> list[dict[str, Any]]:
        """Decoded T5 targets of (masked) proteins: ``{"id", "outputs": [{"target", "filled", "score"}]}``.
        `settings`: max_new_tokens, num_beams, do_sample, temperature, top_k, top_p, num_return_sequences,
        seed."""
        return self._post_all("/v1/generate", seqs, ids, settings)

    def infill(self, seqs: Sequence[str], ids: Sequence[str] | None = None, **settings: Any) -> list[dict[str, Any]]:
        """Filled masks: ``{"id", "positions", "samples", "probabilities"}``. `settings`: num_samples,
        num_beams, temperature, top_k, top_p, seed."""
        return self._post_all("/v1/infill", seqs, ids, settings)

    # ------------------------------------------------------------------------------ helpers
    def _post_all(self, path: str, seqs: Sequence[str], ids: Sequence[str] | None, options: dict) -> list[dict]:
        out: list[dict[str, Any]] = []
        for items in self._chunks(seqs, ids):
            out += self.request("POST", path, {"sequences": items, **options})["data"]
        return out

    def _chunks(
        self, seqs: Sequence[str], ids: Sequence[str] | None, batch_size: int | None = None,
        max_residues: int | None = None,
    ) -> Iterator[list[dict[str, str]]]:  # fmt: skip
        """Requests' worth of ``{"id", "sequence"}`` items within the server's count and residue limits
        (and at most `batch_size` sequences, `max_residues` residues)."""
        if isinstance(seqs, str):
            raise TypeError("seqs must be a list of sequences, not one string")
        names = list(ids) if ids is not None else [str(i + 1) for i in range(len(seqs))]
        if len(names) != len(seqs):
            raise ValueError(f"{len(names)} ids for {len(seqs)} sequences")
        seen: set[str] = set()  # the server refuses duplicates within one request, the CLI within a file
        for name in names:
            if name in seen:
                raise InvalidSequenceError(f"record '{name}': duplicate id")
            seen.add(name)
        limits = self.model_info()["limits"]
        max_seqs = limits["max_sequences"]
        max_residues = min(limits["max_request_residues"], max_residues or limits["max_request_residues"])
        if batch_size is not None:
            max_seqs = min(max_seqs, max(1, batch_size))
        chunk: list[dict[str, str]] = []
        residues = 0
        for rid, seq in zip(names, seqs, strict=True):
            if chunk and (len(chunk) >= max_seqs or residues + len(seq) > max_residues):
                yield chunk
                chunk, residues = [], 0
            chunk.append({"id": rid, "sequence": seq})
            residues += len(seq)
        if chunk:
            yield chunk


class RemoteEncoder:
    """A served model in place of a local :class:`~prott5nv.api.ProtT5nv` for the embedding pipeline
    (:func:`prott5nv.inference.embed.embed_fasta`; `prott5nv embed --server URL`): the server's name,
    configuration and tokenizer, with :meth:`seqs_to_hiddens` answered by the server (the sequences are
    sent as they are). Per-residue states travel as base64 float32, so outputs equal local ones within
    float32 rounding."""

    def __init__(self, client: Client) -> None:
        import torch

        from .model.config import T5Config
        from .tokenizer import ProteinTokenizer

        info = client.model_info()
        self.client = client
        self.name = info["model"]
        self.config = T5Config.from_dict(info["config"])
        self.tokenizer = ProteinTokenizer.from_dict(info["tokenizer"])
        self.embedding_dim = int(info["embedding_dim"])
        limits = [v for v in (info["max_length"], info["limits"]["max_residues"]) if v is not None]
        self.max_length = min(limits) if limits else None
        self.dtype = getattr(torch, info["dtype"])
        self.device = torch.device("cpu")  # where the returned tensors live

    def seqs_to_hiddens(
        self, seqs: Sequence[str], ids: Sequence[str] | None = None, layers: int | Sequence[int] | None = None
    ) -> tuple[Any, Any]:
        """As :meth:`prott5nv.api.ProtT5nv.seqs_to_hiddens`: ``(hiddens [B, L_max, D] float32, residue
        mask [B, L_max] bool)`` on the CPU, computed by the server from the sequences themselves; for a
        list of `layers`, hiddens ``[len(layers), B, L_max, D]``."""
        import torch

        asked = None if layers is None else [layers] if isinstance(layers, int) else list(layers)
        states = self.client.embed(seqs, ids, per_residue=True, layers=asked)
        if asked is None:
            states = [s[None] for s in states]
        longest = max(s.shape[1] for s in states)
        hiddens = torch.zeros(len(states[0]), len(states), longest, self.embedding_dim)
        mask = torch.zeros(len(states), longest, dtype=torch.bool)
        for i, s in enumerate(states):
            hiddens[:, i, : s.shape[1]] = torch.from_numpy(s)
            mask[i, : s.shape[1]] = True
        return (hiddens[0] if layers is None or isinstance(layers, int) else hiddens), mask


def _retry_after(value: str | None, default: float) -> float:
    try:
        return max(0.0, float(value)) if value is not None else default
    except ValueError:
        return default
