"""Dynamic batching: one worker thread owns the model; requests hand it jobs and await futures.

A job is one request's work. The worker takes the first waiting job, then keeps collecting jobs for up to
`max_wait_ms` (or until `batch_tokens` tokens are waiting) and drains whatever else is already queued, up
to a few budgets' worth. Embedding jobs of the window are merged -- their sequences sorted by length and
cut into token-budget batches (:func:`~prott5nv.data.batching.token_budget_batches`) -- and each result
is routed back to its request; scoring jobs likewise. Generation and infilling jobs run one at a time
(their settings differ per request). Each sequence's result does not depend on what it was batched with
beyond float32 rounding, so a merged request gets what it would have got alone.

Futures are :class:`concurrent.futures.Future`; an asyncio handler awaits ``asyncio.wrap_future(f)``.
A request that times out cancels its future, which frees its queue slot at once (``pending`` counts
futures not yet done). A job is marked running only when its own computation starts -- a merged group
just before its batches, a generation job just before its call -- so a job that timed out while it
waited, even inside a window already being worked on, is skipped, never computed. A job whose
computation has started cannot be interrupted: it finishes, and its slot is freed then.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..api import ProtT5nv
from ..data.batching import DEFAULT_BATCH_TOKENS, token_budget_batches
from ..data.masking import T5Sample
from ..inference.score import score_samples

log = logging.getLogger(__name__)

MERGE_BUDGETS = 4  # a window merges at most this many batch budgets of already-waiting work


class QueueFullError(RuntimeError):
    """The batcher has `max_queue` requests waiting or running; `retry_after` is a hint in seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"server busy: request queue full, retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass
class EmbeddingResult:
    """One sequence's output: the mean over residues `(D,)` and the per-residue states `(L, D)` (a view
    into its batch's array, so keeping it costs nothing); `(layers, D)` and `(layers, L, D)` when
    layers were asked for."""

    embedding: np.ndarray
    per_residue: np.ndarray


@dataclass
class _Job:
    kind: str  # "embed" | "score" | "call"
    items: Sequence[Any] = ()  # token-id arrays (embed) or masked samples (score)
    fn: Callable[[], Any] | None = None  # "call" jobs
    layers: tuple[int, ...] | None = None  # embed jobs: the encoder layers (None: the output)
    future: Future = field(default_factory=Future)

    @property
    def cost(self) -> int:
        if self.kind == "embed":
            return sum(len(t) for t in self.items)
        if self.kind == "score":
            return sum(len(s.text_enc) + len(s.text_dec) for s in self.items)
        return 0


