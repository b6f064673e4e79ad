"""Ingestion into real Milvus Lite: idempotency, replace, filters, hybrid search, encoder records."""

from __future__ import annotations

import numpy as np
import pytest

from mmrag.serving.retrieval.chunking import MAX_CHUNK_BYTES
from mmrag.serving.retrieval.errors import EncoderMismatchError, InvalidFilterError
from mmrag.serving.retrieval.ingest import Document, find_files, ingest_documents, ingest_paths


def ingest(corpus_dir, store, encoder, rconfig, **kwargs):
    return ingest_paths([corpus_dir], store, encoder, rconfig, source_root=corpus_dir.parent, progress=False, **kwargs)


def sources(hits):
    return [h.source for h in hits]


def test_find_files_skips_hidden_and_unsupported(corpus_dir):
    names = [p.relative_to(corpus_dir).as_posix() for p in find_files([corpus_dir])]
    assert names == ["herons.md", "sub/facts.jsonl", "trains.txt"]
    with pytest.raises(ValueError, match="unsupported"):
        find_files([corpus_dir / "image.png"])
    with pytest.raises(FileNotFoundError):
        find_files([corpus_dir / "missing"])


def test_ingestion_is_idempotent(corpus_dir, store, encoder, rconfig):
    first = ingest(corpus_dir, store, encoder, rconfig)
    assert (first.files, first.documents, first.chunks, first.new_chunks) == (3, 5, 5, 5)
    assert store.count(rconfig.collection) == 5
    again = ingest(corpus_dir, store, encoder, rconfig)
    assert (again.chunks, again.new_chunks) == (5, 0)
    assert store.count(rconfig.collection) == 5
    assert store.source_counts(rconfig.collection) == {
        "docs/herons.md": 1,
        "docs/trains.txt": 1,
        "docs/sub/facts.jsonl": 3,
    }


def test_changed_file_adds_chunks_and_replace_removes_stale_ones(corpus_dir, store, encoder, rconfig):
    ingest(corpus_dir, store, encoder, rconfig)
    (corpus_dir / "trains.txt").write_text("The funicular was rebuilt in 1990.\n")
    assert ingest(corpus_dir, store, encoder, rconfig).new_chunks == 1
    assert store.source_counts(rconfig.collection)["docs/trains.txt"] == 2  # old + new version
    replaced = ingest(corpus_dir, store, encoder, rconfig, replace=True)
    assert replaced.deleted_chunks == 6 and replaced.new_chunks == 5
    assert store.source_counts(rconfig.collection)["docs/trains.txt"] == 1
    (hit,) = store.search(
        rconfig.collection, encoder.encode(["funicular"])[0], "funicular", 1, 'source == "docs/trains.txt"'
    )
    assert "1990" in hit.text


def test_long_document_is_chunked_with_overlap(tmp_path, store, encoder, rconfig):
    rconfig.chunking = rconfig.chunking.model_validate({"chunk_tokens": 24, "overlap_tokens": 6})
    text = " ".join(f"Sentence number {i} talks about lighthouse keepers." for i in range(30))
    summary = ingest_documents([Document(text, "long.md", {})], store, encoder, rconfig, progress=False)
    assert summary.chunks > 10
    rows = store.client.query(rconfig.collection, filter="", output_fields=["text", "metadata"], limit=100)
    indexes = sorted(r["metadata"]["chunk_index"] for r in rows)
    assert indexes == list(range(summary.chunks))
    first = next(r["text"] for r in rows if r["metadata"]["chunk_index"] == 0)
    second = next(r["text"] for r in rows if r["metadata"]["chunk_index"] == 1)
    assert text.startswith(first) and first[-10:] in second  # overlap carried into the next chunk


def test_an_unbroken_run_longer_than_the_text_field_is_cut_not_fatal(store, encoder, rconfig):
    """One 100,000-character "word" is one unknown token to the encoder; Milvus's text field holds
    65,535 bytes, so the chunk is cut rather than the whole ingestion failing."""
    text = "Herons wade. " + "é" * 100_000 + " Herons fish."
    summary = ingest_documents([Document(text, "run.md", {})], store, encoder, rconfig, progress=False)
    rows = store.client.query(rconfig.collection, filter="", output_fields=["text"], limit=10)
    assert summary.chunks == len(rows) >= 1
    assert all(len(r["text"].encode()) <= MAX_CHUNK_BYTES for r in rows)
    assert rows[0]["text"].startswith("Herons wade.")


def test_chunk_size_beyond_the_encoder_is_refused(store, encoder, rconfig):
    rconfig.chunking = rconfig.chunking.model_validate({"chunk_tokens": 300, "overlap_tokens": 0})
    with pytest.raises(ValueError, match="exceeds"):
        ingest_documents([Document("x", "x", {})], store, encoder, rconfig, progress=False)


