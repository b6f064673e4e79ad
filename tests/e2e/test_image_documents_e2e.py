"""Images as documents on the real stack (`mmrag serve`, tiny random LLaVA, Milvus Lite): an image file a
chat request's vector-store search retrieves reaches vLLM as one more image, whose visual tokens the usage
counts (and AIM merges, as it does the request's own image). And on the default server (smol): the served
model's own description of an image file, asked at ingestion, is what indexes it beside its name."""

from __future__ import annotations

import base64
import io
import random

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


def shapes_png(colour: str, shape: str, seed: int) -> bytes:
    """One of the synthetic shapes images the default model's projector was trained on (32 px)."""
    from mmrag.training.tasks.render import ShapeImage, render

    buf = io.BytesIO()
    Image.fromarray(render(ShapeImage(colour, shape), random.Random(seed), 32)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_the_default_model_describes_image_files_and_search_finds_them_by_it(default_client):
    """Names that say nothing ("scan-1.png"): only smol's description (its answers to the colour and shape
    questions, greedy) tells the two apart. By hand it named 12 of 12 colours and shapes of such images."""
    client = default_client
    store = client.vector_stores.create(name="e2e-described-images")
    try:
        files = {}
        for name, (colour, shape) in {"scan-1.png": ("red", "circle"), "scan-2.png": ("blue", "square")}.items():
            uploaded = client.files.create(file=(name, shapes_png(colour, shape, 7)), purpose="assistants")
            attached = client.vector_stores.files.create_and_poll(file_id=uploaded.id, vector_store_id=store.id)
            assert attached.status == "completed", attached.last_error
            files[(colour, shape)] = uploaded.id
        for (colour, shape), file_id in files.items():
            (content,) = client.vector_stores.files.content(file_id=file_id, vector_store_id=store.id).data
            described = [line for line in content.text.splitlines() if line.startswith("Model description: ")]
            assert described == [f"Model description: {colour} {shape}"], content.text
            hits = client.vector_stores.search(store.id, query=f"a {colour} {shape}", max_num_results=2).data
            assert hits[0].file_id == file_id, [(h.filename, h.score) for h in hits]
    finally:
        client.vector_stores.delete(store.id)
