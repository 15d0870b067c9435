"""The server's OpenAPI schema is its contract, checked by schemathesis in-process (ASGI, no socket) on the
`tiny` model with small limits: generated requests (the schema's examples, its boundary/coverage cases
and 30 fuzzed ones per operation, valid and invalid) never get a 5xx, every answer's status is declared
and its body matches the declared schema, and requests that break the schema are refused (4xx, 413
included: a bound that is a server limit is answered 413).

`positive_data_acceptance` is off: a request the schema allows can still be refused for what a schema
cannot say (a residue outside the alphabet, duplicate ids, too many residues after cleaning) -- declared
as 413/422 with the error body, and asserted by the explicit cases in test_serve.py.
"""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig

from prott5nv.serve.app import create_app
from prott5nv.serve.limits import ServeLimits

LIMITS = ServeLimits(
    max_sequences=4, max_residues=64, max_request_residues=160, max_new_tokens=8, max_outputs=3,
    max_output_values=10_000, max_body_bytes=64 * 1024, timeout_s=60, max_wait_ms=1,
)  # fmt: skip
CONFIG = {
    "seed": 16,  # the same cases every run
    "generation": {"max-examples": 30, "database": "none"},
    "checks": {
        "positive_data_acceptance": {"enabled": False},
        "negative_data_rejection": {"expected-statuses": ["400", "404", "405", "413", "422"]},
    },
}
seen: Counter = Counter()  # (operation, status) -> answers, printed at the end of the module (pytest -s)


@pytest.fixture(scope="module")
def served_schema(tiny_model):
    app = create_app(tiny_model, LIMITS)
    yield schemathesis.openapi.from_asgi("/openapi.json", app, config=SchemathesisConfig.from_dict(CONFIG))
    app.state.batcher.stop()
    by_op: dict[str, Counter] = {}
    for (op, status), n in seen.items():
        by_op.setdefault(op, Counter())[status] = n
    print(f"\nschemathesis: {len(by_op)} operations, {sum(seen.values())} requests")
    for op, statuses in sorted(by_op.items()):
        print(f"  {op}: {sum(statuses.values())} ({', '.join(f'{k}: {v}' for k, v in sorted(statuses.items()))})")
    assert all(200 in statuses for statuses in by_op.values()), by_op  # success bodies were checked too


schema = schemathesis.pytest.from_fixture("served_schema")


@schema.parametrize()
def test_server_honours_its_openapi_schema(case):
    response = case.call_and_validate()
    seen[(case.operation.label, response.status_code)] += 1
