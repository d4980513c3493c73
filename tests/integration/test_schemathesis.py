"""schemathesis against the live gateway: every documented status and shape holds, no 5xx.

Requests generated from /openapi.json (bounded: a few examples per operation) go to a real
gateway in front of real OPA and PostgreSQL, as alice; every answer must carry a documented
status, content type and body shape, and none may be a server error.
"""

from __future__ import annotations

import time

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.integration

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
# Bounded in time: about 120 requests in all (a few seconds).
EXAMPLES = 10


def test_the_live_gateway_keeps_its_contract(gateway, alice):
    document = gateway.client.get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(document)
    started = time.monotonic()
    tried = []
    for result in schema.get_all_operations():
        operation = result.ok()
        tried.append(f"{operation.method.upper()} {operation.path}")

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def conforms(case):
            response = case.call(base_url=gateway.url, headers=alice, timeout=30)
            case.validate_response(response, checks=CHECKS, headers=alice)

        conforms()
    assert "POST /v1/query" in tried and "GET /v1/catalog" in tried
    assert time.monotonic() - started < 120
