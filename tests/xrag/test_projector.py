"""The xRAG projector: shapes, save/load identity, refusal of another encoder or LLM, the placeholder token."""

from __future__ import annotations

import shutil

import pytest
import torch

from mmrag.serving.models.trained import trained_model_path
from mmrag.serving.xrag.projector import (
    XRAG_TOKEN,
    LlmIdentity,
    ProjectorCard,
    ProjectorMismatchError,
    XragProjector,
    add_placeholder_token,
    llm_identity,
    load_projector,
    save_projector,
)

LLM = LlmIdentity("tiny-mllm", 128, 576)


def _projector(seed: int = 0) -> XragProjector:
    torch.manual_seed(seed)
    return XragProjector(384, 128)


def test_shapes():
    projector = _projector()
    assert projector(torch.randn(5, 384)).shape == (5, 128)
    assert [p.shape for p in projector.parameters()] == [(128, 384), (128,), (128, 128), (128,)]


def test_save_load_identity(tmp_path):
    projector = _projector()
    card = ProjectorCard("minilm", 384, LLM, training={"steps": 3})
    save_projector(projector, card, tmp_path)
    loaded, read = load_projector(tmp_path, encoder="minilm", encoder_dim=384, llm=LLM)
    assert read == card
    vectors = torch.randn(4, 384)
    torch.testing.assert_close(loaded(vectors), projector(vectors), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"encoder": "e5-small", "encoder_dim": 384}, "trained on minilm"),
        ({"encoder": "minilm", "encoder_dim": 768}, "768-d"),
        ({"llm": LlmIdentity("tiny-llava", 128, 576)}, "trained for the LLM"),
        ({"llm": LlmIdentity("tiny-mllm", 256, 576)}, "hidden_size=256"),
    ],
)
def test_mismatched_encoder_or_llm_is_refused(tmp_path, kwargs, message):
    save_projector(_projector(), ProjectorCard("minilm", 384, LLM), tmp_path)
    with pytest.raises(ProjectorMismatchError, match=message):
        load_projector(tmp_path, **kwargs)


def test_not_a_projector(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an xRAG projector"):
        load_projector(tmp_path)


def test_placeholder_token_is_one_spare_id_and_changes_no_other_text(tmp_path):
    from transformers import AutoTokenizer

    model = shutil.copytree(trained_model_path(), tmp_path / "tiny-mllm")
    before = AutoTokenizer.from_pretrained(model)
    text = "Image 1: <image> What is the colour of Kalomi? [1] (source: kb/1)"
    token_id = add_placeholder_token(model)
    assert token_id == add_placeholder_token(model)  # idempotent
    after = AutoTokenizer.from_pretrained(model)
    assert before.vocab_size <= token_id < llm_identity(model).vocab_size
    assert after(f"a {XRAG_TOKEN} b")["input_ids"].count(token_id) == 1
    assert after(text)["input_ids"] == before(text)["input_ids"]
    assert llm_identity(model) == LlmIdentity("tiny-mllm", 128, 576)
