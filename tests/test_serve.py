"""`prott5nv serve` as a real process on 127.0.0.1 with the bundled demo model: concurrent clients get the
local API's numbers, bad and oversized input gets 422/413, a full queue 429 with Retry-After, a missing
key 401 -- and the server is still up afterwards. Plus the batcher's merging, checked in-process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import DEMO_DIM, SAMPLE_FASTA, SWISSPROT

import prott5nv
from prott5nv.client import Client, RemoteEncoder, ServerError
from prott5nv.data.batching import token_budget_batches
from prott5nv.errors import InvalidSequenceError
from prott5nv.fasta import read_fasta
from prott5nv.inference.score import score_sequences
from prott5nv.serve.batcher import DynamicBatcher
from prott5nv.serve.wire import decode_array

KEY = "s3cret-key-for-tests"

# server vs local results: other batch compositions give fp32 noise, which a trained model amplifies to
# ~1e-4 absolute (values are O(1); a real fault is off by far more)
ATOL, RTOL = 2e-3, 1e-3
MAX_VALUES = 3125 * DEMO_DIM  # the strict server's --max-output-values: 3,125 residues per request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m prott5nv serve` in a subprocess on a free port; its log goes to a file."""

    def __init__(self, log: Path, *flags: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "prott5nv", "serve", "--model", "prott5nv-demo", "--port", str(self.port),
               "--threads", "1", "--no-access-log", *flags]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 180.0) -> None:  # seconds on a quiet machine; generous when loaded
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited: {self.log.read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if json.loads(r.read())["status"] == "ok":
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):  # not up, or too busy to answer yet
                time.sleep(0.2)
        raise AssertionError(f"server not ready after {timeout} s: {self.log.read_text()[-2000:]}")

    def health(self) -> dict:
        assert self.proc.poll() is None, "server died"
        return httpx.get(self.url + "/health", timeout=10).json()

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """`open`: default settings with a few tight limits; `strict`: API key required, queue of one."""
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "keys.txt").write_text(f"# accepted keys\n{KEY}\nanother-key\n")
    open_ = Server(tmp / "open.log", "--max-sequences", "64", "--max-request-residues", "20000",
                   "--max-body-bytes", "200000", "--max-output-values", str(MAX_VALUES))  # fmt: skip
    strict = Server(tmp / "strict.log", "--api-key-file", str(tmp / "keys.txt"), "--max-queue", "1")
    try:
        open_.wait_ready()
        strict.wait_ready()
        yield open_, strict
    finally:
        codes = open_.stop(), strict.stop()
    # graceful: the lifespan ran to its end (uvicorn then re-raises SIGTERM, so the status is -15 or 0)
    for server, code in zip((open_, strict), codes, strict=True):
        log = server.log.read_text()
        assert code in (0, -15) and "Application shutdown complete" in log
        assert "Traceback" not in log and "Exception" not in log, log[-3000:]  # no input reached a bug


@pytest.fixture(scope="module")
def proteins() -> list[tuple[str, str]]:
    """120 real Swiss-Prot proteins that fit the model (<= 512 residues), in file order."""
    picked = [(r.id, r.sequence) for r in read_fasta(SWISSPROT) if len(r.sequence) <= 512]
    return picked[:120]


@pytest.fixture(scope="module")
def local():
    return prott5nv.load("prott5nv-demo")


def post(url: str, body, **kw) -> httpx.Response:
    return httpx.post(url, json=body, timeout=60, **kw)


def items(pairs) -> list[dict]:
    return [{"id": i, "sequence": s} for i, s in pairs]


