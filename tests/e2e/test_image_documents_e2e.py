"""Images as documents on the real stack (`mmrag serve`, tiny random LLaVA, Milvus Lite): an image file a
chat request's vector-store search retrieves reaches vLLM as one more image, whose visual tokens the usage
counts (and AIM merges, as it does the request's own image)."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from tests.files.documents import png_bytes

pytestmark = pytest.mark.e2e

MODEL = "mmrag-tiny-llava"
IMAGE_TOKENS = 16  # the tiny LLaVA's visual tokens per image


def own_image_chat(text: str) -> list[dict]:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (20, 40, 220)).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}
    ]


def test_a_retrieved_image_adds_one_image_of_visual_tokens(client):
    store = client.vector_stores.create(name="e2e-image-documents")
    try:
        uploaded = client.files.create(
            file=("red-square.png", png_bytes((64, 64), (220, 20, 20))), purpose="assistants"
        )
        attached = client.vector_stores.files.create_and_poll(file_id=uploaded.id, vector_store_id=store.id)
        assert attached.status == "completed", attached.last_error
        messages = own_image_chat("Is there a red square?")
        kwargs = {"model": MODEL, "messages": messages, "max_tokens": 2, "temperature": 0}
        plain = client.chat.completions.create(**kwargs)
        retrieval = {"retrieval": {"vector_store_ids": [store.id], "top_k": 1}}
        grounded = client.chat.completions.create(**kwargs, extra_body=retrieval)
        info = grounded.model_extra["retrieval"]
        (document,) = info["documents"]
        assert (document["file_id"], document["kind"], document["image_dropped"]) == (uploaded.id, "image", None)
        assert info["context_images"] == 1
        assert plain.usage.model_extra["mmrag"]["visual_tokens_before"] == IMAGE_TOKENS
        assert grounded.usage.model_extra["mmrag"]["visual_tokens_before"] == 2 * IMAGE_TOKENS
        assert grounded.usage.prompt_tokens >= plain.usage.prompt_tokens + IMAGE_TOKENS  # + the caption's text
        # AIM merges the retrieved image's tokens as it does the request's own.
        merged = client.chat.completions.create(
            **kwargs, extra_body={**retrieval, "compression": {"aim_keep_ratio": 0.5}}
        )
        assert merged.usage.model_extra["mmrag"]["visual_tokens_after"] == IMAGE_TOKENS  # 8 + 8
    finally:
        client.vector_stores.delete(store.id)
