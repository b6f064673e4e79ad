"""Structured outputs, vLLM's sampling extras and OpenAI's other chat fields over the real app and a fake engine.

The fake engine echoes the last user text, so a test sends the JSON it wants back; what the engine was asked
to constrain (``SamplingOptions.structured``) is read from ``engine.seen``.
"""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel

from mmrag.serving.engine.protocol import StructuredOutput
from tests.server.fake_app import MODEL, app_fixtures, assert_error, chat

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"],
    "additionalProperties": False,
}

served, engine, http, client = app_fixtures(
    {"retrieval": {"default_mode": "none"}, "limits": {"max_schema_bytes": 2048, "max_tools": 4}}
)


class Trip(BaseModel):
    city: str
    days: int


def test_parse_with_a_pydantic_model_constrains_to_its_schema(client, engine):
    completion = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": '{"city": "Paris", "days": 3}'}], response_format=Trip
    )
    assert completion.choices[0].message.parsed == Trip(city="Paris", days=3)
    structured = engine.seen[0].sampling.structured
    assert structured.kind == "json" and structured.param == "response_format.json_schema.schema"
    assert json.loads(structured.spec) == Trip.model_json_schema() | {"additionalProperties": False}


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        ({"type": "text"}, None),
        ({"type": "json_object"}, StructuredOutput(kind="json_object", param="response_format")),
        (
            {"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA, "strict": True}},
            StructuredOutput(
                kind="json", spec=json.dumps(SCHEMA, separators=(",", ":")), param="response_format.json_schema.schema"
            ),
        ),
        # OpenAI's schema is optional: any JSON object then.
        ({"type": "json_schema", "json_schema": {"name": "any"}}, StructuredOutput(kind="json_object")),
    ],
)
def test_response_formats_reach_the_engine(http, engine, response_format, expected):
    response = http.post("/v1/chat/completions", json=chat(response_format=response_format))
    assert response.status_code == 200, response.text
    assert engine.seen[0].sampling.structured == expected


def test_streamed_json_arrives_in_pieces(client, engine):
    text = '{"city": "Oslo", "days": 2}'
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": text}],
        response_format={"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA}},
        stream=True,
    )
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and json.loads("".join(pieces)) == {"city": "Oslo", "days": 2}
    assert engine.seen[0].sampling.structured.kind == "json"


@pytest.mark.parametrize(
    ("response_format", "param", "fragment"),
    [
        (
            {"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "objekt"}}},
            "response_format.json_schema.schema",
            "not a valid JSON schema at type",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "t", "schema": {"properties": {"a": {"minimum": "x"}}}}},
            "response_format.json_schema.schema",
            "not a valid JSON schema at properties/a/minimum",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "t", "schema": {"enum": ["x" * 3000]}}},
            "response_format.json_schema.schema",
            "limits.max_schema_bytes",
        ),
        ({"type": "json_schema", "json_schema": {"name": "bad name", "schema": SCHEMA}}, "response_format", "pattern"),
        ({"type": "json_schema"}, "response_format.json_schema", "required"),
        ({"type": "yaml"}, "response_format", ""),
    ],
)
def test_bad_response_formats_are_400s_before_generation(http, engine, response_format, param, fragment):
    response = http.post("/v1/chat/completions", json=chat(response_format=response_format))
    if param == "response_format" and fragment == "pattern":
        param = "response_format.json_schema.name"
    assert_error(response, param, fragment)
    assert engine.seen == []


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"regex": "[0-9]{3}"}, StructuredOutput(kind="regex", spec="[0-9]{3}", param="structured_outputs.regex")),
        (
            {"choice": ["yes", "no"]},
            StructuredOutput(kind="choice", choices=("yes", "no"), param="structured_outputs.choice"),
        ),
        (
            {"json": SCHEMA},
            StructuredOutput(
                kind="json", spec=json.dumps(SCHEMA, separators=(",", ":")), param="structured_outputs.json"
            ),
        ),
    ],
)
def test_vllm_structured_outputs_extra(http, engine, extra, expected):
    response = http.post("/v1/chat/completions", json=chat(structured_outputs=extra))
    assert response.status_code == 200, response.text
    assert engine.seen[0].sampling.structured == expected


def test_structured_outputs_extra_takes_one_constraint_and_not_with_response_format(http, engine):
    both = {"regex": "a", "choice": ["a"]}
    assert_error(http.post("/v1/chat/completions", json=chat(structured_outputs=both)), "structured_outputs")
    with_format = chat(structured_outputs={"regex": "a"}, response_format={"type": "json_object"})
    assert_error(http.post("/v1/chat/completions", json=with_format), "structured_outputs", "not both")
    assert engine.seen == []


def test_sampling_extras_reach_the_engine(http, engine):
    body = chat(logit_bias={"42": -100, "7": 2.5}, min_p=0.1, top_k=20, repetition_penalty=1.2)
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    sampling = engine.seen[0].sampling
    assert sampling.logit_bias == ((42, -100.0), (7, 2.5))
    assert (sampling.min_p, sampling.top_k, sampling.repetition_penalty) == (0.1, 20, 1.2)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"-5": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"min_p": 1.5}, "min_p"),
        ({"top_k": -2}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
    ],
)
def test_bad_sampling_extras_are_400s(http, engine, extra, param):
    assert_error(http.post("/v1/chat/completions", json=chat(**extra)), param)
    assert engine.seen == []


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"verbosity": "low"}, "verbosity"),
        ({"web_search_options": {"search_context_size": "low"}}, "web_search_options"),
        ({"moderation": {"model": "omni-moderation-latest"}}, "moderation"),
        ({"store": True}, "store"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata"),
        ({"user": "u" * 513}, "user"),
        ({"service_tier": "gold"}, "service_tier"),
    ],
)
def test_openai_fields_not_implemented_are_400s_naming_them(http, engine, extra, param):
    assert_error(http.post("/v1/chat/completions", json=chat(**extra)), param)
    assert engine.seen == []


def test_openai_fields_that_ask_for_nothing_visible_are_accepted(client, engine):
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "one two"}],
        user="u-1",
        safety_identifier="s-1",
        metadata={"team": "rag"},
        service_tier="auto",
        store=False,
        modalities=["text"],
        prediction={"type": "content", "content": "one two"},
        prompt_cache_key="k",
    )
    assert response.choices[0].message.content == "one two "
    assert engine.seen[0].sampling.structured is None
