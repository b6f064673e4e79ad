"""``POST /v1/completions`` over the real app and the fake engine (it answers with the prompt's words), driven by
the real `openai` client: shapes, streaming, echo, legacy log-probabilities, and every refusal."""

from __future__ import annotations

import json

import openai
import pytest
from fastapi.testclient import TestClient

from mmrag.serving.config import MmragConfig
from mmrag.serving.openai.server import create_app
from mmrag.serving.pipeline import LocalBackend
from tests.fake_engine import FakeEngine

MODEL = "smol"
KEY = "sk-completions-test"


def make_engine() -> FakeEngine:
    # Retrieval stays the server default (text) with no retriever behind it: completions must not retrieve.
    limits = {"max_n": 3, "max_completion_prompts": 3, "max_completion_tokens": 50, "max_prompt_chars": 400}
    return FakeEngine(
        MmragConfig.model_validate({"limits": limits, "engine": {"max_model_len": 64}, "server": {"api_keys": [KEY]}})
    )


@pytest.fixture(scope="module")
def app_and_engine():
    """One app for the module (building one is most of a test's time); each test starts with no requests seen."""
    engine = make_engine()
    with TestClient(create_app(engine.config, LocalBackend(engine))) as client:
        client.headers["Authorization"] = f"Bearer {KEY}"
        yield client, engine


@pytest.fixture
def engine(app_and_engine):
    engine = app_and_engine[1]
    engine.seen.clear()
    return engine


@pytest.fixture
def http(app_and_engine, engine):
    return app_and_engine[0]


@pytest.fixture
def client(http):
    return openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0)


def test_a_prompt_is_sent_raw_without_retrieval(client, engine):
    response = client.completions.create(model=MODEL, prompt="one two three", max_tokens=10, seed=7, user="u-1")
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    (choice,) = response.choices
    assert (choice.index, choice.text, choice.finish_reason, choice.logprobs) == (0, "one two three ", "stop", None)
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == (3, 3, 6)
    (request,) = engine.seen
    assert request.prompt == "one two three" and request.messages == [] and request.retrieval is None
    assert request.sampling.seed == 7 and request.sampling.max_tokens == 10


def test_max_tokens_defaults_to_16_as_openai(client, engine):
    response = client.completions.create(model=MODEL, prompt=" ".join(f"w{i}" for i in range(20)))
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 16
    assert engine.seen[0].sampling.max_tokens == 16


def test_echo_and_legacy_logprobs(client):
    echoed = client.completions.create(model=MODEL, prompt="one two", echo=True)
    assert echoed.choices[0].text == "one twoone two "
    scored = client.completions.create(model=MODEL, prompt="one two", logprobs=2)
    logprobs = scored.choices[0].logprobs
    assert logprobs.tokens == ["one ", "two "]
    assert logprobs.token_logprobs == pytest.approx([0.0, -0.1])
    assert logprobs.top_logprobs[1] == pytest.approx({"two ": -0.1, "alt1 ": -1.1})
    assert logprobs.text_offset == [0, 4]
    sampled_only = client.completions.create(model=MODEL, prompt="one", logprobs=0)
    assert sampled_only.choices[0].logprobs.top_logprobs == [{"one ": 0.0}]  # the sampled token is always there


def test_echo_with_logprobs_scores_the_prompt_first(client, engine):
    """OpenAI's legacy shape: the prompt's tokens, the first with null log-probability and alternatives, then the
    completion's, each with its offset in the echoed text."""
    response = client.completions.create(model=MODEL, prompt="one two", echo=True, logprobs=1, max_tokens=2)
    (choice,) = response.choices
    assert choice.text == "one twoone two "
    logprobs = choice.logprobs
    assert logprobs.tokens == ["one", " two", "one ", "two "]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx([-1.1, 0.0, -0.1])
    assert logprobs.top_logprobs[1] == pytest.approx({" two": -1.1})
    assert logprobs.text_offset == [0, 3, 7, 11]
    assert "".join(logprobs.tokens) == choice.text
    assert engine.seen[0].sampling.prompt_logprobs == 1 and engine.seen[0].sampling.logprobs == 1


def test_streamed_echo_with_logprobs_sends_the_prompts_scores_with_it(client):
    stream = client.completions.create(model=MODEL, prompt="a b", echo=True, logprobs=0, stream=True)
    first, *rest = [c.choices[0] for c in stream if c.choices]
    assert first.text == "a ba " and first.logprobs.tokens == ["a", " b", "a "]
    assert first.logprobs.token_logprobs[0] is None and first.logprobs.text_offset == [0, 1, 3]
    assert [c.logprobs.text_offset for c in rest] == [[5]]


def test_logit_bias_and_vllm_extras_reach_the_engine(client, engine):
    client.completions.create(
        model=MODEL,
        prompt="x",
        logit_bias={"42": -100, "7": 2.5},
        extra_body={"min_p": 0.1, "top_k": 20, "repetition_penalty": 1.2},
    )
    sampling = engine.seen[0].sampling
    assert sampling.logit_bias == ((42, -100.0), (7, 2.5))
    assert (sampling.min_p, sampling.top_k, sampling.repetition_penalty) == (0.1, 20, 1.2)
    assert sampling.prompt_logprobs is None  # no echo: the prompt is not scored