def test_filters_on_metadata_and_source(corpus_dir, store, encoder, rconfig):
    ingest(corpus_dir, store, encoder, rconfig)
    query = "cheese aged in caves"
    vector = encoder.encode([query], is_query=True)[0]
    french = store.search(rconfig.collection, vector, query, 5, 'metadata["lang"] == "fr"')
    assert [h.metadata for h in french] == [{"lang": "fr", "line": 3, "chunk_index": 0}]
    assert set(sources(store.search(rconfig.collection, vector, query, 5, 'source like "docs/sub/%"'))) == {
        "docs/sub/facts.jsonl"
    }
    unfiltered = store.search(rconfig.collection, vector, query, 5)
    assert len(unfiltered) == 5 and "Blue Gorse" in unfiltered[0].text
    assert unfiltered[0].score > unfiltered[-1].score  # COSINE: best first


@pytest.mark.parametrize("hybrid", [False, True])
def test_rejected_filter_is_a_400_naming_the_field(corpus_dir, store, encoder, rconfig, hybrid):
    ingest(corpus_dir, store, encoder, rconfig)
    vector = encoder.encode(["x"])[0]
    for bad in ("nosuchfield == 1", 'source = "x"', 'metadata["lang"] =='):
        with pytest.raises(InvalidFilterError) as caught:
            store.search(rconfig.collection, vector, "x", 3, bad, hybrid=hybrid)
        assert caught.value.status_code == 400 and caught.value.field == "retrieval.filter"
        assert bad in str(caught.value)


def test_hybrid_search_finds_exact_terms_with_rrf(corpus_dir, store, encoder, rconfig):
    ingest(corpus_dir, store, encoder, rconfig)
    query = "ZQX-4471"
    vector = encoder.encode([query], is_query=True)[0]
    hybrid = store.search(rconfig.collection, vector, query, 3, hybrid=True)
    assert "ZQX-4471" in hybrid[0].text
    # RRF scores: sum over the two lists of 1/(k + rank), rank from 1; the top one is in both lists.
    k = rconfig.rrf_k
    assert hybrid[0].score >= 1 / (k + 1) - 1e-9  # at least BM25's first place
    assert all(h.score <= 2 / (k + 1) + 1e-9 for h in hybrid)
    filtered = store.search(rconfig.collection, vector, query, 3, 'metadata["lang"] == "fr"', hybrid=True)
    assert [h.metadata["lang"] for h in filtered] == ["fr"]


class _OtherEncoder:
    """Same dimension, different identity: its vectors must not be mixed with MiniLM's."""

    def __init__(self, inner, name="other-encoder"):
        self.inner, self.name, self.dim = inner, name, inner.dim
        self.max_tokens, self.special_tokens, self.token_spans = (
            inner.max_tokens,
            inner.special_tokens,
            inner.token_spans,
        )

    def encode(self, texts, *, is_query=False):
        return -self.inner.encode(texts, is_query=is_query)


def test_encoder_mismatch_is_refused(corpus_dir, store, encoder, rconfig):
    ingest(corpus_dir, store, encoder, rconfig)
    with pytest.raises(EncoderMismatchError, match="all-MiniLM-L6-v2") as caught:
        ingest(corpus_dir, store, _OtherEncoder(encoder), rconfig)
    assert caught.value.status_code == 400 and caught.value.field == "retrieval.collection"
    props = store.properties(rconfig.collection)
    assert props["mmrag.encoder"] == encoder.name and props["mmrag.encoder_dim"] == "384"


def test_collection_not_created_by_mmrag_is_refused(store, encoder, rconfig):
    store.client.create_collection("foreign", dimension=384)
    with pytest.raises(EncoderMismatchError, match="not created by mmrag"):
        store.check_encoder("foreign", encoder)


def test_xrag_vector_field_is_filled_when_configured(corpus_dir, store, encoder, rconfig):
    xrag = _OtherEncoder(encoder, name="xrag-space")
    ingest(corpus_dir, store, encoder, rconfig, xrag_encoder=xrag)
    props = store.properties(rconfig.collection)
    assert props["mmrag.xrag_encoder"] == "xrag-space" and props["mmrag.xrag_dim"] == "384"
    query = "grey heron"
    (hit,) = store.search(rconfig.collection, encoder.encode([query])[0], query, 1, vectors="xrag")
    np.testing.assert_allclose(hit.vector, xrag.encode([hit.text])[0], atol=1e-5)
    (hit,) = store.search(rconfig.collection, encoder.encode([query])[0], query, 1, vectors="dense")
    np.testing.assert_allclose(hit.vector, encoder.encode([hit.text])[0], atol=1e-5)
    with pytest.raises(EncoderMismatchError, match="xRAG"):
        store.check_encoder(rconfig.collection, encoder, _OtherEncoder(encoder, name="another"))


