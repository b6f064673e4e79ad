"""AIM compression through the real server: the default deployment (ratio 1) and per-request ratios."""

from __future__ import annotations

import base64
import io

import openai
import pytest
from PIL import Image

pytestmark = pytest.mark.e2e

MODEL = "mmrag-tiny-llava"
FULL = 16  # visual tokens per image of the tiny LLaVA


def _noise_url(seed: int) -> str:
    import numpy as np

    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat(client, ratio: float | None, images: int = 2):
    parts = [{"type": "image_url", "image_url": {"url": _noise_url(seed)}} for seed in range(images)]
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": "What is shown?"}]}]
    extra = {"compression": {"aim_keep_ratio": ratio}} if ratio is not None else None
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, extra_body=extra)


def _usage(response, before: int, after: int) -> dict[str, int]:
    """What ``usage.mmrag`` must say on this server: no LOOK-M, so the KV cache keeps the whole prompt."""
    prompt = response.usage.prompt_tokens
    return {
        "visual_tokens_before": before,
        "visual_tokens_after": after,
        "kv_tokens_prompt": prompt,
        "kv_tokens_kept": prompt,
    }


def test_usage_reports_visual_tokens_before_and_after_merging(client):
    default = _chat(client, None)
    assert default.usage.model_extra["mmrag"] == _usage(default, 2 * FULL, 2 * FULL)
    explicit_one = _chat(client, 1.0)
    assert explicit_one.choices[0].message.content == default.choices[0].message.content  # ratio 1: stock model
    for ratio, kept in ((0.5, 8), (0.25, 4)):
        merged = _chat(client, ratio)
        assert merged.usage.model_extra["mmrag"] == _usage(merged, 2 * FULL, 2 * kept)
        assert merged.usage.prompt_tokens == default.usage.prompt_tokens - 2 * (FULL - kept)
        assert merged.usage.completion_tokens == 6


def test_invalid_ratio_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, 2.0)
    assert info.value.body["param"] == "compression.aim_keep_ratio"


def _counter(server_url: str, name: str) -> float:
    import httpx

    text = httpx.get(f"{server_url}/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name}_total "))


def test_metrics_count_visual_tokens_before_and_after_merging(client, server_url):
    names = ("mmrag_visual_tokens_before_merge", "mmrag_visual_tokens_after_merge")
    start = [_counter(server_url, n) for n in names]
    _chat(client, 0.25)
    stream = client.chat.completions.create(  # streaming takes the other path to the counters
        model=MODEL,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _noise_url(9)}}]}],
        max_tokens=2,
        stream=True,
        extra_body={"compression": {"aim_keep_ratio": 0.5}},
    )
    assert [chunk for chunk in stream]
    before, after = (_counter(server_url, n) - s for n, s in zip(names, start, strict=True))
    assert (before, after) == (3 * FULL, 2 * 4 + 8)
