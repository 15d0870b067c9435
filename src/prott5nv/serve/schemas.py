"""The server's contract (pydantic, so FastAPI's OpenAPI schema says it): request models that carry the
configured limits, the response models, and the one error body of every 4xx/5xx answer.

Request models are built per app from its :class:`~prott5nv.serve.limits.ServeLimits`
(:func:`request_models`): the schema then states what that server accepts -- 1 to `max_sequences`
sequences, at most `max_outputs` beams/outputs/samples, at most `max_new_tokens` steps, a sequence string
no longer than the request's character cap. Breaking one of those bounds is answered 413 (over a server
limit, :func:`limit_message`); any other schema violation 422. What a schema cannot express is checked by
the routes and answered with the same body: residues after cleaning (413 per sequence and per request),
bad residues and duplicate ids (422, with id, index and position), output size (413).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from ..sequence import SequencePolicy
from .limits import ServeLimits

#: (field, pydantic error type) of the schema bounds that are server limits: answered 413, not 422
LIMIT_ERRORS = frozenset({
    ("sequences", "too_long"), ("sequence", "string_too_long"), ("max_new_tokens", "less_than_equal"),
    ("num_beams", "less_than_equal"), ("num_return_sequences", "less_than_equal"), ("num_samples", "less_than_equal"),
})  # fmt: skip


def limit_message(error: Mapping[str, Any]) -> str | None:
    """The message of a pydantic error (as FastAPI reports it) that is over a server limit; None for any
    other error."""
    loc, ctx = error.get("loc", ()), error.get("ctx") or {}
    field = next((part for part in reversed(loc) if isinstance(part, str)), None)
    if (field, error.get("type")) not in LIMIT_ERRORS:
        return None
    if field == "sequences":
        return f"{ctx.get('actual_length', 'too many')} sequences in one request; the limit is {ctx['max_length']}"
    if field == "sequence":
        where = ".".join(map(str, loc[1:]))
        return f"{where}: longer than {ctx['max_length']} characters, the limit of one request"
    return f"{field} {error.get('input')} exceeds the server limit of {ctx['le']}"


MAX_ID_CHARS = 1000
MAX_SEED = 2**63 - 1
EXAMPLE = "MGMSFSHLLIVLLIIFVLFGAGKLPQVMSDLAKGLKAFKDGLKDDGSDNDKNK"  # C3PLM6 (Swiss-Prot), as in the README
EXAMPLE_MASKED = EXAMPLE[:22] + "<mask>" + EXAMPLE[23:40] + "<mask:3>" + EXAMPLE[43:]


# ------------------------------------------------------------------------------------ errors
class ErrorItem(BaseModel):
    """One schema violation: where (``["body", "sequences", 0, "sequence"]``), what, and pydantic's type."""

    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    """The body of every error answer (400, 401, 404, 405, 413, 422, 429, 500, 503)."""

    detail: str = Field(description="what went wrong, one line")
    id: str | None = Field(None, description="the offending sequence's id, when one is to blame")
    index: int | None = Field(None, description="its 0-based index in `sequences`")
    position: int | None = Field(None, description="the 1-based residue position of a bad residue")
    errors: list[ErrorItem] | None = Field(None, description="schema violations, each with its location")


