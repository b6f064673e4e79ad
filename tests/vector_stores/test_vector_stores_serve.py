"""The whole Serve application (ingress, retriever and LLM deployments, fake engine) over HTTP with the real
`openai` SDK: upload, attach and poll, search, chat with `retrieval.vector_store_ids`. The ingress writes the
upload, the retriever replica (which owns Milvus Lite) reads and indexes it, asking the LLM deployment through
its handle to describe an image file."""

from __future__ import annotations

import openai
import pytest

from tests.files.documents import png_bytes
from tests.vector_stores.conftest import serve_application


@pytest.mark.slow
def test_vector_stores_through_the_serve_application(tmp_path):
    # The echo engine answers a description with the question's words: they reach the indexed text.
    describe = {"poll_after_ms": 50, "image_descriptions": {"questions": ["zanzibar periwinkle"]}}
    with serve_application(tmp_path, "vector-stores-e2e", vector_stores=describe) as (url, config):
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        note = b"The lighthouse on Corrin Point is kept by Odile Marchetti since 2011."
        file = client.files.create(file=("lighthouse.md", note), purpose="assistants")
        store = client.vector_stores.create(name="e2e")
        attached = client.vector_stores.files.create_and_poll(
            file_id=file.id, vector_store_id=store.id, attributes={"topic": "coast"}
        )
        assert attached.status == "completed", attached.last_error
        hits = client.vector_stores.search(
            store.id, query="Who keeps the lighthouse?", filters={"type": "eq", "key": "topic", "value": "coast"}
        ).data
        assert hits[0].file_id == file.id and "Odile" in hits[0].content[0].text
        response = client.chat.completions.create(
            model=config.model.served_name,
            messages=[{"role": "user", "content": "Who keeps the lighthouse on Corrin Point?"}],
            extra_body={"retrieval": {"vector_store_ids": [store.id]}},
        )
        document = response.model_extra["retrieval"]["documents"][0]
        assert (document["file_id"], document["filename"]) == (file.id, "lighthouse.md")
        # An image file, described by the LLM deployment while the retriever replica indexes it: a word only the
        # description has finds it.
        image = client.files.create(file=("IMG_0042.png", png_bytes((8, 8), (200, 30, 30))), purpose="assistants")
        attached = client.vector_stores.files.create_and_poll(file_id=image.id, vector_store_id=store.id)
        assert attached.status == "completed", attached.last_error
        (hit,) = client.vector_stores.search(store.id, query="periwinkle", max_num_results=1).data
        assert hit.file_id == image.id
        assert "Model description: Image 1: zanzibar periwinkle" in hit.content[0].text
        with pytest.raises(openai.NotFoundError) as caught:
            client.vector_stores.search("vs_nope", query="q")
        assert caught.value.body["param"] == "vector_store_id"
