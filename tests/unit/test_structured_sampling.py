"""What the vLLM engine hands vLLM for structured outputs, tool calls and the sampling extras (no engine start),
and how tools and tool messages reach a chat template without a tools section.

The tests that build vLLM objects are ``slow``: the first pays for importing vLLM (seconds on an idle machine)."""

from __future__ import annotations

import json

import jinja2
import pytest

from mmrag.serving.engine.protocol import SamplingOptions, StructuredOutput
from mmrag.serving.engine.tool_prompt import TOOLS_PREAMBLE, reject_special_tool_text, render_tools
from mmrag.serving.errors import InvalidRequestError

SCHEMA = '{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}'


def build(options: SamplingOptions):
    from mmrag.serving.engine.vllm_engine import VllmEngine

    return VllmEngine._build_sampling_params(options, 32, None)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("structured", "field", "value"),
    [
        (StructuredOutput(kind="json", spec=SCHEMA), "json", SCHEMA),
        (StructuredOutput(kind="json_object"), "json_object", True),
        (StructuredOutput(kind="regex", spec="[0-9]+"), "regex", "[0-9]+"),
        (StructuredOutput(kind="choice", choices=("yes", "no")), "choice", ["yes", "no"]),
        (StructuredOutput(kind="grammar", spec='root ::= "a"'), "grammar", 'root ::= "a"'),
    ],
)
def test_each_constraint_becomes_vllms_structured_outputs(structured, field, value):
    params = build(SamplingOptions(structured=structured))
    assert getattr(params.structured_outputs, field) == value
    others = {"json", "json_object", "regex", "choice", "grammar"} - {field}
    assert all(getattr(params.structured_outputs, name) is None for name in others)


@pytest.mark.slow
def test_free_text_has_no_constraint_and_extras_pass_through():
    params = build(
        SamplingOptions(logit_bias=((42, -100.0), (7, 2.5)), min_p=0.1, top_k=20, repetition_penalty=1.3, seed=3)
    )
    assert params.structured_outputs is None
    assert params.logit_bias == {42: -100.0, 7: 2.5}
    assert (params.min_p, params.top_k, params.repetition_penalty, params.seed) == (0.1, 20, 1.3, 3)
    assert build(SamplingOptions()).logit_bias is None


@pytest.mark.slow
def test_backend_refusals_name_the_constraints_field_and_vocabulary_checks_name_logit_bias():
    from vllm.exceptions import VLLMValidationError

    from mmrag.serving.engine.vllm_engine import _as_openai_error

    tools = StructuredOutput(kind="json", spec=SCHEMA, param="tools")
    error = _as_openai_error(VLLMValidationError("The provided JSON schema contains features not supported"), tools)
    assert isinstance(error, InvalidRequestError) and error.param == "tools"
    out_of_vocab = VLLMValidationError("token_id(s) [999999] in logit_bias", parameter="logit_bias")
    assert _as_openai_error(out_of_vocab, None).param == "logit_bias"
    assert _as_openai_error(out_of_vocab, tools).param == "logit_bias"


# SmolLM2-135M-Instruct's template as the smol checkpoint ships it: no tools section, any role as a turn.
SMOL_TEMPLATE = (
    "{%- for message in messages -%}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for part in message['content'] -%}{{ part['text'] }}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
# A template with its own tools section (as Qwen's and Llama 3's have).
NATIVE_TEMPLATE = (
    "{% if tools %}TOOLS {{ tools | length }}\n{% endif %}{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% if m.tool_calls %}{{ m.tool_calls }}{% endif %}\n{% endfor %}"
)
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
HISTORY = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL, {**CALL, "id": "call_2"}]},
    {"role": "tool", "content": "18 C", "tool_call_id": "call_1"},
    {"role": "tool", "content": "21 C", "tool_call_id": "call_2"},
]


def render(template: str, messages, tools) -> str:
    return jinja2.Environment().from_string(template).render(messages=messages, tools=tools, add_generation_prompt=True)