ERROR_DESCRIPTIONS = {
    400: "the body is not JSON text (not UTF-8)",
    401: "missing or wrong API key (servers started with --api-key-file)",
    413: "over a server limit (see GET /v1/model 'limits'): body size, sequences, residues, outputs, steps",
    422: "invalid request: schema violation, bad residue, empty sequence, duplicate id, unusable settings",
    429: "request queue full; retry after Retry-After seconds",
    500: "a bug in the server",
    503: "timed out (queue wait + compute); retry after Retry-After seconds",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` entries of `codes`, all with the :class:`ErrorBody` schema."""
    return {code: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[code]} for code in codes}


# ------------------------------------------------------------------------------------ requests
class SequencesRequest(BaseModel):
    """What every POST body shares; the `sequences` field (with its limits) is added per app."""

    model_config = ConfigDict(extra="forbid")
    strip_gaps: StrictBool = Field(False, description="remove alignment gaps '-' and '.'")
    unknown_to_x: StrictBool = Field(False, description="map letters outside the alphabet to X")

    def policy(self) -> SequencePolicy:
        return SequencePolicy(strip_gaps=self.strip_gaps, unknown_to_x=self.unknown_to_x)

    def ids(self) -> list[str]:
        return [s.id for s in self.sequences]  # type: ignore[attr-defined]

    def seqs(self) -> list[str]:
        return [s.sequence for s in self.sequences]  # type: ignore[attr-defined]


Seed = Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]


class _Sampling(BaseModel):
    temperature: float = Field(1.0, gt=0.0, allow_inf_nan=False)
    top_k: StrictInt = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="1.0 = off")
    seed: Seed | None = Field(None, description="sampling seed (None: unseeded)")


@dataclass(frozen=True)
class RequestModels:
    """The request bodies of one app, bounded by its limits."""

    embeddings: type[SequencesRequest]
    score: type[SequencesRequest]
    generate: type[SequencesRequest]
    infill: type[SequencesRequest]


def request_models(limits: ServeLimits) -> RequestModels:
    """Request models whose schema carries `limits` (resolved: `max_residues` set)."""
    residues = f"at most {limits.max_residues} residues after cleaning (413 beyond)"

    class SequenceIn(BaseModel):
        model_config = ConfigDict(extra="forbid")
        id: StrictStr = Field(
            min_length=1, max_length=MAX_ID_CHARS, description="your name for the sequence, echoed back; unique"
        )
        sequence: StrictStr = Field(
            max_length=limits.max_request_chars,
            description=f"residues (case-insensitive; whitespace and one trailing '*' ignored); {residues}",
        )

    many = (
        f"the proteins, answered in this order: 1 to {limits.max_sequences}, ids unique (422 otherwise), "
        f"{limits.max_request_residues} residues together (413 beyond)"
    )
    Sequences = Annotated[list[SequenceIn], Field(min_length=1, max_length=limits.max_sequences, description=many)]
    Outputs = Annotated[StrictInt, Field(ge=1, le=limits.max_outputs)]
    example = {"sequences": [{"id": "C3PLM6", "sequence": EXAMPLE}]}
    masked = {"sequences": [{"id": "C3PLM6", "sequence": EXAMPLE_MASKED}]}

    class EmbeddingsRequest(SequencesRequest):
        model_config = ConfigDict(json_schema_extra={"examples": [example, {**example, "encoding": "base64"}]})
        sequences: Sequences
        per_residue: StrictBool = Field(False, description="also return the (L, D) per-residue states")
        layers: list[StrictInt] | None = Field(
            None, min_length=1, description="encoder layers (fair-esm's numbering: 0 = the embedding output, k = "
            "block k, -1 = the last, after the final norm, negative from the end); given, each array gains a "
            "leading layer axis: embedding (layers, D), per_residue (layers, L, D)",
        )  # fmt: skip
        encoding: Literal["json", "base64"] = "json"

    class ScoreRequest(SequencesRequest):
        model_config = ConfigDict(json_schema_extra={"examples": [{**example, "seed": 3}]})
        sequences: Sequences
        seed: Seed = Field(0, description="masking seed (the mask depends only on seed and sequence)")
        mask_prob: float = Field(0.15, gt=0.0, lt=1.0, allow_inf_nan=False, description="fraction of residues masked")

    class GenerateRequest(SequencesRequest, _Sampling):
        model_config = ConfigDict(json_schema_extra={"examples": [{**masked, "max_new_tokens": 8}]})
        sequences: Sequences
        max_new_tokens: StrictInt = Field(
            min(64, limits.max_new_tokens), ge=1, le=limits.max_new_tokens, description="decoder steps, EOS included"
        )
        num_beams: Outputs = 1
        do_sample: StrictBool = False
        num_return_sequences: Outputs = 1

    class InfillRequest(SequencesRequest, _Sampling):
        model_config = ConfigDict(json_schema_extra={"examples": [{**masked, "num_samples": 2, "seed": 7}]})
        sequences: Sequences
        num_beams: Outputs = 1
        num_samples: Outputs = Field(1, description="completions per input (sampled when > 1)")

    return RequestModels(EmbeddingsRequest, ScoreRequest, GenerateRequest, InfillRequest)


# ------------------------------------------------------------------------------------ responses
class Base64Array(BaseModel):
    dtype: Literal["float32"]
    shape: list[int]
    data: str = Field(description="base64 of the little-endian bytes")


class EmbeddingOut(BaseModel):
    id: str
    embedding: list[float] | list[list[float]] | Base64Array = Field(
        description="(D,): the mean over residues; (layers, D) when layers are asked for"
    )
    per_residue: list[list[float]] | list[list[list[float]]] | Base64Array | None = Field(
        None, description="(L, D), when asked for; (layers, L, D) with layers"
    )


class EmbeddingsResponse(BaseModel):
    model: str
    data: list[EmbeddingOut]


class ScoreOut(BaseModel):
    id: str
    length: int
    n_masked: int
    loss: float = Field(description="nats, mean over the masked residues")
    perplexity: float


class ScoreResponse(BaseModel):
    model: str
    seed: int
    data: list[ScoreOut]


class GeneratedOut(BaseModel):
    target: str
    filled: str | None
    score: float


class GenerateOut(BaseModel):
    id: str
    outputs: list[GeneratedOut]


class GenerateResponse(BaseModel):
    model: str
    data: list[GenerateOut]


class InfillOut(BaseModel):
    id: str
    positions: list[int]
    samples: list[str]
    probabilities: list[list[float]]


class InfillResponse(BaseModel):
    model: str
    data: list[InfillOut]


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    pending: int = Field(description="requests waiting or running")
    requests: int = Field(description="requests finished")
    batches: int = Field(description="model batches run")
    busy_s: float = Field(description="seconds the model worker has been busy")


class ModelInfo(BaseModel):
    model: str
    version: str
    config: dict[str, Any]
    vocabulary: list[str]
    tokenizer: dict[str, Any]
    embedding_dim: int
    max_length: int | None
    dtype: str
    device: str
    limits: ServeLimits
