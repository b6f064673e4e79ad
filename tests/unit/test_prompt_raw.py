"""The raw-prompt path of PromptBuilder (``/v1/completions``): sent as it is, no chat template; placeholders and
prompts over the context refused naming ``prompt``. A fake tokenizer and renderer, no vLLM."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from mmrag.serving.config import MmragConfig
from mmrag.serving.engine.prompt import PromptBuilder, modality_tokens
from mmrag.serving.engine.protocol import GenerationRequest
from mmrag.serving.errors import InvalidRequestError
from mmrag.serving.xrag.projector import XRAG_TOKEN


class FakeTokenizer:
    """Whitespace tokens; id 3 is the image placeholder. Applying a chat template is a test failure here."""

    bos_token, eos_token, pad_token, unk_token = "<s>", "</s>", "<pad>", "<unk>"
    all_special_tokens: ClassVar[list[str]] = ["<s>", "</s>", "<pad>", "<image>", "<|im_start|>"]

    def apply_chat_template(self, *_: Any, **__: Any) -> str:
        raise AssertionError("a completions prompt must not go through the chat template")

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return {3: "<image>"}[token_id]


class LengthCheckError(Exception):
    """As vLLM's renderer raises for a prompt over its input limit (``VLLMValidationError``)."""

    parameter = "input_tokens"


class CountingRenderer:
    async def render_cmpl_async(self, prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if any(len(p["prompt"].split()) > 100 for p in prompts):
            raise LengthCheckError("your prompt contains 101 input tokens")
        return [{**p, "prompt_token_ids": list(range(len(p["prompt"].split())))} for p in prompts]


def builder(max_model_len: int = 8) -> PromptBuilder:
    llm = SimpleNamespace(
        get_tokenizer=FakeTokenizer,
        model_config=SimpleNamespace(is_multimodal_model=True, hf_config=SimpleNamespace(image_token_index=3)),
        renderer=CountingRenderer(),
    )
    config = MmragConfig.model_validate({"engine": {"max_model_len": max_model_len}})
    return PromptBuilder(llm, chat_template="", config=config, aim=False)


def raw(prompt: str) -> GenerationRequest:
    return GenerationRequest(request_id="cmpl-1", messages=[], prompt=prompt)


def test_the_prompt_is_rendered_as_it_is_chat_markers_included():
    engine_input = asyncio.run(builder().engine_input(raw("<|im_start|>user\nhi there")))
    assert engine_input["prompt"] == "<|im_start|>user\nhi there" and len(engine_input["prompt_token_ids"]) == 3


@pytest.mark.parametrize(("prompt", "says"), [("see <image> here", "'<image>'"), (f"a {XRAG_TOKEN} b", XRAG_TOKEN)])
def test_a_modality_placeholder_is_a_400_naming_prompt(prompt, says):
    with pytest.raises(InvalidRequestError) as info:
        asyncio.run(builder().engine_input(raw(prompt)))
    assert info.value.param == "prompt" and says in info.value.message


def test_a_prompt_that_leaves_no_room_is_a_400_naming_prompt():
    asyncio.run(builder().engine_input(raw(" ".join(["w"] * 7))))  # 7 of 8: one token left
    with pytest.raises(InvalidRequestError) as info:
        asyncio.run(builder().engine_input(raw(" ".join(["w"] * 8))))
    assert (info.value.param, info.value.code) == ("prompt", "context_length_exceeded")
    with pytest.raises(InvalidRequestError) as info:  # refused by vLLM's renderer itself
        asyncio.run(builder().engine_input(raw(" ".join(["w"] * 101))))
    assert (info.value.param, info.value.code) == ("prompt", "context_length_exceeded")
    assert "101 input tokens" in info.value.message


def test_modality_tokens_without_an_image_token():
    assert modality_tokens(FakeTokenizer(), None) == [XRAG_TOKEN]
    assert modality_tokens(FakeTokenizer(), SimpleNamespace(image_token_index=3)) == sorted(
        ["<image>", XRAG_TOKEN], key=lambda t: (-len(t), t)
    )
