"""The HTTP API (FastAPI): embeddings, scoring, generation and infilling over one loaded model.

Endpoints (JSON in, JSON out; OpenAPI docs at ``/docs``, schema at ``/openapi.json``):

| method | path | what |
|---|---|---|
| GET | /health | liveness: ``{"status": "ok", ...}`` |
| GET | /v1/model | name, configuration, vocabulary, dimensions, limits |
| POST | /v1/embeddings | per-protein (and per-residue) encoder embeddings |
| POST | /v1/score | masked-token loss / perplexity per protein (:mod:`prott5nv.inference.score`) |
| POST | /v1/generate | decoded T5 targets of (masked) proteins |
| POST | /v1/infill | masked positions filled with residues |

Arrays are JSON lists by default; ``"encoding": "base64"`` sends each as ``{"dtype": "float32",
"shape": [...], "data": base64 of the little-endian bytes}`` (:mod:`.wire`).

Status codes: 422 bad content (invalid residue -- with id, index and position --, empty list, wrong types,
bad settings), 413 over a size limit (body, sequences, residues), 429 queue full (with ``Retry-After``),
401 missing/wrong API key (when the server has keys), 503 request timed out (``Retry-After``), 500 a bug.
Every ``/v1/*`` path needs the key when keys are configured (header ``Authorization: Bearer KEY`` or
``X-API-Key: KEY``, compared in constant time); ``/health`` and the docs do not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException

from .. import __version__
from ..api import ProtT5nv
from ..errors import ProtT5nvError
from ..inference.infill import parse_masked
from ..inference.score import mask_sequences
from ..sequence import SequencePolicy, clean_sequence
from ..tokenizer import ProteinTokenizer
from .batcher import DynamicBatcher, QueueFullError
from .limits import RequestError, ServeLimits, check_sequences, key_matches
from .wire import encode_array

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ schemas
class SequenceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: StrictStr = Field(min_length=1, max_length=1000, description="your name for the sequence, echoed back")
    sequence: StrictStr = Field(description="residues (case-insensitive; whitespace and one trailing '*' ignored)")


class _SequencesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sequences: list[SequenceIn] = Field(description="the proteins, answered in this order")
    strip_gaps: StrictBool = Field(False, description="remove alignment gaps '-' and '.'")
    unknown_to_x: StrictBool = Field(False, description="map letters outside the alphabet to X")

    def policy(self) -> SequencePolicy:
        return SequencePolicy(strip_gaps=self.strip_gaps, unknown_to_x=self.unknown_to_x)

    def ids(self) -> list[str]:
        return [s.id for s in self.sequences]

    def seqs(self) -> list[str]:
        return [s.sequence for s in self.sequences]


class EmbeddingsRequest(_SequencesRequest):
    per_residue: StrictBool = Field(False, description="also return the (L, D) per-residue states")
    layers: list[StrictInt] | None = Field(
        None, description="encoder layers (fair-esm's numbering: 0 = the embedding output, k = block k, -1 = the "
        "last, after the final norm, negative from the end); given, each array gains a leading layer axis: "
        "embedding (layers, D), per_residue (layers, L, D)",
    )  # fmt: skip
    encoding: Literal["json", "base64"] = "json"


class ScoreRequest(_SequencesRequest):
    seed: StrictInt = Field(0, description="masking seed (the mask depends only on seed and sequence)")
    mask_prob: float = Field(0.15, gt=0.0, lt=1.0, description="fraction of residues masked")


class _DecodingSettings(BaseModel):
    num_beams: StrictInt = Field(1, ge=1)
    temperature: float = Field(1.0, gt=0.0)
    top_k: StrictInt = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="1.0 = off")
    seed: StrictInt | None = Field(None, description="sampling seed (None: unseeded)")


class GenerateRequest(_SequencesRequest, _DecodingSettings):
    max_new_tokens: StrictInt = Field(64, ge=1, description="decoder steps, EOS included")
    do_sample: StrictBool = False
    num_return_sequences: StrictInt = Field(1, ge=1)


class InfillRequest(_SequencesRequest, _DecodingSettings):
    num_samples: StrictInt = Field(1, ge=1, description="completions per input (sampled when > 1)")


# ------------------------------------------------------------------------------------ guard
class _Guard:
    """ASGI middleware run before any body is read: the API key on /v1/*, then the body size (from
    Content-Length, and counted while streaming for chunked bodies)."""

    def __init__(self, app: Any, max_body_bytes: int, api_keys: Sequence[str] | None) -> None:
        self.app, self.max_body_bytes, self.api_keys = app, max_body_bytes, list(api_keys or [])

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_keys and scope["path"].startswith("/v1/"):
            given = headers.get("x-api-key") or ""
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() == "bearer":
                given = token.strip()
            if not key_matches(given, self.api_keys):
                msg = "missing or wrong API key (send 'Authorization: Bearer KEY' or 'X-API-Key: KEY')"
                response = JSONResponse({"detail": msg}, 401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await _too_large(self.max_body_bytes)(scope, receive, send)
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise HTTPException(413, _TOO_LARGE.format(self.max_body_bytes))
            return message

        await self.app(scope, limited_receive, send)


_TOO_LARGE = "request body larger than the limit of {} bytes"


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"detail": _TOO_LARGE.format(limit)}, 413)


# ------------------------------------------------------------------------------------ state
@dataclass
class Served:
    """What the routes work with: the model, its dynamic batcher and the resolved limits (one per app, on
    ``app.state.served``)."""

    model: ProtT5nv
    batcher: DynamicBatcher
    limits: ServeLimits

    @property
    def tokenizer(self) -> ProteinTokenizer:
        return self.model.tokenizer

    async def run(self, future_of: Callable[[], Future]) -> Any:
        """Submit to the batcher (429 when full), await with the timeout (503), map worker errors."""
        try:
            future: Future = future_of()
        except QueueFullError as exc:
            raise RequestError(429, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
        timeout = self.limits.timeout_s
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except asyncio.TimeoutError:
            retry = str(max(1, round(timeout / 4)))
            raise RequestError(503, f"timed out after {timeout:g} s", headers={"Retry-After": retry}) from None
        except ProtT5nvError as exc:
            raise RequestError(422, str(exc)) from None

    def check_decoding(self, req: _SequencesRequest, outputs: int, steps: int = 0) -> None:
        """Refuse (masked) inputs the server will not decode: bad residues, too long, too many outputs/steps."""
        tok, limits = self.tokenizer, self.limits
        check_sequences(req.ids(), req.seqs(), lambda s, rid: parse_masked(s, tok, rid, req.policy()), limits,
                        lambda m: len(m.encoder_ids) - tok.num_special_suffix)  # fmt: skip
        if outputs > limits.max_outputs:
            raise RequestError(422, f"{outputs} beams/outputs per input; the server allows {limits.max_outputs}")
        if steps > limits.max_new_tokens:
            raise RequestError(422, f"max_new_tokens {steps} exceeds the server limit of {limits.max_new_tokens}")


def served(request: Request) -> Served:
    """The dependency every route takes: the app's :class:`Served`."""
    return request.app.state.served


Dep = Annotated[Served, Depends(served)]


async def render(content: Callable[[], dict[str, Any]]) -> Response:
    """Build and serialise a response body off the event loop (per-residue JSON can be large)."""
    body = await asyncio.to_thread(lambda: json.dumps(content(), separators=(",", ":")).encode())
    return Response(body, media_type="application/json")


# ------------------------------------------------------------------------------------ routes
router = APIRouter()


@router.get("/health")
async def health(s: Dep) -> dict[str, Any]:
    """Liveness and load: requests waiting or running, requests finished, model batches run, seconds
    the model worker has been busy."""
    b = s.batcher
    return {"status": "ok", "model": s.model.name, "pending": b.pending, "requests": b.requests,
            "batches": b.batches, "busy_s": round(b.busy_s, 3)}  # fmt: skip


@router.get("/v1/model")
async def model_info(s: Dep) -> dict[str, Any]:
    """What is served: configuration, vocabulary (token strings by id), dimensions and limits."""
    model, tok = s.model, s.tokenizer
    return {
        "model": model.name, "version": __version__, "config": model.config.to_dict(),
        "vocabulary": list(tok.tokens), "tokenizer": tok.to_dict(), "embedding_dim": model.embedding_dim,
        "max_length": model.max_length,
        "dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device), "limits": asdict(s.limits),
    }  # fmt: skip


@router.post("/v1/embeddings")
async def embeddings(req: EmbeddingsRequest, s: Dep) -> Response:
    """Mean-over-residues embedding `(D,)` of each protein; with ``per_residue``, also `(L, D)`; with
    ``layers``, of each layer: `(layers, D)` and `(layers, L, D)`."""
    tok, limits, policy = s.tokenizer, s.limits, req.policy()
    layers = None
    if req.layers is not None:
        try:
            layers = s.model.config.encoder_layers(req.layers)
        except ProtT5nvError as exc:
            raise RequestError(422, str(exc)) from None
    suffix = tok.num_special_suffix
    tokens = check_sequences(req.ids(), req.seqs(), lambda seq, rid: tok.encode(seq, rid, policy), limits,
                             lambda t: len(t) - suffix)  # fmt: skip
    if req.per_residue:
        values = (sum(len(t) for t in tokens) - suffix * len(tokens)) * s.model.embedding_dim * len(layers or [0])
        if values > limits.max_output_values:
            raise RequestError(413, f"per-residue output of {values} values; the limit is "
                               f"{limits.max_output_values} per request (send fewer residues)")  # fmt: skip
    results = await s.run(lambda: s.batcher.submit_embed(tokens, layers))

    def content() -> dict[str, Any]:
        data = []
        for rid, r in zip(req.ids(), results, strict=True):
            item = {"id": rid, "embedding": encode_array(r.embedding, req.encoding)}
            if req.per_residue:
                item["per_residue"] = encode_array(r.per_residue, req.encoding)
            data.append(item)
        return {"model": s.model.name, "data": data}

    return await render(content)


@router.post("/v1/score")
async def score(req: ScoreRequest, s: Dep) -> JSONResponse:
    """Masked-token loss (nats, mean over masked residues) and perplexity per protein, exactly as
    ``prott5nv score`` computes them (same seed -> same mask -> same numbers)."""
    policy = req.policy()
    cleaned = check_sequences(req.ids(), req.seqs(), lambda seq, rid: clean_sequence(seq, rid, policy), s.limits)
    _, samples = mask_sequences(s.model, cleaned, req.ids(), seed=req.seed, masked_lm_prob=req.mask_prob)
    scored = await s.run(lambda: s.batcher.submit_score(samples))
    data = [
        {"id": rid, "length": len(seq), "n_masked": n, "loss": nll / n, "perplexity": math.exp(nll / n)}
        for rid, seq, (nll, n) in zip(req.ids(), cleaned, scored, strict=True)
    ]
    return JSONResponse({"model": s.model.name, "seed": req.seed, "data": data})


@router.post("/v1/generate")
async def generate(req: GenerateRequest, s: Dep) -> JSONResponse:
    """Decode the T5 target of each (masked: ``<mask>``, ``<mask:K>``) protein; greedy by default."""
    s.check_decoding(req, max(req.num_beams, req.num_return_sequences), req.max_new_tokens)
    settings = req.model_dump(include={"max_new_tokens", "num_beams", "do_sample", "temperature", "top_k",
                                       "top_p", "num_return_sequences"})  # fmt: skip
    out = await s.run(lambda: s.batcher.submit_call(
        lambda: s.model.generate(req.seqs(), req.ids(), req.policy(), seed=req.seed, **settings)))  # fmt: skip
    k = req.num_return_sequences
    outputs = [{"target": g.target, "filled": g.filled, "score": g.score} for g in out]
    data = [{"id": rid, "outputs": outputs[i * k : (i + 1) * k]} for i, rid in enumerate(req.ids())]
    return JSONResponse({"model": s.model.name, "data": data})


@router.post("/v1/infill")
async def infill(req: InfillRequest, s: Dep) -> JSONResponse:
    """Fill every ``<mask>`` / ``<mask:K>`` with residues; `num_samples` completions per input with the
    probability of each chosen residue."""
    s.check_decoding(req, max(req.num_beams, req.num_samples))
    settings = req.model_dump(include={"num_beams", "temperature", "top_k", "top_p"})
    out = await s.run(lambda: s.batcher.submit_call(
        lambda: s.model.infill(req.seqs(), req.ids(), req.policy(), num_samples=req.num_samples, seed=req.seed,
                               **settings)))  # fmt: skip
    data = [
        {"id": rid, "positions": r.positions, "samples": r.samples,
         "probabilities": [p.tolist() for p in r.probabilities]}
        for rid, r in zip(req.ids(), out, strict=True)
    ]  # fmt: skip
    return JSONResponse({"model": s.model.name, "data": data})


# ------------------------------------------------------------------------------------ errors
async def request_error(_: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse({"detail": exc.message, **exc.where}, exc.status, headers=exc.headers)


async def user_error(_: Request, exc: ProtT5nvError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, 422)  # e.g. settings this model cannot honour


async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's own 422 echoes the offending input back; a huge body would come back whole
    keep = ("loc", "msg", "type")
    return JSONResponse({"detail": [{k: e[k] for k in keep if k in e} for e in exc.errors()]}, 422)


# ------------------------------------------------------------------------------------ app
def create_app(model: ProtT5nv, limits: ServeLimits | None = None, api_keys: Sequence[str] | None = None) -> FastAPI:
    """The FastAPI app serving `model` (the :data:`router`'s routes); its lifespan starts and stops the
    :class:`DynamicBatcher`."""
    limits = (limits or ServeLimits()).resolved(model.max_length)
    batcher = DynamicBatcher(
        model, batch_tokens=limits.batch_tokens, max_wait_ms=limits.max_wait_ms, max_queue=limits.max_queue
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        log.info("serving %s (%s, %s) with limits %s", model.name, model.device, model.dtype, limits)
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(
        title="prott5nv", version=__version__, lifespan=lifespan,
        description="ProtT5nv protein language model: embeddings, masked-token scoring, generation, infilling.",
    )  # fmt: skip
    app.state.served = Served(model, batcher, limits)
    app.state.batcher, app.state.limits = batcher, limits
    app.add_middleware(_Guard, max_body_bytes=limits.max_body_bytes, api_keys=api_keys)
    app.add_exception_handler(RequestError, request_error)
    app.add_exception_handler(ProtT5nvError, user_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.include_router(router)
    return app
