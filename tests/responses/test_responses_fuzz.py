"""Property-based fuzzing of POST /v1/responses from its OpenAPI schema (bounded), over the real app with a
filled vector store: the served model's name and the real store id are put into generated bodies, so the
cases reach the pipeline, the search and the stream, not only the model check. No input yields a 5xx, and
every refusal is in OpenAI's error shape."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from tests.responses.conftest import MODEL  # noqa: E402


def test_no_generated_request_is_a_server_error(http, store):
    store_id, _ = store
    operation = schemathesis.openapi.from_asgi("/openapi.json", http.app)["/v1/responses"]["POST"]
    statuses: dict[int, int] = {}

    @given(case=operation.as_strategy())
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def check(case):
        if isinstance(case.body, dict):
            case.body["model"] = MODEL
            for tool in case.body.get("tools") or ():
                if isinstance(tool, dict) and isinstance(tool.get("vector_store_ids"), list):
                    tool["vector_store_ids"] = [store_id]
        response = case.call()
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        case.validate_response(response, checks=(not_a_server_error,))
        if response.status_code >= 400:
            error = response.json()["error"]
            assert error["message"] and error["type"], (response.status_code, response.text[:300], case.body)

    check()
    assert statuses.get(200), statuses  # the generated bodies did reach the engine