# ----------------------------------------------------------------------------- correctness
def test_concurrent_clients_get_local_embeddings(servers, proteins, local):
    server, _ = servers
    ids, seqs = [i for i, _ in proteins], [s for _, s in proteins]
    expected = local.seqs_to_embedding(seqs).numpy()
    before = server.health()
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:  # six clients, each its own slice, 7 sequences per request
        try:
            mine = list(range(k, len(seqs), 6))
            client = Client(server.url)
            out = client.embed([seqs[i] for i in mine], [ids[i] for i in mine], batch_size=7)
            results[k] = list(zip(mine, out, strict=True))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    got = {i: v for pairs in results.values() for i, v in pairs}
    assert sorted(got) == list(range(len(seqs)))
    for i, vec in got.items():
        assert vec.shape == (local.embedding_dim,) and vec.dtype == np.float32
        np.testing.assert_allclose(vec, expected[i], atol=ATOL, rtol=RTOL)
    after = server.health()
    assert after["requests"] - before["requests"] == sum(-(-len(range(k, 120, 6)) // 7) for k in range(6))


def test_per_residue_and_both_encodings(servers, proteins, local):
    server, _ = servers
    pairs = proteins[:5]
    hiddens, mask = local.seqs_to_hiddens([s for _, s in pairs])
    for encoding in ("json", "base64"):
        r = post(server.url + "/v1/embeddings", {"sequences": items(pairs), "per_residue": True, "encoding": encoding})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "prott5nv-demo" and [d["id"] for d in body["data"]] == [i for i, _ in pairs]
        for j, d in enumerate(body["data"]):
            per_res = decode_array(d["per_residue"])
            n = len(pairs[j][1])
            assert per_res.shape == (n, local.embedding_dim)
            np.testing.assert_allclose(per_res, hiddens[j, :n].numpy(), atol=ATOL, rtol=RTOL)
            if encoding == "base64":
                assert d["per_residue"]["dtype"] == "float32" and d["per_residue"]["shape"] == [n, local.embedding_dim]
    # over --max-output-values (3,125 residues x the width): 413; the client splits to fit instead
    many = proteins[:20]
    assert sum(len(s) for _, s in many) * local.embedding_dim > MAX_VALUES
    r = post(server.url + "/v1/embeddings", {"sequences": items(many), "per_residue": True})
    assert r.status_code == 413 and f"the limit is {MAX_VALUES} per request" in r.json()["detail"]
    got = Client(server.url).embed([s for _, s in many], per_residue=True)
    assert [g.shape for g in got] == [(len(s), local.embedding_dim) for _, s in many]
    hiddens, mask = local.seqs_to_hiddens([s for _, s in many])
    for j, g in enumerate(got):
        np.testing.assert_allclose(g, hiddens[j, : len(g)].numpy(), atol=ATOL, rtol=RTOL)


def test_layers_in_the_request_and_the_remote_encoder(servers, proteins, local):
    server, _ = servers
    url = server.url + "/v1/embeddings"
    pairs = proteins[:4]
    want, mask = local.seqs_to_hiddens([s for _, s in pairs], layers=[-1, 2])
    pooled = local.hiddens_to_embedding(want, mask)
    r = post(url, {"sequences": items(pairs), "per_residue": True, "layers": [-1, 2], "encoding": "base64"})
    assert r.status_code == 200, r.text
    for j, d in enumerate(r.json()["data"]):
        n = len(pairs[j][1])
        emb, per_res = decode_array(d["embedding"]), decode_array(d["per_residue"])
        assert emb.shape == (2, local.embedding_dim) and per_res.shape == (2, n, local.embedding_dim)
        np.testing.assert_allclose(emb, pooled[:, j].numpy(), atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(per_res, want[:, j, :n].numpy(), atol=ATOL, rtol=RTOL)
    for layers, message in (([7], "layer 7 is not a layer of this 6-layer encoder"), ([-1, 6], "given twice")):
        r = post(url, {"sequences": items(pairs), "layers": layers})
        assert r.status_code == 422 and message in r.json()["detail"]
    remote = RemoteEncoder(Client(server.url))
    seqs = [s for _, s in proteins[4:9]]
    got, got_mask = remote.seqs_to_hiddens(seqs, layers=[0, -1])
    expected, expected_mask = local.seqs_to_hiddens(seqs, layers=[0, -1])
    assert got.shape == expected.shape and torch.equal(got_mask, expected_mask)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    one, _ = remote.seqs_to_hiddens(seqs, layers=3)
    torch.testing.assert_close(one, local.seqs_to_hiddens(seqs, layers=3)[0], atol=ATOL, rtol=RTOL)


def test_score_generate_infill_match_local(servers, proteins, local):
    server, _ = servers
    client = Client(server.url)
    ids, seqs = [i for i, _ in proteins[:12]], [s for _, s in proteins[:12]]
    remote = client.score(seqs, ids, seed=3)
    expected = score_sequences(local, seqs, ids, seed=3)
    assert [r["id"] for r in remote] == ids
    for r, e in zip(remote, expected, strict=True):
        assert (r["length"], r["n_masked"]) == (e.length, e.n_masked)
        assert r["loss"] == pytest.approx(e.loss, rel=1e-5) and r["perplexity"] == pytest.approx(e.perplexity, rel=1e-5)
    masked = [seqs[0][:20] + "<mask>" + seqs[0][21:60], seqs[1][:5] + "<mask:3>" + seqs[1][8:40]]
    gen = client.generate(masked, ["a", "b"], max_new_tokens=8)
    want = local.generate(masked, max_new_tokens=8)
    assert [g["outputs"][0]["target"] for g in gen] == [w.target for w in want]
    fill = client.infill(masked, ["a", "b"], num_samples=2, seed=7)
    want_fill = local.infill(masked, num_samples=2, seed=7)
    assert [f["samples"] for f in fill] == [w.samples for w in want_fill]
    assert fill[1]["positions"] == [5, 6, 7] and all(len(s) == 60 for s in fill[0]["samples"])


def test_remote_encoder_stands_in_for_the_local_model(servers, proteins, local):
    server, _ = servers
    remote = RemoteEncoder(Client(server.url))
    assert (remote.name, remote.max_length, remote.embedding_dim) == ("prott5nv-demo", 512, local.embedding_dim)
    assert remote.tokenizer.tokens == local.tokenizer.tokens and remote.config == local.config
    seqs = [s for _, s in proteins[:9]]
    got, want = remote.seqs_to_hiddens(seqs), local.seqs_to_hiddens(seqs)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], atol=ATOL, rtol=RTOL)


def test_batcher_merges_waiting_requests(local, proteins):
    """Jobs queued before the worker starts fall into one window: one merged, length-sorted set of
    token-budget batches serves all of them, and each gets exactly its own rows."""
    batcher = DynamicBatcher(local, batch_tokens=3000, max_wait_ms=1)
    groups = [proteins[0:7], proteins[7:9], proteins[9:20], proteins[20:21]]
    tokens = [[local.tokenizer.encode(s) for _, s in g] for g in groups]
    futures = [batcher.submit_embed(t) for t in tokens]
    assert batcher.pending == 4
    batcher.start()
    try:
        results = [f.result(timeout=60) for f in futures]
    finally:
        batcher.stop()
    merged = token_budget_batches([len(t) for ts in tokens for t in ts], 3000)
    separate = sum(len(token_budget_batches([len(t) for t in ts], 3000)) for ts in tokens)
    assert batcher.batches == len(merged) < separate
    for g, res in zip(groups, results, strict=True):
        expected = local.seqs_to_embedding([s for _, s in g]).numpy()
        np.testing.assert_allclose(np.stack([r.embedding for r in res]), expected, atol=ATOL, rtol=RTOL)
    assert batcher.pending == 0 and batcher.requests == 4


def test_batcher_merges_only_jobs_of_the_same_layers(local, proteins):
    batcher = DynamicBatcher(local, batch_tokens=3000, max_wait_ms=1)
    seqs = [s for _, s in proteins[:6]]
    tokens = [local.tokenizer.encode(s) for s in seqs]
    asked = [None, (2,), None, (0, 6)]
    groups = [tokens[:2], tokens[2:4], tokens[4:6], tokens[:3]]
    futures = [batcher.submit_embed(t, layers) for t, layers in zip(groups, asked, strict=True)]
    batcher.start()
    try:
        results = [f.result(timeout=60) for f in futures]
    finally:
        batcher.stop()
    assert batcher.batches == 3  # the two default jobs share one batch, each layer set has its own
    for res, layers, group in zip(results, asked, (seqs[:2], seqs[2:4], seqs[4:6], seqs[:3]), strict=True):
        expected = local.seqs_to_embedding(group, layers=None if layers is None else list(layers)).numpy()
        got = np.stack([r.embedding for r in res], axis=-2)  # (B, D) or (layers, B, D)
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_gets_422_with_id_and_position(servers, proteins):
    server, _ = servers
    url = server.url + "/v1/embeddings"
    good = proteins[0][1]
    r = post(
        url, {"sequences": [{"id": "ok", "sequence": good}, {"id": "bad", "sequence": good[:9] + "J" + good[10:]}]}
    )
    assert r.status_code == 422
    assert r.json() == {
        "detail": "record 'bad': unknown residue 'J' (use --unknown-to-x to map unknown letters to X) at position 10",
        "id": "bad", "index": 1, "position": 10,
    }  # fmt: skip
    r = post(url, {"sequences": [{"id": "gap", "sequence": good[:4] + "-" + good[4:]}]})
    assert r.status_code == 422 and r.json()["position"] == 5 and "alignment gap" in r.json()["detail"]
    r = post(url, {"sequences": [{"id": "gap", "sequence": good[:4] + "-" + good[4:]}], "strip_gaps": True})
    assert r.status_code == 200
    assert post(url, {"sequences": [{"id": "e", "sequence": " *"}]}).json()["detail"] == "record 'e': empty sequence"
    r = post(url, {"sequences": []})  # refused by the schema (minItems 1), with the one error body
    assert r.status_code == 422 and r.json() == {
        "detail": "sequences: List should have at least 1 item after validation, not 0",
        "errors": [{"loc": ["body", "sequences"], "msg": "List should have at least 1 item after validation, not 0",
                    "type": "too_short"}],
    }  # fmt: skip
    twice = [{"id": "P1", "sequence": good}, {"id": "P2", "sequence": good}, {"id": "P1", "sequence": good[:50]}]
    for path in ("/v1/embeddings", "/v1/score", "/v1/generate", "/v1/infill"):  # as the CLI refuses a FASTA's
        r = post(server.url + path, {"sequences": twice})
        assert r.status_code == 422, path
        assert r.json() == {"detail": "record 'P1': duplicate id (first at index 0)", "id": "P1", "index": 2}
    with pytest.raises(InvalidSequenceError, match="record 'P1': duplicate id"):
        Client(server.url).embed([good, good], ["P1", "P1"])  # refused before sending (they may span requests)
    cases = {  # wrong types, missing or unknown fields: pydantic's location of the problem
        "number as sequence": ({"sequences": [{"id": "x", "sequence": 5}]}, ["body", "sequences", 0, "sequence"]),
        "no id": ({"sequences": [{"sequence": good}]}, ["body", "sequences", 0, "id"]),
        "string list": ({"sequences": [good]}, ["body", "sequences", 0]),
        "not a list": ({"sequences": good}, ["body", "sequences"]),
        "unknown field": ({"sequences": [{"id": "x", "sequence": good}], "pooling": "max"}, ["body", "pooling"]),
        "bad encoding": ({"sequences": [{"id": "x", "sequence": good}], "encoding": "npy"}, ["body", "encoding"]),
    }
    for name, (body, loc) in cases.items():
        r = post(url, body)
        assert r.status_code == 422, name
        assert loc in [d["loc"] for d in r.json()["errors"]], (name, r.json())
        assert r.json()["detail"].startswith(".".join(map(str, loc[1:])) + ": "), (name, r.json())
    r = post(url, {"sequences": [{"id": "ok", "sequence": good}, {"id": "n", "sequence": 5}]})
    assert (r.json()["id"], r.json()["index"]) == ("n", 1)  # schema errors in a sequence name it too
    r = httpx.post(url, content=b'{"sequences": [', headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 422 and r.json()["errors"][0]["type"] == "json_invalid"
    r = post(server.url + "/v1/generate", {"sequences": [{"id": "m", "sequence": "MKT<mask:0>A"}]})
    assert r.status_code == 422 and r.json()["id"] == "m"
    r = post(server.url + "/v1/generate", {"sequences": [{"id": "m", "sequence": "MKT<mask>A"}], "num_beams": 0})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "num_beams"]  # invalid at any server
    r = post(server.url + "/v1/score", {"sequences": [{"id": "s", "sequence": good}], "mask_prob": 1.5})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "mask_prob"]
    r = post(server.url + "/v1/generate", {"sequences": [{"id": "m", "sequence": "MKT<mask>A"}], "num_beams": 4,
                                           "do_sample": True})  # fmt: skip
    assert r.status_code == 422 and "cannot be combined" in r.json()["detail"]  # the model's own check
    r = post(server.url + "/v1/score", {"sequences": [{"id": "s", "sequence": good}], "mask_prob": 0.9})
    assert r.status_code == 422 and "sentinels" in r.json()["detail"]  # the masker's own check
    r = httpx.post(server.url + "/v1/embeddings", content=b"[" * 100_000, timeout=10)  # nesting bomb
    assert r.status_code in (400, 422)
    assert server.health()["status"] == "ok"


