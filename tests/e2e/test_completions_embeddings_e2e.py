"""``/v1/embeddings`` and ``/v1/completions`` on the default server (smol through Ray Serve + vLLM, the session's
shared `default_client`; no server of its own), with the real `openai` client and LangChain's OpenAIEmbeddings.

The embeddings must be the vectors mmrag's ingestion stores in Milvus for the same text: this process ingests
the text into a Milvus Lite file of its own with the server's default encoder configuration, reads the stored
vector back, and compares (the server's Lite file is held by its retriever replica).
"""

from __future__ import annotations

import os

import numpy as np
import openai
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "smol"
ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
TEXT = "The Kessel Span is a rope bridge of 212 metres over the Vellmora gorge."
PROMPT = "The capital of France is"
# The replica encodes in another process, with its own thread count: float32 sums may round differently.
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def stored_vector(tmp_path_factory) -> np.ndarray:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mmrag.serving.retrieval.config import RetrievalConfig
    from mmrag.serving.retrieval.ingest import Document, chunk_documents, ingest_documents
    from mmrag.serving.retrieval.retriever import Retriever

    config = RetrievalConfig(uri=str(tmp_path_factory.mktemp("milvus") / "milvus.db"), ingest_demo_corpus=False)
    retriever = Retriever(config)
    try:
        documents = [Document(TEXT, "kessel.md", {})]
        ingest_documents(documents, retriever.store(), retriever.encoder, config, progress=False)
        (row,) = chunk_documents(documents, retriever.encoder, config)
        (stored,) = retriever.store().get_rows(config.collection, [row.id], ["text", "dense"])
    finally:
        retriever.close()
    assert stored["text"] == TEXT
    return np.asarray(stored["dense"], dtype=np.float32)


def test_embeddings_equal_the_vector_milvus_stores(default_client, stored_vector):
    floats = default_client.embeddings.create(model="minilm", input=[TEXT, "another text"], encoding_format="float")
    base64 = default_client.embeddings.create(model=ENCODER, input=TEXT)  # the SDK asks for base64 and decodes
    assert floats.model == ENCODER and [d.index for d in floats.data] == [0, 1]
    as_float = np.asarray(floats.data[0].embedding, dtype=np.float32)
    as_base64 = np.asarray(base64.data[0].embedding, dtype=np.float32)
    assert as_float.shape == (384,)
    assert np.array_equal(as_float, as_base64)
    assert np.abs(as_float - stored_vector).max() <= TOLERANCE
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > base64.usage.prompt_tokens > 2
    with pytest.raises(openai.BadRequestError) as refused:
        default_client.embeddings.create(model="minilm", input=TEXT, dimensions=128)
    assert refused.value.body["param"] == "dimensions"


def test_langchain_openai_embeddings(default_client, stored_vector):
    from langchain_openai import OpenAIEmbeddings

    # check_embedding_ctx_length=False: LangChain sends the texts; left True, it sends tiktoken ids (refused,
    # as another tokenizer's ids) and first downloads tiktoken's vocabulary.
    embeddings = OpenAIEmbeddings(
        model="minilm", base_url=str(default_client.base_url), api_key="unused", check_embedding_ctx_length=False
    )
    documents = embeddings.embed_documents([TEXT, "A second document."])
    query = embeddings.embed_query(TEXT)
    assert len(documents) == 2 and len(documents[0]) == 384
    assert np.abs(np.asarray(documents[0], dtype=np.float32) - stored_vector).max() <= TOLERANCE
    assert np.abs(np.asarray(query, dtype=np.float32) - stored_vector).max() <= TOLERANCE


def test_completions_take_the_raw_prompt(default_client):
    greedy = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    response = default_client.completions.create(**greedy, logprobs=2)
    (choice,) = response.choices
    assert response.object == "text_completion" and choice.text and choice.finish_reason in ("stop", "length")
    # No chat template: SmolLM2's would add a system message of about 30 tokens.
    assert response.usage.prompt_tokens < 10
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text and len(logprobs.token_logprobs) == len(logprobs.tokens)
    assert logprobs.text_offset[0] == 0 and all(len(top) <= 3 for top in logprobs.top_logprobs)
    echoed = default_client.completions.create(**greedy, echo=True)
    assert echoed.choices[0].text == PROMPT + choice.text
    chunks = list(default_client.completions.create(**greedy, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].choices == [] and chunks[-1].usage == response.usage
    two = default_client.completions.create(**{**greedy, "prompt": [PROMPT, "One, two, three,"]})
    assert [c.index for c in two.choices] == [0, 1] and all(c.text for c in two.choices)
    assert two.usage.prompt_tokens > response.usage.prompt_tokens  # summed over the prompts


def test_a_prompt_over_the_context_is_a_400_naming_prompt(default_client):
    with pytest.raises(openai.BadRequestError) as refused:
        default_client.completions.create(model=MODEL, prompt="word " * 3000, max_tokens=4)
    assert refused.value.body["param"] == "prompt" and refused.value.body["code"] == "context_length_exceeded"
