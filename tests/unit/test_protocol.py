import json

import pytest

from mmrag.serving.config import LimitsConfig
from mmrag.serving.errors import InvalidRequestError, OverloadedError
from mmrag.serving.openai.protocol import ChatCompletionRequest
from mmrag.serving.pipeline import parse_chat_body


def parse(payload) -> ChatCompletionRequest:
    import json

    return parse_chat_body(json.dumps(payload).encode())


def user(content):
    return {"model": "m", "messages": [{"role": "user", "content": content}]}


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m"}, "messages"),
        ({**user("hi"), "max_tokens": -1}, "max_tokens"),
        ({**user("hi"), "max_completion_tokens": 0}, "max_completion_tokens"),
        ({**user("hi"), "temperature": 3}, "temperature"),
        ({**user("hi"), "top_p": 0}, "top_p"),
        ({**user("hi"), "n": 0}, "n"),
        ({**user("hi"), "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({**user("hi"), "top_logprobs": 2}, "top_logprobs"),
        ({**user("hi"), "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({**user("hi"), "stream": "yes please"}, "stream"),
        (user(5), "messages[0].content"),
        (user([{"type": "audio_url", "audio_url": {"url": "x"}}]), "messages[0].content[0]"),
        (user([{"type": "image_url", "image_url": {"url": ""}}]), "messages[0].content[0].image_url.url"),
        (user([{"type": "text"}]), "messages[0].content[0].text"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ],
)
def test_invalid_fields_are_named(payload, param):
    with pytest.raises(InvalidRequestError) as info:
        parse(payload)
    assert info.value.param == param
    assert info.value.status_code == 400


def test_malformed_json_and_non_object():
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        parse_chat_body(b"{not json")
    with pytest.raises(InvalidRequestError, match="JSON object"):
        parse_chat_body(b"[1, 2]")


def test_images_only_in_user_messages():
    payload = {
        "model": "m",
        "messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]}],
    }
    with pytest.raises(InvalidRequestError, match="only accepted in user messages"):
        parse(payload)


def test_completion_limit_prefers_max_completion_tokens():
    request = parse({**user("hi"), "max_tokens": 5, "max_completion_tokens": 7, "stop": "x"})
    assert request.completion_limit == 7
    assert request.stop == ["x"]


def test_errors_survive_pickling_with_their_fields():
    import pickle

    error = pickle.loads(pickle.dumps(OverloadedError("busy", retry_after_s=3)))
    assert error.to_dict()["error"]["type"] == "server_overloaded"
    assert error.headers == {"Retry-After": "3"}


def test_content_parts_are_capped_before_validation():
    text = {"type": "text", "text": "x"}
    payload = {"model": "m", "messages": [{"role": "user", "content": [text] * 2}] * 2}
    assert len(parse(payload).messages) == 2
    body = json.dumps(payload).encode()
    with pytest.raises(InvalidRequestError, match="4 content parts in all; at most 3") as info:
        parse_chat_body(body, LimitsConfig(max_content_parts=3))
    assert info.value.param == "messages"
    # The default cap: 1025 parts (an invalid one among them) are refused by count, not validated one by one.
    with pytest.raises(InvalidRequestError, match="content parts") as info:
        parse(user([text] * 1024 + [{"type": "bogus"}]))
    assert info.value.param == "messages"


def test_message_count_is_capped_before_validation():
    body = b'{"model": "m", "messages": [' + b",".join([b'{"role": "user", "content": "x"}'] * 5) + b"]}"
    with pytest.raises(InvalidRequestError, match="5 messages; at most 4") as info:
        parse_chat_body(body, LimitsConfig(max_messages=4))
    assert info.value.param == "messages"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"verbosity": "low"}, "verbosity"),
    ],
)
def test_unimplemented_openai_fields_are_a_400_naming_them(extra, param):
    with pytest.raises(InvalidRequestError) as info:
        parse({**user("hi"), **extra})
    assert info.value.param == param
    assert f"`{param}` is not supported by this server" in info.value.message


def test_unimplemented_message_fields_are_a_400_naming_them():
    call = {"name": "f", "arguments": "{}"}
    payload = {"model": "m", "messages": [{"role": "assistant", "content": None, "function_call": call}]}
    with pytest.raises(InvalidRequestError) as info:
        parse(payload)
    assert info.value.param == "messages[0].function_call"


def test_fields_that_ask_for_nothing_unsupported_are_accepted():
    # OpenAI clients send user/metadata; some send unset fields as null or empty, or the default format.
    extra = {"user": "u", "metadata": {"k": "v"}, "tools": None, "logit_bias": {}, "response_format": {"type": "text"}}
    extra |= {"functions": [], "audio": None, "modalities": ["text"]}
    assert parse({**user("hi"), **extra}).messages[0].content == "hi"
