"""smol's shipped xRAG projector: its card names smol and the bundled MiniLM, and it is served in the lean
layout it was trained in (one ``<xrag>`` token per document, no source line), counted on smol's tokenizer."""

from __future__ import annotations

import pytest
import torch

from mmrag.serving.config import MmragConfig
from mmrag.serving.engine.prompt import as_xrag_placeholders, xrag_layout
from mmrag.serving.models.registry import prepare
from mmrag.serving.models.smol import smol_projector_path
from mmrag.serving.models.trained import trained_projector_path
from mmrag.serving.retrieval.protocol import RetrievalInfo, RetrievalResult, RetrievedChunk, build_text_rag_messages
from mmrag.serving.xrag.projector import XRAG_TOKEN, llm_identity, load_projector, read_card
from mmrag.training.data import encode_prompt
from mmrag.training.tasks import document_source
from mmrag.training.train_projector import LEAN_LAYOUT, XragData, english_task, xrag_view

MINILM = ("sentence-transformers/all-MiniLM-L6-v2", 384)


@pytest.fixture(scope="module")
def smol():
    """smol's checkpoint (prepared once per cache; the e2e default server prepares the same one)."""
    return prepare("smol")


@pytest.fixture(scope="module")
def tokenizer(smol):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol)


def _config(projector) -> MmragConfig:
    return MmragConfig.model_validate({"retrieval": {"xrag": {"projector": str(projector)}}})


def _retrieved(documents: list[str]) -> RetrievalResult:
    chunks = [
        RetrievedChunk(id=str(i), score=1.0, text=d, source=document_source(d), vector=[0.0] * 384)
        for i, d in enumerate(documents)
    ]
    return RetrievalResult(chunks=chunks, info=RetrievalInfo(mode="xrag"))


def _served_prompt(tokenizer, config: MmragConfig, documents: list[str], question: str, xrag: bool) -> list[int]:
    """The prompt ids the server's PromptBuilder renders (same layout choice, same text RAG insertion)."""
    result = _retrieved(documents)
    layout = xrag_layout(config) if xrag else config.retrieval.text_rag
    messages = build_text_rag_messages(
        [{"role": "user", "content": question}],
        as_xrag_placeholders(result) if xrag else result,
        tokenizer,
        10_000,
        layout,
    )
    return tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)


def test_card_names_smol_and_minilm_and_loads(smol):
    card = read_card(smol_projector_path())
    card.check(*MINILM, llm=llm_identity(smol))  # raises on any mismatch
    assert card.llm.name == "smol" and (card.llm.hidden_size, card.llm.vocab_size) == (576, 49152)
    projector, _ = load_projector(smol_projector_path(), encoder=MINILM[0], encoder_dim=MINILM[1])
    out = projector(torch.nn.functional.normalize(torch.randn(3, 384), dim=-1))
    assert out.shape == (3, 576) and bool(torch.isfinite(out).all())
    assert card.layout == LEAN_LAYOUT
    assert card.training["config"]["lean"] and card.training["history"], "training.json summary on the card"


def test_server_uses_the_cards_layout():
    assert xrag_layout(_config(smol_projector_path())).document_template == "{text}"
    tiny = _config(trained_projector_path())  # trained in text RAG's layout, served in it
    assert xrag_layout(tiny) == tiny.retrieval.text_rag
    assert xrag_layout(MmragConfig()) == MmragConfig().retrieval.text_rag


def test_lean_prompt_costs_one_token_per_document_and_a_quarter_of_text_rag(tokenizer):
    config = _config(smol_projector_path())
    xrag_id = tokenizer.convert_tokens_to_ids(XRAG_TOKEN)
    docs = [english_task(0, i, 1, "heldout").documents[0] for i in range(8)]
    question = "Who founded the town?"
    one, eight = (_served_prompt(tokenizer, config, docs[:n], question, xrag=True) for n in (1, 8))
    assert eight.count(xrag_id) == 8
    # One placeholder per document plus the blank line text RAG joins documents with (one token in SmolLM2).
    assert len(eight) - len(one) == 7 * 2, tokenizer.decode(eight)
    assert "source:" not in tokenizer.decode(eight)
    text = _served_prompt(tokenizer, config, docs, question, xrag=False)
    assert len(eight) <= 0.25 * len(text), (len(eight), len(text))  # the target at 8 documents


def test_training_prompt_is_the_served_prompt(tokenizer):
    """The student prompt of training is token for token what the server renders for the same documents."""
    config = _config(smol_projector_path())
    task = english_task(0, 3, 3)
    data = XragData(tokenizer, tokenizer.convert_tokens_to_ids(XRAG_TOKEN), {}, layout=xrag_layout(config))
    trained = encode_prompt(xrag_view(task), tokenizer, 1, layout=data.layout)
    served = _served_prompt(tokenizer, config, list(task.documents), task.question, xrag=True)
    assert trained == served
