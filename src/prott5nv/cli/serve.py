"""`prott5nv serve`: the HTTP API (embeddings, scoring, generation) over one model, with dynamic batching."""

from __future__ import annotations

import argparse
import logging
import socket

from ..errors import ConfigError
from ..serve.limits import ServeLimits, read_api_keys
from .common import add_model_args, load_model

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    d = ServeLimits()
    p = sub.add_parser(
        "serve",
        help="HTTP service: embeddings, scoring, generation (needs the 'serve' extra)",
        description="Serve a model over HTTP (FastAPI + uvicorn; pip install 'prott5nv[serve]'): POST "
        "/v1/embeddings, /v1/score, /v1/generate, /v1/infill; GET /health, /v1/model; OpenAPI docs at /docs. "
        "Concurrent requests are merged into length-sorted token-budget batches by one worker thread that "
        "owns the model. Requests over a limit get 413, bad input 422, a full queue 429 (Retry-After).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    add_model_args(p, decoding=True)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--api-key-file", default=None,
        help="file with accepted API keys, one per line; /v1/* then needs 'Authorization: Bearer KEY' "
        "(default: no key needed)",
    )  # fmt: skip
    p.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
    g = p.add_argument_group("limits")
    g.add_argument("--max-sequences", type=int, default=d.max_sequences, help=f"per request ({d.max_sequences})")
    g.add_argument("--max-residues", type=int, default=None, help="per sequence (default: the model's limit)")
    g.add_argument(
        "--max-request-residues", type=int, default=d.max_request_residues,
        help=f"per request, all sequences together (default: {d.max_request_residues})",
    )  # fmt: skip
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help=f"(default: {d.max_body_bytes})")
    g.add_argument(
        "--max-output-values", type=int, default=d.max_output_values,
        help=f"per-residue values (residues x dim) per response (default: {d.max_output_values})",
    )  # fmt: skip
    g.add_argument("--timeout", type=float, default=d.timeout_s, help=f"seconds per request (default: {d.timeout_s:g})")
    g.add_argument(
        "--max-queue", type=int, default=d.max_queue,
        help=f"requests waiting or running before new ones get 429 (default: {d.max_queue})",
    )  # fmt: skip
    g.add_argument(
        "--batch-tokens", type=int, default=d.batch_tokens,
        help=f"padded tokens per model batch (default: {d.batch_tokens})",
    )  # fmt: skip
    g.add_argument(
        "--max-wait-ms", type=float, default=d.max_wait_ms,
        help=f"how long to wait for other requests to fill a batch (default: {d.max_wait_ms:g})",
    )  # fmt: skip
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="generation steps per output")
    g.add_argument("--max-outputs", type=int, default=d.max_outputs, help="beams / outputs / samples per input")
    p.set_defaults(func=run)


def limits_from_args(args: argparse.Namespace) -> ServeLimits:
    return ServeLimits(
        max_sequences=args.max_sequences, max_residues=args.max_residues,
        max_request_residues=args.max_request_residues, max_body_bytes=args.max_body_bytes,
        max_output_values=args.max_output_values,
        timeout_s=args.timeout, max_queue=args.max_queue, batch_tokens=args.batch_tokens,
        max_wait_ms=args.max_wait_ms, max_new_tokens=args.max_new_tokens, max_outputs=args.max_outputs,
    )  # fmt: skip


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound now: an address in use or not of this machine is refused before the
    model is loaded (one line, exit 2), not by uvicorn after it."""
    if not 0 <= port <= 65535:  # getaddrinfo would take 70000 as 4464
        raise ConfigError(f"cannot listen on {host}:{port}: a TCP port is 0-65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (OSError, OverflowError, UnicodeError) as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except (OSError, OverflowError) as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None
    return sock


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        missing = f"serve needs FastAPI and uvicorn ({exc.name} is missing)"
        raise ConfigError(f"{missing}: pip install 'prott5nv[serve]'") from None
    from ..serve.app import create_app

    # everything a user can get wrong is checked before the model is loaded: flags, key file, address
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    limits = limits_from_args(args)
    limits.check()
    keys = read_api_keys(args.api_key_file) if args.api_key_file else None
    sock = listen(args.host, args.port)
    try:
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        model = load_model(args)
        app = create_app(model, limits, keys)
        log.info("prott5nv serve: %s on http://%s:%d (docs: /docs)%s", model.name, args.host, args.port,
                 ", API key required" if keys else "")  # fmt: skip
        config = uvicorn.Config(app, host=args.host, port=args.port, access_log=not args.no_access_log,
                                log_level="info")  # fmt: skip
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0
