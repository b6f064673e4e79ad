"""The ``compression`` chat extension and the ``usage.mmrag`` report, over a fake engine (no vLLM)."""

from __future__ import annotations

import base64
import io
from dataclasses import replace

import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from mmrag.serving.config import MmragConfig
from mmrag.serving.engine.protocol import CompressionCounts
from mmrag.serving.openai.server import create_app
from mmrag.serving.pipeline import LocalBackend
from tests.fake_engine import FakeEngine

MODEL = "smol"  # the default config's served name (a fake engine)


class MergingEngine(FakeEngine):
    """The fake engine, reporting 16 visual tokens per image merged at the request's ratio, in a prompt of
    10 text tokens whose KV cache keeps the text and half the image entries unless the request keeps it all."""

    async def generate(self, request):
        after = int(16 * request.compression.aim_keep_ratio) * len(request.images)
        kept = 10 + after if request.compression.kv is None else 10 + after // 2
        counts = CompressionCounts(
            visual_before=16 * len(request.images), visual_after=after, kv_prompt=10 + after, kv_kept=kept
        )
        async for delta in super().generate(request):
            yield replace(delta, compression=counts if request.images else None)


@pytest.fixture
def engine():
    config = {"compression": {"aim_keep_ratio": 0.5, "lookm": {"enabled": True, "image_budget": 0.5}}}
    return MergingEngine(MmragConfig.model_validate({"retrieval": {"default_mode": "none"}, **config}))


@pytest.fixture
def client(engine):
    with TestClient(create_app(engine.config, LocalBackend(engine))) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


_USAGE_AT_HALF = {"visual_tokens_before": 16, "visual_tokens_after": 8, "kv_tokens_prompt": 18, "kv_tokens_kept": 14}


def _image_messages() -> list[dict]:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}
    ]


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, "half", None])
def test_invalid_ratio_is_a_400_naming_the_field(client, bad) -> None:
    compression = {"aim_keep_ratio": bad} if bad is not None else {"aim_keep_ratio": 0.5, "other": 1}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=_image_messages(), extra_body={"compression": compression})
    expected = "compression.aim_keep_ratio" if bad is not None else "compression.other"
    assert info.value.body["param"] == expected


def test_ratio_reaches_the_engine_and_usage_reports_the_merge(client, engine) -> None:
    out = client.chat.completions.create(
        model=MODEL, messages=_image_messages(), extra_body={"compression": {"aim_keep_ratio": 0.25}}
    )
    assert engine.seen[-1].compression.aim_keep_ratio == 0.25
    assert out.usage.model_extra["mmrag"] == {
        "visual_tokens_before": 16,
        "visual_tokens_after": 4,
        "kv_tokens_prompt": 14,
        "kv_tokens_kept": 12,
    }

    out = client.chat.completions.create(model=MODEL, messages=_image_messages())
    assert engine.seen[-1].compression.aim_keep_ratio == 0.5  # the deployment default, resolved once
    assert out.usage.model_extra["mmrag"] == _USAGE_AT_HALF


def test_lookm_opt_out_reaches_the_engine(client, engine) -> None:
    out = client.chat.completions.create(
        model=MODEL, messages=_image_messages(), extra_body={"compression": {"lookm": False}}
    )
    assert engine.seen[-1].compression.kv is None
    assert out.usage.model_extra["mmrag"]["kv_tokens_kept"] == out.usage.model_extra["mmrag"]["kv_tokens_prompt"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=_image_messages(), extra_body={"compression": {"lookm": "sometimes"}}
        )
    assert info.value.body["param"] == "compression.lookm"


def test_kv_method_is_parsed_once_and_reaches_the_engine(client, engine) -> None:
    from mmrag.kernels.methods.lookm import LookM
    from mmrag.kernels.methods.random_eviction import RandomEviction

    client.chat.completions.create(model=MODEL, messages=_image_messages())
    assert engine.seen[-1].compression.kv == LookM(image_budget=0.5)  # the deployment's method
    kv = {"method": "random", "image_budget": 0.25, "seed": 3}
    client.chat.completions.create(model=MODEL, messages=_image_messages(), extra_body={"compression": {"kv": kv}})
    assert engine.seen[-1].compression.kv == RandomEviction(image_budget=0.25, seed=3)
    out = client.chat.completions.create(
        model=MODEL, messages=_image_messages(), extra_body={"compression": {"kv": {"method": "none"}}}
    )
    assert engine.seen[-1].compression.kv is None
    assert out.usage.model_extra["mmrag"]["kv_tokens_kept"] == out.usage.model_extra["mmrag"]["kv_tokens_prompt"]


@pytest.mark.parametrize(
    ("kv", "named"),
    [
        ({"method": "sideways"}, "sideways"),
        ({"method": "random", "image_budget": 2}, "image_budget"),
        ({"method": "recent", "window": 3}, "window"),
        ({"method": "lookm", "merge": "blend"}, "merge"),
        ({"image_budget": 0.5}, "method"),
    ],
)
def test_bad_kv_method_is_a_400_naming_the_field(client, kv, named) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=_image_messages(), extra_body={"compression": {"kv": kv}})
    assert info.value.body["param"] == "compression.kv" and named in info.value.body["message"]


def test_streamed_usage_carries_the_extension(client) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=_image_messages(), stream=True, stream_options={"include_usage": True}
    )
    usages = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert usages[-1].model_extra["mmrag"] == _USAGE_AT_HALF


def test_text_only_usage_has_no_extension(client) -> None:
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}])
    assert out.usage.model_extra.get("mmrag") is None


@pytest.mark.parametrize("ratio", [0, 1.01, -1])
def test_config_rejects_invalid_default(ratio) -> None:
    with pytest.raises(ValueError, match="aim_keep_ratio"):
        MmragConfig.model_validate({"compression": {"aim_keep_ratio": ratio}})
