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

The OpenAPI schema is the contract (:mod:`.schemas`): the request models carry this server's limits,
every answer's body is declared, and every error answer has one body, :class:`~.schemas.ErrorBody`
(``{"detail": "one line", "id", "index", "position", "errors": [{"loc", "msg", "type"}]}``, the optional
fields only where they apply). Status codes: 413 over a server limit (body bytes, sequences, residues,
per-residue output values, ``max_new_tokens``, beams / returned sequences / samples: the request limits under
``/v1/model`` ``limits``); 422 anything else wrong (schema violation, invalid residue -- with id, index
and position --, empty sequence, duplicate id, settings the model cannot honour); 400 a body that is not
JSON text; 429 queue full (with ``Retry-After``); 401 missing/wrong API key (when the server has keys);
503 request timed out (``Retry-After``; a request still waiting is dropped, never computed); 500 a bug.
Every ``/v1/*`` path needs the key when keys are configured (header ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``,
compared in constant time); ``/health`` and the docs do not.

FastAPI reads the request models from the route signatures, and those models are built per app, so the
POST routes are made by :func:`build_router` (this module does not use postponed annotations).
"""

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from .. import __version__
from ..api import ProtT5nv
from ..errors import ProtT5nvError
from ..inference.infill import parse_masked
from ..inference.score import mask_sequences
from ..sequence import clean_sequence
from ..tokenizer import ProteinTokenizer
from .batcher import DynamicBatcher, QueueFullError
from .limits import RequestError, ServeLimits, check_sequences, key_matches
from .schemas import (
    EmbeddingsResponse,
    ErrorBody,
    ErrorItem,
    GenerateResponse,
    Health,
    InfillResponse,
    ModelInfo,
    ScoreResponse,
    SequencesRequest,
    error_responses,
    limit_message,
    request_models,
)
from .wire import encode_array

log = logging.getLogger(__name__)


def error_response(status: int, detail: str, headers: dict[str, str] | None = None, **fields: Any) -> JSONResponse:
    """An error answer: :class:`ErrorBody` (fields left out where they do not apply)."""
    body = ErrorBody(detail=detail, **fields).model_dump(exclude_none=True)
    return JSONResponse(body, status, headers=headers)


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
                response = error_response(401, msg, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        too_large = f"request body larger than the limit of {self.max_body_bytes} bytes"
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await error_response(413, too_large)(scope, receive, send)
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise HTTPException(413, too_large)
            return message

        await self.app(scope, limited_receive, send)


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
        """Submit to the batcher (429 when full), await with the timeout (503: the job is cancelled, so a
        job still waiting is dropped), map worker errors."""
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

    def check_masked(self, req: SequencesRequest) -> None:
        """Refuse (masked) inputs the server will not decode: bad residues, duplicate ids, proteins (masked
        residues included) or requests too long."""
        tok, limits = self.tokenizer, self.limits
        check_sequences(req.ids(), req.seqs(), lambda s, rid: parse_masked(s, tok, rid, req.policy(),
                        limits.max_residues), limits, lambda m: len(m.residues))  # fmt: skip


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


@router.get("/health", response_model=Health, responses=error_responses(500))
async def health(s: Dep) -> dict[str, Any]:
    """Liveness and load: requests waiting or running, requests finished, model batches run, seconds
    the model worker has been busy."""
    b = s.batcher
    return {"status": "ok", "model": s.model.name, "pending": b.pending, "requests": b.requests,
            "batches": b.batches, "busy_s": round(b.busy_s, 3)}  # fmt: skip


@router.get("/v1/model", response_model=ModelInfo, responses=error_responses(401, 500))
async def model_info(s: Dep) -> dict[str, Any]:
    """What is served: configuration, vocabulary (token strings by id), dimensions and limits."""
    model, tok = s.model, s.tokenizer
    return {
        "model": model.name, "version": __version__, "config": model.config.to_dict(),
        "vocabulary": list(tok.tokens), "tokenizer": tok.to_dict(), "embedding_dim": model.embedding_dim,
        "max_length": model.max_length,
        "dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device), "limits": asdict(s.limits),
    }  # fmt: skip


POST_ERRORS = error_responses(400, 401, 413, 422, 429, 500, 503)


def build_router(limits: ServeLimits) -> APIRouter:
    """The POST routes, their bodies bounded by `limits` (resolved)."""
    models = request_models(limits)
    post = APIRouter(responses=POST_ERRORS)
    EmbeddingsRequest, ScoreRequest = models.embeddings, models.score
    GenerateRequest, InfillRequest = models.generate, models.infill

    @post.post("/v1/embeddings", response_model=EmbeddingsResponse)
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

    @post.post("/v1/score", response_model=ScoreResponse)
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

    @post.post("/v1/generate", response_model=GenerateResponse)
    async def generate(req: GenerateRequest, s: Dep) -> JSONResponse:
        """Decode the T5 target of each (masked: ``<mask>``, ``<mask:K>``) protein; greedy by default."""
        s.check_masked(req)
        settings = req.model_dump(include={"max_new_tokens", "num_beams", "do_sample", "temperature", "top_k",
                                           "top_p", "num_return_sequences"})  # fmt: skip
        out = await s.run(lambda: s.batcher.submit_call(
            lambda: s.model.generate(req.seqs(), req.ids(), req.policy(), seed=req.seed, **settings)))  # fmt: skip
        k = req.num_return_sequences
        outputs = [{"target": g.target, "filled": g.filled, "score": g.score} for g in out]
        data = [{"id": rid, "outputs": outputs[i * k : (i + 1) * k]} for i, rid in enumerate(req.ids())]
        return JSONResponse({"model": s.model.name, "data": data})

    @post.post("/v1/infill", response_model=InfillResponse)
    async def infill(req: InfillRequest, s: Dep) -> JSONResponse:
        """Fill every ``<mask>`` / ``<mask:K>`` with residues; `num_samples` completions per input with the
        probability of each chosen residue."""
        s.check_masked(req)
        settings = req.model_dump(include={"num_beams", "temperature", "top_k", "top_p"})
        out = await s.run(lambda: s.batcher.submit_call(
            lambda: s.model.infill(req.seqs(), req.ids(), req.policy(), num_samples=req.num_samples,
                                   seed=req.seed, **settings)))  # fmt: skip
        data = [
            {"id": rid, "positions": r.positions, "samples": r.samples,
             "probabilities": [p.tolist() for p in r.probabilities]}
            for rid, r in zip(req.ids(), out, strict=True)
        ]  # fmt: skip
        return JSONResponse({"model": s.model.name, "data": data})

    return post


# ------------------------------------------------------------------------------------ errors
async def request_error(_: Request, exc: RequestError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.headers, **exc.where)


async def user_error(_: Request, exc: ProtT5nvError) -> JSONResponse:
    return error_response(422, str(exc))  # e.g. settings this model cannot honour


async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), exc.headers)  # 404, 405, 413 while streaming


async def internal_error(_: Request, exc: Exception) -> JSONResponse:
    return error_response(500, f"internal error ({type(exc).__name__}); the server log has the details")


async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's schema violations as :class:`ErrorBody`: 413 when every one is over a server limit
    (:func:`limit_message`), else 422; `detail` names the first (non-limit) one, `errors` lists them all
    (without the offending input: a huge body would come back whole)."""
    problems = exc.errors()
    limits = [limit_message(e) for e in problems]
    over = bool(problems) and all(limits)
    first = 0 if over else next((i for i, m in enumerate(limits) if m is None), None)
    if first is None:
        return error_response(422, "invalid request")
    loc = list(problems[first]["loc"])
    detail = limits[first] if over else f"{'.'.join(map(str, loc[1:])) or 'body'}: {problems[first]['msg']}"
    fields: dict[str, Any] = {}
    if loc[:2] == ["body", "sequences"] and len(loc) > 2 and isinstance(loc[2], int):
        fields["index"] = loc[2]
        with contextlib.suppress(LookupError, TypeError):
            rid = exc.body["sequences"][loc[2]]["id"]
            fields["id"] = rid if isinstance(rid, str) else None
    items = [ErrorItem(loc=list(e["loc"]), msg=e["msg"], type=e["type"]) for e in problems]
    return error_response(413 if over else 422, str(detail), errors=items, **fields)


# ------------------------------------------------------------------------------------ app
def create_app(model: ProtT5nv, limits: ServeLimits | None = None, api_keys: Sequence[str] | None = None) -> FastAPI:
    """The FastAPI app serving `model` (:data:`router` and :func:`build_router`'s routes); its lifespan
    starts and stops the :class:`DynamicBatcher`."""
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
        description="ProtT5nv protein language model: embeddings, masked-token scoring, generation, infilling. "
        "Over a server limit (GET /v1/model 'limits', the bounds in these schemas): 413; any other invalid "
        "request: 422; every error answer has the ErrorBody schema.",
    )  # fmt: skip
    app.state.served = Served(model, batcher, limits)
    app.state.batcher, app.state.limits = batcher, limits
    app.add_middleware(_Guard, max_body_bytes=limits.max_body_bytes, api_keys=api_keys)
    app.add_exception_handler(RequestError, request_error)
    app.add_exception_handler(ProtT5nvError, user_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    app.include_router(router)
    app.include_router(build_router(limits))
    return app
