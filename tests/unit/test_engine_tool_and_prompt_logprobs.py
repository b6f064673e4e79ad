"""What the vLLM engine does with the sampling fields tool_choice auto and legacy echo add (no engine start): the
parser's ``skip_special_tokens`` and the prompt log-probabilities reach vLLM's ``SamplingParams``, and vLLM's
prompt log-probabilities (None first) become ours with the first token named by the tokenizer.

``slow``: the first test pays for importing vLLM (seconds on an idle machine, nothing once another test has)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from mmrag.serving.engine.protocol import SamplingOptions

pytestmark = pytest.mark.slow


def test_parser_and_echo_fields_reach_vllms_sampling_params():
    from mmrag.serving.engine.vllm_engine import VllmEngine

    params = VllmEngine._build_sampling_params(SamplingOptions(skip_special_tokens=False, prompt_logprobs=2), 8, None)
    assert (params.skip_special_tokens, params.prompt_logprobs) == (False, 2)
    default = VllmEngine._build_sampling_params(SamplingOptions(), 8, None)
    assert (default.skip_special_tokens, default.prompt_logprobs) == (True, None)


def test_prompt_logprobs_become_ours_with_the_first_token_named():
    from vllm.logprobs import Logprob

    from mmrag.serving.engine.vllm_engine import VllmEngine

    engine = VllmEngine.__new__(VllmEngine)
    engine._llm = SimpleNamespace(get_tokenizer=lambda: SimpleNamespace(decode=lambda ids: f"<{ids[0]}>"))
    output = SimpleNamespace(
        prompt_token_ids=[5, 6, 7],
        prompt_logprobs=[
            None,
            {6: Logprob(-1.5, rank=3, decoded_token=" b"), 9: Logprob(-0.5, rank=1, decoded_token=" z")},
            {7: Logprob(-0.2, rank=1, decoded_token=" c")},
        ],
    )
    first, second, third = engine._prompt_logprobs(output, 1)
    assert first.token == "<5>" and math.isnan(first.logprob) and first.top == ()
    assert (second.token, second.logprob, second.top) == (" b", -1.5, ((" z", -0.5),))  # the top 1, not the sampled
    assert (third.token, third.logprob, third.top) == (" c", -0.2, ((" c", -0.2),))
