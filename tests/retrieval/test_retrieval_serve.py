"""The retriever as a real Ray Serve deployment: results and typed errors cross the handle."""

from __future__ import annotations

import pytest

from mmrag.serving.config import MmragConfig
from mmrag.serving.retrieval.errors import InvalidFilterError, RetrievalError, UnsupportedModeError


@pytest.mark.slow
def test_retriever_deployment_through_a_serve_handle(tmp_path):
    ray = pytest.importorskip("ray")
    from ray import serve

    from mmrag.deployments.retriever import RetrieverServer, retriever_options

    config = MmragConfig.model_validate({"retrieval": {"uri": str(tmp_path / "serve.db")}})
    own_ray = not ray.is_initialized()  # another test module may hold a Ray session: share it then
    if own_ray:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        app = RetrieverServer.options(**retriever_options(config)).bind(config.model_dump())
        handle = serve.run(app, name="retrieval-test", route_prefix=None)
        result = handle.retrieve.remote({"mode": "text", "top_k": 3}, "When is the Lantern Tide festival?").result()
        assert result.info.documents[0].source == "demo_corpus/vellmora-festival.md"
        assert len(result.chunks) == 3
        for options, error_type, field in [
            ({"mode": "xrag"}, UnsupportedModeError, "retrieval.mode"),
            ({"mode": "text", "filter": "nosuch == 1"}, InvalidFilterError, "retrieval.filter"),
        ]:
            with pytest.raises(RetrievalError) as caught:
                handle.retrieve.remote(options, "q").result()
            assert isinstance(caught.value, error_type)
            assert (caught.value.status_code, caught.value.field) == (400, field)
    finally:
        if own_ray:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete("retrieval-test")