def test_oversized_input_gets_413(servers, proteins):
    server, _ = servers
    url = server.url + "/v1/embeddings"
    r = post(url, {"sequences": items(proteins[:65])})  # over the schema's maxItems, a server limit: 413
    assert r.status_code == 413 and r.json()["detail"] == "65 sequences in one request; the limit is 64"
    assert r.json()["errors"] == [{"loc": ["body", "sequences"], "type": "too_long",
                                   "msg": "List should have at most 64 items after validation, not 65"}]  # fmt: skip
    masked = {"sequences": [{"id": "m", "sequence": "MKT<mask>A"}]}
    for setting, limit in (("num_beams", 16), ("num_return_sequences", 16), ("max_new_tokens", 512)):
        r = post(server.url + "/v1/generate", {**masked, setting: limit + 1})
        assert r.status_code == 413, setting
        assert r.json()["detail"] == f"{setting} {limit + 1} exceeds the server limit of {limit}"
    r = post(server.url + "/v1/infill", {**masked, "num_samples": 17})
    assert r.status_code == 413 and r.json()["detail"] == "num_samples 17 exceeds the server limit of 16"
    r = post(server.url + "/v1/infill", {"sequences": [{"id": "m", "sequence": "MKT<mask:99999999999>A"}]})
    assert r.status_code == 413 and r.json() == {  # refused before the masked text is built
        "detail": "record 'm': more than 512 residues (masked ones included)", "id": "m", "index": 0}  # fmt: skip
    long_seq = "".join(s for _, s in proteins[:3])[:513]
    r = post(url, {"sequences": [{"id": "a", "sequence": "MKV"}, {"id": "long", "sequence": long_seq}]})
    assert r.status_code == 413 and (r.json()["id"], r.json()["index"]) == ("long", 1)
    heavy = sorted(proteins, key=lambda p: -len(p[1]))[:60]  # > 20,000 residues together
    assert sum(len(s) for _, s in heavy) > 20_000
    r = post(url, {"sequences": items(heavy)})
    assert r.status_code == 413 and "the limit is 20000" in r.json()["detail"]
    big = {"sequences": [{"id": "x", "sequence": "A" * 250_000}]}
    r = post(url, big)  # Content-Length over --max-body-bytes: refused before reading
    assert r.status_code == 413 and "200000 bytes" in r.json()["detail"]

    def chunked():  # no Content-Length: counted while streaming
        payload = json.dumps(big).encode()
        for i in range(0, len(payload), 65536):
            yield payload[i : i + 65536]

    r = httpx.post(url, content=chunked(), headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "200000 bytes" in r.json()["detail"]
    assert server.health()["status"] == "ok"
    # the client splits long lists to fit the limits instead of failing
    assert len(Client(server.url).embed([s for _, s in heavy])) == 60


# ----------------------------------------------------------------------------- key and queue
def test_api_key_required_and_compared(servers, proteins):
    _, strict = servers
    body = {"sequences": items(proteins[:2])}
    for headers in ({}, {"Authorization": f"Bearer {KEY}x"}, {"X-API-Key": "wrong"}, {"Authorization": KEY}):
        r = post(strict.url + "/v1/embeddings", body, headers=headers)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", headers
    assert httpx.get(strict.url + "/v1/model", timeout=10).status_code == 401
    assert post(strict.url + "/v1/embeddings", body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert post(strict.url + "/v1/embeddings", body, headers={"X-API-Key": "another-key"}).status_code == 200
    assert httpx.get(strict.url + "/health", timeout=10).status_code == 200  # liveness needs no key
    with pytest.raises(ServerError) as info:
        Client(strict.url).embed(["MKV"])
    assert info.value.status == 401


def test_full_queue_gets_429_with_retry_after_and_client_retries(servers, proteins, local):
    _, strict = servers
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"sequences": items(proteins[:60]), "seed": 1}
    responses: list[httpx.Response] = []

    def hit() -> None:
        responses.append(post(strict.url + "/v1/score", body, headers=headers))

    threads = [threading.Thread(target=hit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 429} and codes.count(200) >= 1, codes
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1 and "queue full" in r.json()["detail"]
    # the client waits Retry-After and retries: four concurrent clients all succeed
    seqs = [s for _, s in proteins[:30]]
    expected = local.seqs_to_embedding(seqs).numpy()
    out: list = [None] * 4

    def embed(k: int) -> None:
        out[k] = Client(strict.url, api_key=KEY, backoff=0.05, retries=30).embed(seqs)  # 4 clients share one slot

    threads = [threading.Thread(target=embed, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got in out:
        np.testing.assert_allclose(np.stack(got), expected, atol=ATOL, rtol=RTOL)
    assert strict.health()["pending"] == 0


def test_model_info_and_docs(servers, local):
    server, _ = servers
    info = httpx.get(server.url + "/v1/model", timeout=10).json()
    assert info["model"] == "prott5nv-demo" and info["embedding_dim"] == local.embedding_dim
    assert info["vocabulary"] == list(local.tokenizer.tokens) and len(info["vocabulary"]) == 128
    assert info["config"] == local.config.to_dict() and info["max_length"] == 512
    assert info["limits"]["max_sequences"] == 64 and info["limits"]["max_residues"] == 512
    schema = httpx.get(server.url + "/openapi.json", timeout=10).json()
    paths, models = schema["paths"], schema["components"]["schemas"]
    assert {"/health", "/v1/model", "/v1/embeddings", "/v1/score", "/v1/generate", "/v1/infill"} == set(paths)
    assert httpx.get(server.url + "/docs", timeout=10).status_code == 200
    # the schema states this server's limits (--max-sequences 64, the defaults otherwise) ...
    sequences = models["EmbeddingsRequest"]["properties"]["sequences"]
    assert (sequences["minItems"], sequences["maxItems"]) == (1, 64)
    assert models["SequenceIn"]["properties"]["sequence"]["maxLength"] == 2 * 20000 + 1024
    generate = models["GenerateRequest"]["properties"]
    assert generate["num_beams"]["maximum"] == generate["num_return_sequences"]["maximum"] == 16
    assert generate["max_new_tokens"]["maximum"] == 512
    # ... and one error body for every error of every operation
    for path, ops in paths.items():
        for method, op in ops.items():
            errors = {code: r for code, r in op["responses"].items() if code != "200"}
            if method == "post":
                assert set(errors) == {"400", "401", "413", "422", "429", "500", "503"}, path
            for response in errors.values():
                assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    assert "HTTPValidationError" not in models


def test_missing_extra_is_one_line(monkeypatch, capsys):
    from prott5nv.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn -> ImportError
    assert main(["serve", "--port", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "prott5nv serve: error: serve needs FastAPI and uvicorn (uvicorn is missing): " \
        "pip install 'prott5nv[serve]'"  # fmt: skip


def test_request_timeout_gets_503_and_frees_its_queue_slot(local, proteins):
    """In-process app whose worker is stopped: the request waits --timeout, then 503 with Retry-After, and
    its cancelled job no longer counts against the queue."""
    from fastapi.testclient import TestClient

    from prott5nv.serve.app import create_app
    from prott5nv.serve.limits import ServeLimits

    app = create_app(local, ServeLimits(timeout_s=0.3, max_queue=1))
    with TestClient(app) as http:
        app.state.batcher.stop()
        body = {"sequences": items(proteins[:2])}
        for _ in range(2):  # the second would get 429 if the first still held the only slot
            r = http.post("/v1/embeddings", json=body)
            assert r.status_code == 503 and r.headers["Retry-After"] == "1"
            assert r.json() == {"detail": "timed out after 0.3 s"}
        assert http.get("/health").json()["pending"] == 0


def _h5_contents(path: Path) -> tuple[dict, dict]:
    """(file attributes, {dataset name: (attributes, values)}) of an embedding file."""
    import h5py

    found: dict = {}

    def visit(name: str, obj) -> None:
        if isinstance(obj, h5py.Dataset):
            found[name] = (dict(obj.attrs), obj[()])

    with h5py.File(path) as f:
        f.visititems(visit)
        return dict(f.attrs), found


def test_embed_cli_with_server_writes_the_local_file(servers, tmp_path):
    """`prott5nv embed --server URL` sends the batches to the server and writes the same HDF5 as a local
    run (attributes, names, shapes; values within float32 rounding)."""
    from prott5nv.cli import main

    server, strict = servers
    local_out, remote_out, keyed_out = tmp_path / "local.h5", tmp_path / "remote.h5", tmp_path / "keyed.h5"
    flags = ["--pooling", "mean,max", "--per-residue", "--batch-tokens", "3000"]
    assert main(["embed", str(SAMPLE_FASTA), "-o", str(local_out), *flags]) == 0
    assert main(["embed", str(SAMPLE_FASTA), "-o", str(remote_out), *flags, "--server", server.url]) == 0
    (tmp_path / "key.txt").write_text(KEY + "\n")
    assert main(["embed", str(SAMPLE_FASTA), "-o", str(keyed_out), "--server", strict.url,
                 "--api-key-file", str(tmp_path / "key.txt")]) == 0  # fmt: skip
    local_attrs, local_data = _h5_contents(local_out)
    remote_attrs, remote_data = _h5_contents(remote_out)
    assert remote_attrs == local_attrs and sorted(remote_data) == sorted(local_data)
    assert len(local_data) >= 48
    for name, (attrs, values) in local_data.items():
        assert remote_data[name][0] == attrs and remote_data[name][1].shape == values.shape
        np.testing.assert_allclose(remote_data[name][1], values, atol=ATOL, rtol=RTOL)
    assert len(_h5_contents(keyed_out)[1]) == len(list(read_fasta(SAMPLE_FASTA)))
    assert main(["embed", str(SAMPLE_FASTA), "-o", str(tmp_path / "x.h5"), "--server", strict.url]) == 2  # no key


def test_timed_out_request_is_dropped_from_the_queue(tiny_model, real_proteins, monkeypatch):
    """A generate request that times out while it waits behind a slow job of the same batcher window gets
    503, leaves the queue at once (/health pending drops while the slow job still runs) and is never
    computed afterwards."""
    from fastapi.testclient import TestClient

    from prott5nv.serve.app import create_app
    from prott5nv.serve.limits import ServeLimits

    calls: list[int] = []
    real_generate = tiny_model.generate
    monkeypatch.setattr(tiny_model, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    app = create_app(tiny_model, ServeLimits(timeout_s=1.0, max_queue=4))
    batcher = app.state.batcher  # not started: TestClient without `with` runs no lifespan
    http = TestClient(app)
    release, running = threading.Event(), threading.Event()
    slow = batcher.submit_call(lambda: running.set() or release.wait(60))
    answers: list[httpx.Response] = []
    body = {"sequences": [{"id": real_proteins[0][0], "sequence": real_proteins[0][1][:40] + "<mask>"}]}
    sender = threading.Thread(target=lambda: answers.append(http.post("/v1/generate", json=body)))
    sender.start()
    while batcher.pending < 2:  # the request is queued behind the slow job
        time.sleep(0.01)
    batcher.start()  # one window takes both: the slow job runs, the request waits behind it
    running.wait(60)
    sender.join(60)
    try:
        assert answers[0].status_code == 503 and answers[0].headers["Retry-After"] == "1"
        assert http.get("/health").json()["pending"] == 1  # only the slow job: the request left the queue
    finally:
        release.set()
        batcher.submit_call(lambda: None).result(60)  # everything before it has been handled
        batcher.stop()
    assert slow.result() is True and calls == []  # the timed-out request was never computed
    assert batcher.pending == 0


def test_start_up_failures_are_one_line_before_the_model_loads(tmp_path, capsys):
    """Bad limits or threads, an unreadable key file, an address in use or impossible: one line, exit 2,
    and before the model is loaded (the model named does not exist: loaded first, it would be the error)."""
    from prott5nv.cli import main

    free = _free_port()
    missing_model = str(tmp_path / "no_model")
    (tmp_path / "binary_keys").write_bytes(b"\xff\xfe\x00")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for flags, message in (
            (["--port", str(port)], f"cannot listen on 127.0.0.1:{port}: Address already in use"),
            (["--port", "70000"], "cannot listen on 127.0.0.1:70000: a TCP port is 0-65535"),
            (["--max-sequences", "0"], "serve limit max_sequences must be positive, got 0"),
            (["--timeout", "-1"], "serve limit timeout_s must be positive, got -1"),
            (["--threads", "0"], "--threads must be >= 1, got 0"),
            (["--api-key-file", str(tmp_path / "nope")], "cannot read API key file"),
            (["--api-key-file", str(tmp_path / "binary_keys")], "is not UTF-8 text"),
        ):
            assert main(["serve", "--model", missing_model, "--port", str(free), *flags]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and err.startswith("prott5nv serve: error: ") and message in err, err
    assert main(["serve", "--model", missing_model, "--port", str(free)]) == 2  # the model: one line too
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no_model" in err, err
    with socket.socket() as s:  # and the address it had bound is free again
        s.bind(("127.0.0.1", free))