def test_reopened_lite_file_serves_the_same_data(corpus_dir, encoder, rconfig):
    from mmrag.serving.retrieval.store import MilvusStore

    first = MilvusStore(rconfig)
    ingest(corpus_dir, first, encoder, rconfig)
    first.close()
    second = MilvusStore(rconfig)
    try:
        assert second.count(rconfig.collection) == 5
        assert ingest(corpus_dir, second, encoder, rconfig).new_chunks == 0
    finally:
        second.close()


def _projector_card(directory, encoder_name: str):
    from mmrag.serving.xrag.projector import LlmIdentity, ProjectorCard, XragProjector, save_projector

    return save_projector(XragProjector(384, 8), ProjectorCard(encoder_name, 384, LlmIdentity("m", 8, 16)), directory)


@pytest.mark.parametrize("hybrid", [False, True])
def test_xrag_retrieval_returns_the_vectors_the_projector_reads(tmp_path, corpus_dir, store, encoder, rconfig, hybrid):
    import asyncio

    from mmrag.serving.retrieval.config import RetrievalConfig
    from mmrag.serving.retrieval.retriever import Retriever

    xrag = _OtherEncoder(encoder, name="xrag-space")
    ingest(corpus_dir, store, encoder, rconfig, xrag_encoder=xrag)
    store.close()  # one Lite client per file: the retriever opens its own
    options = {"mode": "xrag", "top_k": 2, "hybrid": hybrid}

    def retriever(projector_encoder: str, xrag_encoder) -> Retriever:
        projector = _projector_card(tmp_path / projector_encoder, projector_encoder)
        config = {**rconfig.model_dump(), "xrag": {"projector": str(projector)}, "xrag_encoder": xrag_encoder}
        return Retriever(RetrievalConfig.model_validate(config), encoder)

    served = retriever("xrag-space", {"name": "minilm"})
    try:
        result = asyncio.run(served.retrieve(options, "grey heron"))
        assert len(result.chunks) == 2
        expected = xrag.encode([c.text for c in result.chunks])
        np.testing.assert_allclose([c.vector for c in result.chunks], expected, atol=1e-5)
    finally:
        served.close()
    wrong = retriever("other-space", {"name": "minilm"})
    try:
        with pytest.raises(EncoderMismatchError, match="other-space"):
            asyncio.run(wrong.retrieve(options, "grey heron"))
    finally:
        wrong.close()
    dense = retriever(encoder.name, None)  # no xRAG encoder: the dense field, the retrieval encoder's vectors
    try:
        result = asyncio.run(dense.retrieve(options, "grey heron"))
        np.testing.assert_allclose(result.chunks[0].vector, encoder.encode([result.chunks[0].text])[0], atol=1e-5)
    finally:
        dense.close()


def test_pdf_and_html_are_ingested_through_the_parsers(tmp_path, store, encoder, rconfig):
    from tests.files.documents import pdf_bytes

    root = tmp_path / "web"
    root.mkdir()
    (root / "report.pdf").write_bytes(
        pdf_bytes(["The Harrowgate funicular climbs 212 metres.", "Its cars were rebuilt in 1990."])
    )
    (root / "page.html").write_text(
        "<html><head><title>Cheese</title><script>var x = 'never';</script></head>"
        "<body><p>Blue Gorse cheese ages in limestone caves.</p><img src='c.png' alt='a wheel of cheese'></body></html>"
    )
    (root / "empty.txt").write_text("")  # an empty file is no documents, not an error
    summary = ingest_paths([root], store, encoder, rconfig, source_root=tmp_path, progress=False)
    assert (summary.files, summary.documents, summary.new_chunks) == (3, 4, 3)
    (hit,) = store.search(rconfig.collection, encoder.encode(["when were the cars rebuilt"])[0], "", 1)
    assert (hit.source, hit.metadata["page"], hit.text) == ("web/report.pdf", 2, "Its cars were rebuilt in 1990.")
    (hit,) = store.search(rconfig.collection, encoder.encode(["cheese caves"])[0], "", 1, 'source == "web/page.html"')
    assert hit.metadata["title"] == "Cheese" and "[image: a wheel of cheese]" in hit.text and "never" not in hit.text


def test_unreadable_pdf_fails_naming_its_path(tmp_path, store, encoder, rconfig):
    from mmrag.serving.files.parsers import ParseError
    from tests.files.documents import pdf_bytes

    locked = tmp_path / "locked.pdf"
    locked.write_bytes(pdf_bytes(["secret"], password="pw"))
    with pytest.raises(ParseError, match=f"^{locked}: the PDF is encrypted"):
        ingest_paths([locked], store, encoder, rconfig, progress=False)
    assert not store.has_collection(rconfig.collection) or store.count(rconfig.collection) == 0
