"""Property-based fuzzing of the chat API from its OpenAPI schema (bounded): no input yields a 5xx."""

from __future__ import annotations

import tempfile

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from mmrag.serving.config import MmragConfig  # noqa: E402
from mmrag.serving.openai.server import create_app  # noqa: E402
from mmrag.serving.pipeline import LocalBackend  # noqa: E402
from tests.fake_engine import FakeEngine  # noqa: E402

# data: URLs only, so generated image URLs never make the server fetch anything from the network.
CONFIG = MmragConfig.model_validate(
    {
        "limits": {"image_url_schemes": ["data"], "max_images_per_request": 4},
        "retrieval": {"default_mode": "none"},  # no retriever behind this app
        "files": {"directory": tempfile.mkdtemp(prefix="mmrag-fuzz-files-")},  # uploads not in the user's cache
    }
)
APP = create_app(CONFIG, LocalBackend(FakeEngine(CONFIG, special_texts=False)))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_input_is_a_server_error(case):
    response = case.call()
    case.validate_response(response, checks=(not_a_server_error,))
    if response.status_code >= 400 and case.path == "/v1/chat/completions":
        assert "error" in response.json(), (response.status_code, response.text[:300], case.body)
        error = response.json()["error"]
        assert error["message"] and error["type"]
