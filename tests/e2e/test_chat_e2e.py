"""The real app end to end: `mmrag serve` -> Ray Serve -> vLLM (tiny LLaVA), through the `openai` client."""

from __future__ import annotations

import base64
import io
import math
import time

import httpx
import openai
import pytest
from PIL import Image

pytestmark = pytest.mark.e2e

MODEL = "mmrag-tiny-llava"


def png_url(colour=(200, 30, 30), size=(64, 48)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_chat(text="What colour is this?", images=1):
    parts = [{"type": "image_url", "image_url": {"url": png_url()}} for _ in range(images)]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_chat_with_image(client):
    response = client.chat.completions.create(model=MODEL, messages=image_chat(), max_tokens=6, temperature=0)
    choice = response.choices[0]
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 6
    # 16 visual tokens for the image, plus the rendered text
    assert response.usage.prompt_tokens > 16
    assert response.usage.total_tokens == response.usage.prompt_tokens + 6


def test_streaming_matches_non_streaming_greedy(client):
    messages = image_chat(images=2)
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_greedy_logprobs(client):
    response = client.chat.completions.create(
        model=MODEL, messages=image_chat(), max_tokens=6, temperature=0, logprobs=True, top_logprobs=5
    )
    tokens = response.choices[0].logprobs.content
    assert len(tokens) == response.usage.completion_tokens == 6
    for token in tokens:
        ranked = [t.logprob for t in token.top_logprobs]
        assert len(ranked) == 5 and ranked == sorted(ranked, reverse=True)
        assert sum(math.exp(lp) for lp in ranked) <= 1 + 1e-3
        # greedy: the chosen token is the most likely one
        assert token.logprob == pytest.approx(ranked[0], abs=1e-4)


def test_n_choices_with_seed(client):
    kwargs = {"model": MODEL, "messages": image_chat(), "max_tokens": 5, "temperature": 1.0, "n": 2, "seed": 7}
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert len(first.choices) == 2 and first.usage.completion_tokens == 10
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]


def test_models_health_metrics(client, server_url):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(f"{server_url}/health").status_code == 200
    text = httpx.get(f"{server_url}/metrics").text
    assert metric(text, "mmrag_requests_total", status="200") >= 1
    assert "mmrag_time_to_first_token_seconds_bucket" in text
    assert "vllm:num_requests_running" in text  # the engine's own metrics


@pytest.mark.parametrize(
    ("kwargs", "status", "param"),
    [
        ({"model": "gpt-unknown"}, 404, "model"),
        ({"messages": []}, 400, "messages"),
        ({"messages": image_chat(images=5)}, 400, "messages"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}],
                    }
                ]
            },
            400,
            "messages[0].content[0].image_url.url",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}],
                    }
                ]
            },
            400,
            "messages[0].content[0].image_url.url",
        ),
        ({"messages": [{"role": "user", "content": 7}]}, 400, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "x" * 1100}]}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "look: <image>"}]}, 400, "messages[0].content"),
    ],
)
def test_bad_input_is_a_clean_error(client, kwargs, status, param):
    body = {"model": MODEL, "messages": image_chat(), "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**body)
    assert info.value.status_code == status
    assert info.value.body["param"] == param
    assert info.value.body["message"]


def test_server_keeps_serving_after_errors(client):
    for _ in range(3):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 1100}])
    response = client.chat.completions.create(model=MODEL, messages=image_chat(), max_tokens=3)
    assert response.usage.completion_tokens == 3


def test_client_disconnect_aborts_generation(client, server_url):
    """A client that hangs up mid-stream frees the engine: the request stops generating at once."""

    def engine(name: str) -> float:
        return metric(httpx.get(f"{server_url}/metrics").text, name)

    def settled(name: str) -> float:
        """vLLM publishes stats asynchronously: read until two reads a second apart agree."""
        value, previous = engine(name), None
        while value != previous:
            time.sleep(1)
            value, previous = engine(name), value
        return value

    messages = [{"role": "user", "content": "Tell me a long story."}]
    # Control: greedy decoding of this prompt runs the full 900 tokens (no early EOS). 7 s alone, but it passed
    # the client's 120 s beside a second vLLM engine on 2 cores: its own bound is the server's request timeout.
    control = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=900, temperature=0, timeout=600)
    assert control.usage.completion_tokens == 900

    before = settled("vllm:generation_tokens_total")
    body = {"model": MODEL, "messages": messages, "max_tokens": 900, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server_url}/v1/chat/completions", json=body, timeout=60) as response:
        received = 0
        for line in response.iter_lines():
            received += line.startswith("data: {")
            if received >= 3:
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and engine("vllm:num_requests_running") > 0:
        time.sleep(0.5)
    time.sleep(2)  # a request that was not aborted would keep adding tokens now
    assert engine("vllm:num_requests_running") == 0
    generated = settled("vllm:generation_tokens_total") - before
    # Any abort shows as fewer tokens than the control; how many fewer depends on the machine's load.
    assert 3 <= generated < 900, f"generated {generated} of 900 tokens: the request ran to completion"


def test_text_rag_grounds_on_the_demo_corpus(client):
    """The default server ingests its demo corpus; text mode retrieves the matching document."""
    question = "How long is the main span of the Kessel Span suspension bridge over the river Ambrel?"
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=2, temperature=0
    )
    grounded = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        max_tokens=2,
        temperature=0,
        extra_body={"retrieval": {"mode": "text", "top_k": 3}},
    )
    info = grounded.model_extra["retrieval"]
    assert info["mode"] == "text" and not info["degraded"]
    assert info["documents"][0]["source"].endswith("kessel-bridge.md")
    assert info["context_documents"] >= 1
    # the retrieved text really entered the prompt
    assert grounded.usage.prompt_tokens > plain.usage.prompt_tokens + 100
    assert plain.model_extra.get("retrieval") is None


def test_a_new_image_with_text_rag_is_answered_on_first_sight(client):
    """Regression: the prompt was rendered twice when documents were retrieved; the first rendering put a new
    image in vLLM's frontend cache, the second sent only its hash, and the engine core, which had never seen
    it, answered ``finish_reason: "error"`` with no tokens (HTTP 200). One rendering per request now."""
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": png_url(colour=(17, 171, 91), size=(70, 50))}},
                {"type": "text", "text": "How long is the Kessel Span?"},
            ],
        }
    ]
    response = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=4,
        temperature=0,
        extra_body={"retrieval": {"mode": "text", "top_k": 2}, "compression": {"aim_keep_ratio": 0.5}},
    )
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 4
    assert response.model_extra["retrieval"]["context_documents"] >= 1
    assert response.usage.model_extra["mmrag"]["visual_tokens_after"] == 8


def test_retrieval_errors_name_the_field(client):
    messages = [{"role": "user", "content": "anything"}]
    for retrieval, param in [
        ({"mode": "xrag"}, "retrieval.mode"),
        ({"mode": "text", "filter": "source like"}, "retrieval.filter"),
        ({"mode": "text", "top_k": 10_000}, "retrieval.top_k"),
    ]:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=2, extra_body={"retrieval": retrieval}
            )
        assert info.value.body["param"] == param, info.value.body
