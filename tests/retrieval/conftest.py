"""Retrieval tests run against real Milvus Lite files (one per test) and the real bundled MiniLM,
loaded once per session."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def encoder():
    from mmrag.serving.retrieval.config import EncoderConfig
    from mmrag.serving.retrieval.encoders import load_encoder

    return load_encoder(EncoderConfig())


@pytest.fixture
def rconfig(tmp_path: Path):
    """A RetrievalConfig on a fresh Lite file, without the demo corpus."""
    from mmrag.serving.retrieval.config import RetrievalConfig

    return RetrievalConfig(uri=str(tmp_path / "milvus.db"), ingest_demo_corpus=False)


@pytest.fixture
def store(rconfig):
    from mmrag.serving.retrieval.store import MilvusStore

    s = MilvusStore(rconfig)
    yield s
    s.close()


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """A small folder: markdown, text, a jsonl with metadata, a hidden file and an unsupported file."""
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "herons.md").write_text(
        "# Herons\n\nThe grey heron of Vellmora nests in reed beds and eats mostly small fish.\n"
    )
    (root / "trains.txt").write_text("The Harrowgate funicular opened in 1898 and climbs 212 metres.\n")
    (root / "sub" / "facts.jsonl").write_text(
        '{"text": "Blue Gorse cheese ages for fourteen weeks in limestone caves.", "metadata": {"lang": "en"}}\n'
        "\n"
        '{"text": "Le fromage Blue Gorse vieillit quatorze semaines.", "metadata": {"lang": "fr"}}\n'
        '{"text": "The access code of the vault is ZQX-4471.", "metadata": {"lang": "en", "secret": true}}\n'
    )
    (root / ".hidden.md").write_text("never ingested")
    (root / "image.png").write_bytes(b"\x89PNG")
    return root


@pytest.fixture
def unreachable_uri() -> str:
    """A Milvus server URI where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
