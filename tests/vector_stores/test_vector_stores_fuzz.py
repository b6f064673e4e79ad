"""Property-based fuzzing of /v1/vector_stores from its OpenAPI schema, over a real retriever stage and
Milvus Lite (bounded): no input yields a 5xx, and every error is in OpenAI's shape."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from mmrag.serving.config import MmragConfig  # noqa: E402
from mmrag.serving.openai.server import create_app  # noqa: E402
from mmrag.serving.pipeline import LocalBackend  # noqa: E402
from tests.batch.engines import RetrievalEchoEngine  # noqa: E402

TMP = __import__("tempfile").mkdtemp(prefix="mmrag-vs-fuzz-")
CONFIG = MmragConfig.model_validate(
    {
        "retrieval": {"uri": f"{TMP}/milvus.db", "ingest_demo_corpus": False, "default_mode": "none"},
        "files": {"directory": f"{TMP}/files"},
    }
)


def _app():
    from mmrag.serving.retrieval.stage import RetrievalStage

    return create_app(CONFIG, LocalBackend(RetrievalEchoEngine(CONFIG), RetrievalStage(CONFIG)))


schema = schemathesis.openapi.from_asgi("/openapi.json", _app()).include(path_regex="^/v1/vector_stores")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_vector_store_input_is_a_server_error(case):
    response = case.call()
    case.validate_response(response, checks=(not_a_server_error,))
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["type"], (case.method, case.path, case.body, response.text[:300])
