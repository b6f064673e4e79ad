"""Vector stores with two retriever replicas on the Milvus Lite server (as `mmrag serve` runs it), through the
whole Serve application and the real `openai` SDK: the replicas forward the API and the stores' scope of a chat
to the one VectorStores replica, which owns the records and the ingestion jobs (and asks the LLM deployment to
describe image files), and search Milvus themselves. While the Lite server is down, `/health` says so."""

from __future__ import annotations

import os
import signal

import httpx
import openai
import pytest

from mmrag.deployments.app import build_application
from mmrag.serving.config import MmragConfig
from mmrag.serving.retrieval.lite_server import LiteServer
from tests.files.documents import png_bytes
from tests.vector_stores.conftest import serve_application


def test_several_replicas_need_the_lite_server_and_then_get_one_vector_store_replica(tmp_path):
    """The build refuses several replicas on a Lite path opened in-process; on a Lite server (the URI `mmrag
    serve` sets) it adds the VectorStores deployment."""
    two = {"retrieval": {"uri": str(tmp_path / "milvus.db")}, "deployments": {"retriever": {"num_replicas": 2}}}
    with pytest.raises(ValueError, match="one replica"):
        build_application(MmragConfig.model_validate(two))
    shared = MmragConfig.model_validate(two)
    shared.retrieval.lite_server_uri = "http://127.0.0.1:1"
    app = build_application(shared)
    assert _deployment_names(app) == {"OpenAIIngress", "LLMServer", "Retriever", "VectorStores"}
    assert "VectorStores" not in _deployment_names(build_application(MmragConfig()))


def _deployment_names(app) -> set[str]:
    """Every deployment bound into an application: its own and, through its arguments, the rest."""
    from ray.serve import Application

    bound = app._bound_deployment
    inner = [arg for arg in (*bound.init_args, *bound.init_kwargs.values()) if isinstance(arg, Application)]
    return {bound.name}.union(*(_deployment_names(arg) for arg in inner))


@pytest.mark.slow
def test_vector_stores_with_two_retriever_replicas(tmp_path):
    from ray import serve

    with LiteServer(tmp_path / "milvus.db") as lite:
        retrieval = {
            "uri": str(tmp_path / "milvus.db"),
            "lite_server_uri": lite.uri,
            "ingest_demo_corpus": False,
            "default_mode": "none",
        }
        sections = {
            "retrieval": retrieval,
            "deployments": {"retriever": {"num_replicas": 2}},
            # The echo engine answers a description with the question's words.
            "vector_stores": {"poll_after_ms": 50, "image_descriptions": {"questions": ["zanzibar periwinkle"]}},
        }
        with serve_application(tmp_path, "vector-stores-replicas", **sections) as (url, config):
            replicas = serve.status().applications["vector-stores-replicas"].deployments
            assert (replicas["Retriever"].replica_states, replicas["VectorStores"].replica_states) == (
                {"RUNNING": 2},
                {"RUNNING": 1},
            )
            client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
            note = b"The lighthouse on Corrin Point is kept by Odile Marchetti since 2011."
            file = client.files.create(file=("lighthouse.md", note), purpose="assistants")
            # Writes land on either replica; each must reach the one owner (a replica owning nothing would 503).
            stores = [client.vector_stores.create(name=f"s{i}") for i in range(6)]
            attached = client.vector_stores.files.create_and_poll(file_id=file.id, vector_store_id=stores[0].id)
            assert attached.status == "completed", attached.last_error
            for _ in range(4):
                hits = client.vector_stores.search(stores[0].id, query="Who keeps the lighthouse?").data
                assert hits[0].file_id == file.id and "Odile" in hits[0].content[0].text
                response = client.chat.completions.create(
                    model=config.model.served_name,
                    messages=[{"role": "user", "content": "Who keeps the lighthouse on Corrin Point?"}],
                    extra_body={"retrieval": {"vector_store_ids": [stores[0].id]}},
                )
                assert response.model_extra["retrieval"]["documents"][0]["file_id"] == file.id
            with pytest.raises(openai.NotFoundError) as caught:  # the owner's 404, passed through two hops
                client.chat.completions.create(
                    model=config.model.served_name,
                    messages=[{"role": "user", "content": "q"}],
                    extra_body={"retrieval": {"vector_store_ids": ["vs_nope"]}},
                )
            assert caught.value.body["param"] == "retrieval.vector_store_ids"
            assert {s.id for s in client.vector_stores.list(limit=100).data} == {s.id for s in stores}
            # An image file, described by the LLM deployment for the VectorStores replica.
            image = client.files.create(file=("IMG_0042.png", png_bytes((8, 8))), purpose="assistants")
            attached = client.vector_stores.files.create_and_poll(file_id=image.id, vector_store_id=stores[1].id)
            assert attached.status == "completed", attached.last_error
            (hit,) = client.vector_stores.search(stores[1].id, query="periwinkle", max_num_results=1).data
            assert hit.file_id == image.id and "zanzibar periwinkle" in hit.content[0].text
            # The Lite server dies: /health names retrieval until it is back (what `mmrag serve` does), then
            # the replicas search it again.
            root = url.removesuffix("/v1")
            assert httpx.get(f"{root}/health", timeout=30).status_code == 200
            os.kill(lite.pid, signal.SIGKILL)
            lite.process.wait()
            down = httpx.get(f"{root}/health", timeout=30)
            assert down.status_code == 503 and "retrieval: the Milvus Lite server" in down.json()["error"]["message"]
            assert lite.ensure_running(max_restarts=1)
            assert httpx.get(f"{root}/health", timeout=30).status_code == 200
            hits = client.vector_stores.search(stores[0].id, query="Who keeps the lighthouse?").data
            assert hits[0].file_id == file.id