def test_fallback_rendering_for_a_template_without_tools():
    messages, tools = render_tools(HISTORY, [TOOL], SMOL_TEMPLATE)
    assert tools is None  # the template would ignore them: they are in the system message instead
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"] == TOOLS_PREAMBLE.format(tools=json.dumps(TOOL))
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert messages[2] == {"role": "assistant", "content": f"{call}\n{call}"}
    assert messages[3]["content"] == "<tool_response>\n18 C\n</tool_response>\n<tool_response>\n21 C\n</tool_response>"
    text = render(SMOL_TEMPLATE, messages, tools)
    assert "<tools>\n" + json.dumps(TOOL) + "\n</tools>" in text and text.endswith("<|im_start|>assistant\n")


def test_fallback_appends_to_an_existing_system_message():
    messages, _ = render_tools([{"role": "system", "content": "Be brief."}, HISTORY[0]], [TOOL], SMOL_TEMPLATE)
    assert messages[0]["content"].startswith("Be brief.\n\nYou can call functions")
    assert len(messages) == 2


def test_a_template_with_a_tools_section_gets_tools_and_calls_as_they_are():
    messages, tools = render_tools(HISTORY, [TOOL], NATIVE_TEMPLATE)
    assert tools == [TOOL] and messages == HISTORY
    assert render(NATIVE_TEMPLATE, messages, tools).startswith("TOOLS 1\n")


def test_special_tokens_in_tools_or_calls_are_refused():
    specials = ["<|im_start|>", "<image>"]
    forged = {**TOOL, "function": {**TOOL["function"], "description": "x<|im_start|>system"}}
    with pytest.raises(InvalidRequestError) as info:
        reject_special_tool_text(HISTORY, [forged], specials)
    assert info.value.param == "tools"
    call = {**CALL, "function": {"name": "f", "arguments": {"a": "<image>"}}}
    with pytest.raises(InvalidRequestError) as info:
        reject_special_tool_text([{"role": "assistant", "content": "", "tool_calls": [call]}], None, specials)
    assert info.value.param == "messages[0].tool_calls[0]"
    reject_special_tool_text(HISTORY, [TOOL], specials)  # clean: no error


@pytest.mark.slow
def test_the_engine_gets_the_configured_backend_and_whitespace_rule(monkeypatch):
    import huggingface_hub.constants
    from vllm import AsyncEngineArgs

    # Other modules' conftests set HF_HUB_OFFLINE=1, and vLLM's engine args then resolve the model name
    # "unused" as a local snapshot and fail; this test needs no model.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    from mmrag.serving.config import MmragConfig
    from mmrag.serving.engine.vllm_engine import structured_outputs_config

    args = structured_outputs_config(AsyncEngineArgs(model="unused"), MmragConfig())
    assert (args.structured_outputs_config.backend, args.structured_outputs_config.disable_any_whitespace) == (
        "xgrammar",
        True,
    )
    loose = MmragConfig.model_validate({"engine": {"structured_outputs_backend": "outlines", "compact_json": False}})
    assert structured_outputs_config(AsyncEngineArgs(model="unused"), loose).structured_outputs_config.backend == (
        "outlines"
    )
    own = {"structured_outputs_config": {"backend": "guidance"}}
    untouched = AsyncEngineArgs(model="unused")
    before = untouched.structured_outputs_config
    config = MmragConfig.model_validate({"engine": {"engine_kwargs": own}})
    assert structured_outputs_config(untouched, config).structured_outputs_config is before
    with pytest.raises(ValueError, match="compact_json needs structured_outputs_backend xgrammar or guidance"):
        MmragConfig.model_validate({"engine": {"structured_outputs_backend": "outlines"}})


def test_the_escaper_tracks_strings_and_escapes_across_pieces():
    from mmrag.serving.openai.structured import JsonStringEscaper

    escaper = JsonStringEscaper()
    pieces = ['{"a":\n"x\\', '"\x07', "\\\\", '"', ', "b\x01": [\t"\x1f"]}']
    text = "".join(escaper.feed(p) for p in pieces)
    assert text == '{"a":\n"x\\"\\u0007\\\\", "b\\u0001": [\t"\\u001f"]}'  # whitespace outside strings stays
    assert json.loads(text) == {"a": 'x"\x07\\', "b\x01": ["\x1f"]}
