"""`mmrag ingest` / `mmrag collections` on a tmp folder, the demo corpus, the deployment class, config."""

from __future__ import annotations

import asyncio

import pytest

from mmrag.serving.cli import main
from mmrag.serving.config import MmragConfig


def cli(*argv: str) -> int:
    return main(list(argv))


def test_ingest_and_collections_commands(corpus_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(corpus_dir.parent)
    uri = f"retrieval.uri={tmp_path / 'cli.db'}"
    assert cli("ingest", "docs", "--set", uri, "--no-progress", "--chunk-tokens", "64") == 0
    assert "3 files, 5 documents, 5 chunks (5 new, 0 already stored)" in capsys.readouterr().out
    assert cli("ingest", "docs", "--set", uri, "--no-progress") == 0
    assert "(0 new, 5 already stored)" in capsys.readouterr().out

    assert cli("collections", "list", "--set", uri) == 0
    assert capsys.readouterr().out == "mmrag_docs\t5 chunks\tsentence-transformers/all-MiniLM-L6-v2\n"
    assert cli("collections", "stats", "mmrag_docs", "--set", uri) == 0
    stats = capsys.readouterr().out
    assert "chunks: 5" in stats and "sources: 3" in stats and "3  docs/sub/facts.jsonl" in stats
    assert cli("collections", "delete-source", "mmrag_docs", "docs/sub/facts.jsonl", "--set", uri) == 0
    assert "deleted 3 chunks" in capsys.readouterr().out
    assert cli("collections", "drop", "mmrag_docs", "--yes", "--set", uri) == 0
    assert cli("collections", "list", "--set", uri) == 0
    assert capsys.readouterr().out == "dropped mmrag_docs\n"


def test_cli_errors_are_messages_not_tracebacks(corpus_dir, tmp_path, capsys):
    uri = f"retrieval.uri={tmp_path / 'cli.db'}"
    assert cli("ingest", str(corpus_dir / "missing"), "--set", uri) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli("ingest", str(corpus_dir), "--set", uri, "--chunk-tokens", "8", "--overlap-tokens", "8") == 2
    assert "overlap" in capsys.readouterr().err
    assert cli("collections", "drop", "nope", "--yes", "--set", uri) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_corpus_is_ingested_once_and_answers(tmp_path, encoder):
    from mmrag.serving.retrieval.demo import DEMO_CORPUS, ensure_demo_corpus
    from mmrag.serving.retrieval.retriever import Retriever

    config = MmragConfig.model_validate({"retrieval": {"uri": str(tmp_path / "demo.db")}})
    summary = ensure_demo_corpus(config, encoder=encoder)
    assert summary is not None and summary.files == len(list(DEMO_CORPUS.glob("*.md"))) >= 24
    assert ensure_demo_corpus(config, encoder=encoder) is None  # not empty any more: nothing to do
    retriever = Retriever(config.retrieval, encoder)
    questions = {
        "When is the Lantern Tide festival held?": "demo_corpus/vellmora-festival.md",
        "How long is Blue Gorse cheese aged?": "demo_corpus/vellmora-cheese.md",
        "Which index does mmrag use to store vectors by default, and can several processes share it?": (
            "demo_corpus/mmrag-lite.md"
        ),
    }
    for question, source in questions.items():
        result = asyncio.run(retriever.retrieve({"mode": "text"}, question))
        assert result.info.documents[0].source == source, question
    retriever.close()


def test_retriever_deployment_class(tmp_path, encoder, monkeypatch):
    from mmrag.deployments import retriever as deployment
    from mmrag.serving.retrieval import retriever as core
    from mmrag.serving.retrieval.stage import RetrievalStage

    monkeypatch.setattr(core, "load_encoder", lambda config: encoder)  # share the session's model
    config = MmragConfig.model_validate({"retrieval": {"uri": str(tmp_path / "dep.db")}})
    replica = RetrievalStage(config.model_dump())  # the class the deployment wraps
    result = asyncio.run(replica.retrieve({"mode": "text", "top_k": 2}, "What does the Harrowgate Funicular connect?"))
    assert result.info.documents[0].source == "demo_corpus/vellmora-railway.md"
    assert len(result.chunks) == 2
    asyncio.run(replica.check_health())
    assert deployment.RetrieverServer.name == "Retriever"
    assert deployment.retriever_options(config)["num_replicas"] == 1
    config.deployments.retriever.num_replicas = 2
    with pytest.raises(ValueError, match="one replica"):
        deployment.retriever_options(config)
    config.retrieval.uri = "http://milvus:19530"
    assert deployment.retriever_options(config)["num_replicas"] == 2
    replica.core.close()


def test_root_config_carries_retrieval(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("retrieval:\n  top_k: 6\n  index: {type: FLAT}\n  on_failure: degrade\n")
    config = MmragConfig.from_file(path, ["retrieval.hybrid=true"])
    assert (config.retrieval.top_k, config.retrieval.index.type, config.retrieval.hybrid) == (6, "FLAT", True)
    assert config.retrieval.resolved_uri().endswith("milvus.db") and config.retrieval.is_lite()
    with pytest.raises(ValueError):
        MmragConfig.model_validate({"retrieval": {"top_k": 3, "tpo_k": 3}})
    with pytest.raises(ValueError):
        MmragConfig.model_validate({"retrieval": {"chunking": {"chunk_tokens": 10, "overlap_tokens": 10}}})


def test_deployment_refuses_a_default_collection_from_another_encoder(tmp_path, encoder, monkeypatch):
    from mmrag.serving.retrieval import retriever as core
    from mmrag.serving.retrieval.errors import EncoderMismatchError
    from mmrag.serving.retrieval.stage import RetrievalStage
    from mmrag.serving.retrieval.store import MilvusStore

    config = MmragConfig.model_validate({"retrieval": {"uri": str(tmp_path / "dep.db")}})
    store = MilvusStore(config.retrieval)
    store.client.create_collection(config.retrieval.collection, dimension=384)  # not mmrag's
    store.close()
    monkeypatch.setattr(core, "load_encoder", lambda config: encoder)
    with pytest.raises(EncoderMismatchError, match="records no encoder"):
        RetrievalStage(config)
