"""The bundled demo corpus (``serving/data/demo_corpus``): short documents about mmrag and invented facts,
ingested into the default collection on a server's first run so retrieval works out of the box.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mmrag.serving.config import MmragConfig
    from mmrag.serving.retrieval.encoders import Encoder
    from mmrag.serving.retrieval.ingest import IngestSummary
    from mmrag.serving.retrieval.store import MilvusStore

DEMO_CORPUS = Path(__file__).resolve().parent.parent / "data" / "demo_corpus"


def ensure_demo_corpus(
    config: MmragConfig, *, store: MilvusStore | None = None, encoder: Encoder | None = None
) -> IngestSummary | None:
    """Ingest the demo corpus into the default collection if it is missing or empty; else do nothing.

    Idempotent, and never mixes the demo into a collection that already holds the user's documents.
    Returns the ingestion summary, or None when nothing was done (disabled, or collection not empty).
    """
    from mmrag.serving.retrieval.encoders import load_encoder
    from mmrag.serving.retrieval.ingest import ingest_paths
    from mmrag.serving.retrieval.store import MilvusStore

    retrieval = config.retrieval
    if not retrieval.ingest_demo_corpus:
        return None
    own_store = store is None
    store = store or MilvusStore(retrieval)
    try:
        collection = retrieval.collection
        if store.has_collection(collection) and store.count(collection) > 0:
            return None
        encoder = encoder or load_encoder(retrieval.encoder)
        # Sources like "demo_corpus/vellmora-island.md", the same on every install.
        return ingest_paths([DEMO_CORPUS], store, encoder, retrieval, source_root=DEMO_CORPUS.parent, progress=False)
    finally:
        if own_store:
            store.close()