class DynamicBatcher:
    """Owns `model` in a worker thread; see the module docstring. Thread-safe `submit_*` methods."""

    def __init__(
        self, model: ProtT5nv, *, batch_tokens: int = DEFAULT_BATCH_TOKENS, max_wait_ms: float = 5.0,
        max_queue: int = 64,
    ) -> None:  # fmt: skip
        self.model = model
        self.batch_tokens = batch_tokens
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0
        self._seconds_per_job = 0.05  # running estimate, for Retry-After
        self._thread: threading.Thread | None = None
        self.batches = 0  # model batches run (embed + score)
        self.requests = 0  # jobs finished (any outcome)
        self.busy_s = 0.0  # worker time spent running jobs (utilisation = its growth / wall time)

    # ------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prott5nv-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    @property
    def pending(self) -> int:
        """Requests waiting or running."""
        return self._pending

    # ------------------------------------------------------------------------------ submitting
    def submit_embed(self, token_ids: Sequence[np.ndarray], layers: tuple[int, ...] | None = None) -> Future:
        """Future of a list of :class:`EmbeddingResult`, one per token-id array, in order; of the encoder
        `layers` (indexes 0..num_layers) when given, else of its output."""
        return self._submit(_Job("embed", list(token_ids), layers=layers))

    def submit_score(self, samples: Sequence[T5Sample]) -> Future:
        """Future of ``[(summed NLL, masked residues)]``, one per masked sample, in order."""
        return self._submit(_Job("score", list(samples)))

    def submit_call(self, fn: Callable[[], Any]) -> Future:
        """Future of ``fn()`` run alone on the worker thread (generation, infilling)."""
        return self._submit(_Job("call", fn=fn))

    def _submit(self, job: _Job) -> Future:
        with self._lock:
            if self._pending >= self.max_queue:
                raise QueueFullError(max(1, round(self._pending * self._seconds_per_job)))
            self._pending += 1
        job.future.add_done_callback(self._release)
        self._queue.put(job)
        return job.future

    def _release(self, _: Future) -> None:
        with self._lock:
            self._pending -= 1
            self.requests += 1

    # ------------------------------------------------------------------------------ worker
    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        """The first job plus what arrives within the wait window; (jobs, stop requested)."""
        jobs, tokens = [first], first.cost
        deadline = time.monotonic() + self.max_wait
        while True:
            waiting_budget = tokens < self.batch_tokens and first.kind != "call"
            timeout = deadline - time.monotonic() if waiting_budget else 0.0
            try:
                job = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                return jobs, False
            if job is None:
                return jobs, True
            jobs.append(job)
            tokens += job.cost
            if tokens >= MERGE_BUDGETS * self.batch_tokens:
                return jobs, False

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            jobs, stop = self._collect(first)
            start = time.perf_counter()
            embeds = [j for j in jobs if j.kind == "embed"]
            ran = 0
            for layers in dict.fromkeys(j.layers for j in embeds):  # jobs asking for the same layers merge
                group = [j for j in embeds if j.layers == layers]
                ran += self._run_merged(group, lambda items, layers=layers: self._embed_batches(items, layers))
            ran += self._run_merged([j for j in jobs if j.kind == "score"], self._score_all)
            for job in (j for j in jobs if j.kind == "call"):
                if job.future.set_running_or_notify_cancel():  # not if it timed out while it waited
                    assert job.fn is not None
                    _settle(job, job.fn)
                    ran += 1
            elapsed = time.perf_counter() - start
            self.busy_s += elapsed
            if ran:
                self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * elapsed / ran
        for job in self._drain():
            job.future.cancel()

    def _drain(self) -> list[_Job]:
        jobs = []
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return jobs
            if job is not None:
                jobs.append(job)

    def _run_merged(self, jobs: list[_Job], compute: Callable[[list[Any]], list[Any]]) -> int:
        """Run the items of `jobs` together and hand each job its slice of the results (or the error);
        jobs cancelled meanwhile (timed out) are left out. Returns the number of jobs run."""
        jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if not jobs:
            return 0
        items = [item for job in jobs for item in job.items]
        try:
            results = compute(items)
        except Exception as exc:  # noqa: BLE001 - reported to every request of the group, worker lives on
            log.exception("batch of %d requests failed", len(jobs))
            for job in jobs:
                job.future.set_exception(exc)
            return len(jobs)
        offset = 0
        for job in jobs:
            job.future.set_result(results[offset : offset + len(job.items)])
            offset += len(job.items)
        return len(jobs)

    def _embed_batches(
        self, token_ids: list[np.ndarray], layers: tuple[int, ...] | None = None
    ) -> list[EmbeddingResult]:
        out: list[EmbeddingResult | None] = [None] * len(token_ids)
        for batch in token_budget_batches([len(t) for t in token_ids], self.batch_tokens):
            hiddens, mask = self.model.tokens_to_hiddens([token_ids[i] for i in batch], layers)
            pooled = self.model.hiddens_to_embedding(hiddens, mask).cpu().numpy()
            hiddens_np = hiddens.cpu().numpy()
            for j, (i, n) in enumerate(zip(batch, mask.sum(1).tolist(), strict=True)):
                if layers is None:
                    out[i] = EmbeddingResult(pooled[j], hiddens_np[j, :n])
                else:
                    out[i] = EmbeddingResult(pooled[:, j], hiddens_np[:, j, :n])
            self.batches += 1
        return out  # type: ignore[return-value]

    def _score_all(self, samples: list[T5Sample]) -> list[tuple[float, int]]:
        def count(_: int) -> None:
            self.batches += 1

        return score_samples(self.model, samples, self.batch_tokens, on_batch=count)


def _settle(job: _Job, fn: Callable[[], Any]) -> None:
    try:
        job.future.set_result(fn())
    except Exception as exc:  # noqa: BLE001 - the request gets the error, the worker lives on
        job.future.set_exception(exc)