def test_a_list_of_prompts_with_n(client, engine):
    response = client.completions.create(model=MODEL, prompt=["a b", "c d e"], n=2, best_of=2, temperature=0.5)
    assert [(c.index, c.text) for c in response.choices] == [(0, "a b "), (1, "a b "), (2, "c d e "), (3, "c d e ")]
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (5, 4 + 6)
    assert sorted(r.prompt for r in engine.seen) == ["a b", "c d e"]
    assert len({r.request_id for r in engine.seen}) == 2


def test_streaming_with_echo_and_usage(client):
    stream = client.completions.create(
        model=MODEL, prompt="one two three", echo=True, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert all(c.object == "text_completion" for c in chunks)
    assert chunks[0].choices[0].text == "one two threeone "  # the prompt comes first
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "one two threeone two three "
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 6


def test_streaming_several_prompts_and_done(http):
    body = {"model": MODEL, "prompt": ["a b c", "d e"], "stream": True, "logprobs": 1}
    with http.stream("POST", "/v1/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    texts: dict[int, str] = {}
    for chunk in chunks:
        (choice,) = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        assert choice["logprobs"]["tokens"] == [choice["text"]]
    assert texts == {0: "a b c ", 1: "d e "}
    assert all("usage" not in c or c["usage"] is None for c in chunks)


def test_keys_and_metrics_are_chats():
    engine = make_engine()
    with TestClient(create_app(engine.config, LocalBackend(engine))) as http:  # its own: fresh counters
        http.headers["Authorization"] = f"Bearer {KEY}"
        _keys_and_metrics(http)


def _keys_and_metrics(http):
    assert (
        http.post("/v1/completions", json={"model": MODEL, "prompt": "x"}, headers={"Authorization": ""}).status_code
        == 401
    )
    assert http.post("/v1/completions", json={"model": MODEL, "prompt": "a b"}).status_code == 200
    text = http.get("/metrics").text
    assert 'mmrag_requests_total{status="200"} 1.0' in text
    assert "mmrag_prompt_tokens_total 2.0" in text and "mmrag_completion_tokens_total 2.0" in text
    assert "mmrag_time_to_first_token_seconds_count 1.0" in text


@pytest.mark.parametrize(
    ("body", "status", "param", "says"),
    [
        ({"suffix": "and so on"}, 400, "suffix", "not supported"),
        ({"logit_bias": {"abc": 1}}, 400, "logit_bias", "token ids"),
        ({"logit_bias": {"-5": 1}}, 400, "logit_bias", "token ids"),
        ({"logit_bias": {"5": 100.5}}, 400, "logit_bias", "outside [-100, 100]"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, 400, "logit_bias", "at most 300"),
        ({"top_k": -2}, 400, "top_k", ""),
        ({"best_of": 2}, 400, "best_of", "must equal n"),
        ({"prompt": [1, 2, 3]}, 400, "prompt", "token-id prompts"),
        ({"prompt": [[1, 2], [3]]}, 400, "prompt", "token-id prompts"),
        ({"prompt": []}, 400, "prompt", "at least one"),
        ({"prompt": ["a", "b", "c", "d"]}, 400, "prompt", "at most 3"),
        ({"prompt": ["a", "x" * 401]}, 400, "prompt", "prompt[1] has 401 characters"),
        ({"prompt": " ".join(["w"] * 70)}, 400, "prompt", "too long"),  # the engine's count: 64 tokens
        ({"prompt": " ".join(["w"] * 70), "stream": True}, 400, "prompt", "too long"),  # before any byte
        ({"logprobs": 6}, 400, "logprobs", ""),
        ({"max_tokens": 0}, 400, "max_tokens", ""),
        ({"max_tokens": 51}, 400, "max_tokens", "at most 50"),
        ({"n": 4, "temperature": 1}, 400, "n", "at most 3"),
        ({"n": 2, "temperature": 0}, 400, "n", "temperature"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
        ({"temperature": 3}, 400, "temperature", ""),
        ({"model": "gpt-3.5-turbo-instruct"}, 404, "model", "does not exist"),
        ({"prompt": "\ud800"}, 400, "prompt", "surrogate"),
    ],
)
def test_refusals_name_the_field(http, engine, body, status, param, says):
    payload = json.dumps({"model": MODEL, "prompt": "one two", **body})  # ASCII: a lone surrogate as its escape
    response = http.post("/v1/completions", content=payload, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"], error
    if param != "prompt" or "too long" not in says:
        assert engine.seen == []  # refused before the engine


def test_one_refused_prompt_closes_the_others(http, engine):
    """A list whose second prompt does not fit: a 400, and the first prompt's generation is closed."""
    body = {"model": MODEL, "prompt": ["slow", " ".join(["w"] * 70)], "stream": True}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    assert engine.running == 0
