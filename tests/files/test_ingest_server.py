"""`mmrag ingest --server`: local files into a running server's vector store over HTTP (Files API + Vector
Stores API), against the real app on a Milvus Lite file with the bundled MiniLM; idempotent, replaces on
request, reports failed files with the server's reason."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from mmrag.serving.cli import ingest as ingest_cli
from mmrag.serving.config import MmragConfig
from mmrag.serving.files.remote import SERVER_SUFFIXES, RemoteError, ingest_through_server
from mmrag.serving.openai.server import create_app
from mmrag.serving.pipeline import LocalBackend
from mmrag.serving.retrieval.ingest import find_files, source_name
from tests.fake_engine import FakeEngine
from tests.files.documents import pdf_bytes, png_bytes

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def encoder():
    from mmrag.serving.retrieval.config import EncoderConfig
    from mmrag.serving.retrieval.encoders import load_encoder

    return load_encoder(EncoderConfig())


@pytest.fixture
def http(tmp_path, encoder, monkeypatch):
    from mmrag.serving.retrieval import retriever as retriever_module
    from mmrag.serving.retrieval.stage import RetrievalStage

    monkeypatch.setattr(retriever_module, "load_encoder", lambda _config: encoder)
    config = MmragConfig.model_validate(
        {
            "retrieval": {"uri": str(tmp_path / "milvus.db"), "ingest_demo_corpus": False, "default_mode": "none"},
            "files": {"directory": str(tmp_path / "files")},
            "vector_stores": {"poll_after_ms": 20},
        }
    )
    stage = RetrievalStage(config)
    with TestClient(create_app(config, LocalBackend(FakeEngine(config), stage))) as client:
        yield client
    stage.__del__()  # the stage's own cleanup: indexing pool stopped, Lite file released


@pytest.fixture
def docs(tmp_path) -> Path:
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "funicular.pdf").write_bytes(
        pdf_bytes(["The Harrowgate funicular climbs 212 metres.", "Its cars were rebuilt in 1990."])
    )
    (root / "cheese.html").write_text(
        "<html><head><title>Cheese</title></head><body><p>Blue Gorse cheese ages in caves.</p></body></html>"
    )
    (root / "sub" / "herons.md").write_text("# Herons\n\nThe grey heron of Vellmora nests in reed beds.\n")
    (root / "red_square.png").write_bytes(png_bytes())
    (root / "notes.docx").write_bytes(b"PK\x03\x04")  # not offered to the server: unsupported suffix
    return root


def ingest(http, docs, **kwargs):
    files = find_files([docs], SERVER_SUFFIXES)
    return ingest_through_server(
        http, files, "my-docs", source_of=lambda p: source_name(p, docs.parent), timeout_s=120, **kwargs
    )


def search(http, store_id, query):
    response = http.post(f"/v1/vector_stores/{store_id}/search", json={"query": query, "max_num_results": 1})
    assert response.status_code == 200, response.text
    return response.json()["data"]


def test_files_are_uploaded_indexed_and_searchable_then_skipped(http, docs):
    first = ingest(http, docs)
    assert (first.files, first.uploaded, first.skipped, first.completed, first.failed) == (4, 4, 0, 4, [])
    stores = http.get("/v1/vector_stores").json()["data"]
    assert [(s["id"], s["name"]) for s in stores] == [(first.vector_store_id, "my-docs")]
    (hit,) = search(http, first.vector_store_id, "when were the funicular cars rebuilt")
    assert hit["filename"] == "funicular.pdf" and hit["attributes"]["path"] == "docs/funicular.pdf"
    # The same files again: nothing uploaded, the store found by its name.
    again = ingest(http, docs)
    assert (again.vector_store_id, again.uploaded, again.skipped) == (first.vector_store_id, 0, 4)
    assert len(http.get("/v1/files").json()["data"]) == 4


def test_changed_file_is_added_or_replaced(http, docs):
    first = ingest(http, docs)
    (docs / "sub" / "herons.md").write_text("# Herons\n\nHerons of Vellmora now winter in the south.\n")
    added = ingest(http, docs)
    assert (added.uploaded, added.skipped, added.replaced) == (1, 3, 0)
    (docs / "sub" / "herons.md").write_text("# Herons\n\nThird version.\n")
    replaced = ingest(http, docs, replace=True)
    assert (replaced.uploaded, replaced.replaced) == (1, 2)  # both older versions removed
    store_files = http.get(f"/v1/vector_stores/{first.vector_store_id}/files").json()["data"]
    assert len(store_files) == 4
    assert len(http.get("/v1/files").json()["data"]) == 4  # the replaced uploads are deleted too


def test_a_file_the_server_cannot_read_is_reported_failed(http, tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "locked.pdf").write_bytes(pdf_bytes(["secret"], password="pw"))
    (root / "ok.txt").write_text("A readable note.")
    summary = ingest_through_server(
        http, find_files([root], SERVER_SUFFIXES), "bad", source_of=lambda p: p.name, timeout_s=120
    )
    assert summary.completed == 1
    ((path, reason),) = summary.failed
    assert path == "locked.pdf" and reason.startswith("failed: ") and "encrypted" in reason


def test_unknown_store_id_and_unreachable_server_are_clear_errors(http, docs):
    with pytest.raises(RemoteError, match=r"GET /v1/vector_stores/vs_missing: 404"):
        ingest_through_server(http, [], "vs_missing", source_of=str)
    import httpx

    with httpx.Client(base_url="http://127.0.0.1:9") as dead, pytest.raises(RemoteError, match="cannot reach"):
        ingest_through_server(dead, [], "x", source_of=str)


def test_cli_argument_errors(capsys, docs):
    def args(**kw):
        base = {
            "paths": [str(docs)],
            "server": None,
            "vector_store": None,
            "collection": None,
            "chunk_tokens": None,
            "overlap_tokens": None,
            "api_key": None,
            "timeout": 5.0,
            "replace": False,
            "no_progress": True,
        }
        return argparse.Namespace(**(base | kw))

    assert ingest_cli.run(args(server="http://127.0.0.1:9")) == 2
    assert "--server and --vector-store go together" in capsys.readouterr().err
    assert ingest_cli.run(args(server="http://127.0.0.1:9", vector_store="x", collection="c")) == 2
    assert "--collection is for direct ingestion" in capsys.readouterr().err
    assert ingest_cli.run(args(server="http://127.0.0.1:9/v1", vector_store="x")) == 2
    assert "cannot reach the server" in capsys.readouterr().err
