"""``--ray``: the same lines through Ray Data actor pools on a local Ray give the same output."""

from __future__ import annotations

import os
import shutil

import pytest

from mmrag.serving.batch.job import BatchOptions, run_batch
from tests.batch.conftest import REPO, batch_config, by_custom_id, chat_line, read_jsonl, write_jsonl

ENGINE = "tests.batch.engines:StartLoggingEngine"


@pytest.mark.slow
def test_ray_data_path_matches_local(tmp_path, monkeypatch):
    # Ray's workers inherit this process's environment: they can import tests.fake_engine.
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("MMRAG_TEST_ENGINE_DIR", str(tmp_path / "engines"))
    config = batch_config(
        {
            "server": {"ray_num_cpus": 2},
            "retrieval": {"ingest_demo_corpus": False, "uri": str(tmp_path / "milvus.db")},
            "deployments": {"llm": {"num_replicas": 2}},
        }
    )
    lines = [chat_line(f"q{i:02d}", f"alpha beta {i}", max_tokens=2) for i in range(23)]
    lines += ["{broken", chat_line("bad-n", "x", n=99), chat_line("long", " ".join(["w"] * 3000))]
    source = write_jsonl(tmp_path / "in.jsonl", lines)

    outputs = {}
    for mode in ("local", "ray"):
        outputs[mode] = tmp_path / f"{mode}.jsonl"
        options = BatchOptions(concurrency=5, use_ray=mode == "ray", engine_cls=ENGINE, show_progress=False)
        summary = run_batch(source, outputs[mode], config, options)
        assert (summary.done, summary.failed, summary.skipped) == (23, 3, 0)
        if mode == "local":
            assert [p.name for p in (tmp_path / "engines").iterdir()] == [str(os.getpid())]
            shutil.rmtree(tmp_path / "engines")
    # An LLM actor pool of deployments.llm.num_replicas engines, all started before work (none in this process).
    ray_engines = [int(p.name) for p in (tmp_path / "engines").iterdir()]
    assert len(ray_engines) == 2 and os.getpid() not in ray_engines

    local, ray_records = (by_custom_id(read_jsonl(outputs[mode])) for mode in ("local", "ray"))
    assert local.keys() == ray_records.keys()
    for custom_id, record in local.items():
        other = ray_records[custom_id]
        assert (other["error"] is None) == (record["error"] is None)
        if record["response"] is None:
            assert other["response"] is None and other["error"] == record["error"]
            continue
        assert other["response"]["status_code"] == record["response"]["status_code"]
        body, other_body = record["response"]["body"], other["response"]["body"]
        assert other_body.get("choices") == body.get("choices")
        assert other_body.get("usage") == body.get("usage")
        assert other_body.get("error") == body.get("error")

    # Resume works the same over Ray: nothing left to do.
    again = run_batch(source, outputs["ray"], config, BatchOptions(use_ray=True, engine_cls=ENGINE))
    assert (again.done, again.failed, again.skipped) == (0, 0, 26)
