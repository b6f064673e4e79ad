"""The whole Serve application (ingress, retriever and LLM deployments, fake engine) over HTTP with the real
`openai` SDK: upload, attach and poll, search, chat with `retrieval.vector_store_ids`. The ingress writes the
upload, the retriever replica (which owns Milvus Lite) reads and indexes it."""

from __future__ import annotations

import socket
from pathlib import Path

import openai
import pytest

from mmrag.serving.config import MmragConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_vector_stores_through_the_serve_application(tmp_path):
    ray = pytest.importorskip("ray")
    from ray import serve

    from mmrag.deployments.app import build_application

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = MmragConfig.model_validate(
        {
            "retrieval": {"uri": str(tmp_path / "milvus.db"), "ingest_demo_corpus": False, "default_mode": "none"},
            "files": {"directory": str(tmp_path / "files")},
            "vector_stores": {"poll_after_ms": 50},
        }
    )
    own_ray = not ray.is_initialized()
    if own_ray:
        env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_application(config, engine_cls="tests.batch.engines:RetrievalEchoEngine")
        serve.run(app, name="vector-stores-e2e", route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
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
        with pytest.raises(openai.NotFoundError) as caught:
            client.vector_stores.search("vs_nope", query="q")
        assert caught.value.body["param"] == "vector_store_id"
    finally:
        if own_ray:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete("vector-stores-e2e")
