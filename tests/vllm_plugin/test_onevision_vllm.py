"""LLaVA-OneVision through the plugin (``AimLlavaOnevision`` + the KV worker), on the tiny random
LLaVA-OneVision, fp32.

- stock vLLM serves the checkpoint natively (anyres: base view, unpadded tile grid, one newline per row);
- at keep ratio 1 the plugin's prompts, greedy tokens and log-probabilities equal stock vLLM's, bit for bit;
- AIM (ratios 1/2 and 1/4, per request) shrinks each image's packed tokens, newlines included, to
  ``ceil(T x ratio)`` placeholders and decodes as the reference (transformers' LLaVA-OneVision with AIM's
  merge of the same packed tokens);
- LOOK-M (per request) keeps the planned count of the image spans vLLM's multimodal features give, frees
  the tail blocks, and decodes as the reference over the kept entries;
- with ``aim_positions: spread`` (the Qwen2 LM on vLLM's M-RoPE path, three equal rows) ratio 1 decodes as
  stock, and each merged image laid over its packed span decodes as the reference with the same layout;
- ``mmrag models`` names the checkpoint, every file a pure function of the seed, and the engine arguments put
  it on the plugin's class.

One stock engine (started, used and shut down first), one plugin engine, whose core runs in this process so
that the tests can read its scheduler, and one plugin engine with spread positions (started last); few
prompts and few tokens (CI time).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from mmrag.kernels.methods.lookm import LookM
from tests.vllm_plugin import parity
from tests.vllm_plugin.parity import BLOCK_SIZE, LOGPROB_ATOL

pytestmark = pytest.mark.slow

STEPS = 6
IMAGE = 3  # <image> in the tiny LLaVA-OneVision's vocabulary
LOOKM = LookM(image_budget=0.25, score_from="chunked")
# (text, image sizes (height, width)): 112x112 is the base view's 16 tokens + an 8x8 tile grid + 8 newlines (88);
# 84x112 is unpadded to 6x8 rows (16 + 48 + 6 = 70); 56x56 one tile (16 + 16 + 4 = 36); 56x112 1x2 tiles (52).
PROMPTS = [
    ("Describe the picture.", [(112, 112)]),
    ("Which of the two is brighter?", [(84, 112), (56, 56)]),
    ("and this one, wide", [(56, 112)]),
]
STOCK_TOKENS = [[88], [70, 36], [52]]


@pytest.fixture(scope="module")
def tiny_onevision_path(tmp_path_factory: pytest.TempPathFactory):
    from mmrag.serving.models.tiny_onevision import make_tiny_onevision

    return make_tiny_onevision(tmp_path_factory.mktemp("tiny-onevision"))


def _messages(text: str, sizes: list[tuple[int, int]]) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image"} for _ in sizes), {"type": "text", "text": text}]}]


def _prompts(path, mm_kwargs: dict | None = None) -> list[dict]:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    prompts = []
    for i, (text, sizes) in enumerate(PROMPTS):
        prompt = {
            "prompt": processor.apply_chat_template(_messages(text, sizes), add_generation_prompt=True),
            "multi_modal_data": {"image": parity.noise_pictures(sizes, 10 * i)},
        }
        if mm_kwargs:
            prompt["mm_processor_kwargs"] = mm_kwargs
        prompts.append(prompt)
    return prompts


def _params(extra_args: dict | None = None):
    return parity.greedy_params(STEPS, extra_args)


def _engine_kwargs(path, **compression) -> dict:
    return parity.parity_engine_kwargs(path, compression, limit_mm_per_prompt={"image": 2, "video": 0})


@pytest.fixture(scope="module")
def stock_outputs(tiny_onevision_path):
    """Stock vLLM (its own LLaVA-OneVision class) on PROMPTS; shut down before the plugin starts."""
    kwargs = parity.without_plugin(_engine_kwargs(tiny_onevision_path, lookm={"enabled": True}))
    with parity.in_process_llm(kwargs) as llm:
        outputs = llm.generate(_prompts(tiny_onevision_path), _params(), use_tqdm=False)
        return outputs, llm.llm_engine.model_config.architectures


@pytest.fixture(scope="module")
def engine(tiny_onevision_path, stock_outputs):
    """The plugin, AIM at deployment ratio 1 (requests choose theirs)."""
    yield from parity.plugin_engine(_engine_kwargs(tiny_onevision_path, lookm={"enabled": True, "image_budget": 0.25}))


@pytest.fixture(scope="module")
def reference(tiny_onevision_path):
    """``reference(index, **settings)``: the reference's greedy decoding of ``PROMPTS[index]``."""
    from mmrag.kernels.reference.onevision import OnevisionReference

    processor, model = parity.processor_and_model(OnevisionReference, tiny_onevision_path)

    def run(index: int, **settings):
        text, sizes = PROMPTS[index]
        prompt = processor.apply_chat_template(_messages(text, sizes), add_generation_prompt=True)
        pixels = processor.image_processor(parity.noise_pictures(sizes, 10 * index), return_tensors="pt")
        ids = torch.tensor(processor.tokenizer(prompt)["input_ids"])  # one <image> per image, unexpanded
        engine = OnevisionReference(model, **settings)
        return engine.generate(ids, pixels["pixel_values"], pixels["image_sizes"], STEPS)

    return run


def test_stock_vllm_serves_the_checkpoint_natively(stock_outputs, reference) -> None:
    outputs, architecture = stock_outputs
    assert architecture == ["LlavaOnevisionForConditionalGeneration"]
    for index, (out, tokens) in enumerate(zip(outputs, STOCK_TOKENS, strict=True)):
        assert out.prompt_token_ids.count(IMAGE) == sum(tokens)
        assert len(out.outputs[0].token_ids) == STEPS
        # The reference packs the same tokens per image (its own transformers code) and decodes alike.
        expected = reference(index)
        assert expected.image_tokens == tokens and expected.prompt_len == len(out.prompt_token_ids)
        assert list(out.outputs[0].token_ids) == expected.token_ids
        assert float((parity.chosen_logprobs(out.outputs[0]) - expected.logprobs).abs().max()) < LOGPROB_ATOL


def test_plugin_at_ratio_one_is_stock_vllm(engine, stock_outputs, tiny_onevision_path) -> None:
    from mmrag.serving.vllm_plugin.onevision import AimLlavaOnevision

    assert engine.llm_engine.model_config.architectures == ["AimLlavaOnevisionForConditionalGeneration"]
    assert engine.apply_model(type) == [AimLlavaOnevision]
    stock, _ = stock_outputs
    got = engine.generate(_prompts(tiny_onevision_path, {"aim_keep_ratio": 1.0}), _params(), use_tqdm=False)
    for want, have in zip(stock, got, strict=True):
        assert have.prompt_token_ids == want.prompt_token_ids
        assert have.outputs[0].token_ids == want.outputs[0].token_ids
        diff = (parity.chosen_logprobs(have.outputs[0]) - parity.chosen_logprobs(want.outputs[0])).abs().max()
        assert diff == 0, f"log-probabilities differ by {diff:.3g}"


def test_aim_shrinks_each_image_and_decodes_as_the_reference(engine, stock_outputs, reference, tiny_onevision_path):
    """Ratios 1/2 and 1/4 (one and two halving passes), every prompt: ``ceil(T x ratio)`` placeholders per
    image, the same tokens as the reference, log-probabilities within fp32 noise; the merge is seen (the
    merged prompts decode otherwise than the unmerged ones)."""
    stock, _ = stock_outputs
    info = engine.llm_engine.renderer.get_mm_processor().info  # the server's "visual_tokens_before"
    agreement, changed = parity.Agreement(), 0
    for ratio, passes in ((0.5, 1), (0.25, 2)):
        outs = engine.generate(_prompts(tiny_onevision_path, {"aim_keep_ratio": ratio}), _params(), use_tqdm=False)
        for index, ((_, sizes), tokens, want, out) in enumerate(zip(PROMPTS, STOCK_TOKENS, stock, outs, strict=True)):
            assert [info.get_full_image_tokens(image_width=w, image_height=h) for h, w in sizes] == tokens
            kept = [math.ceil(t * ratio) for t in tokens]
            budget = [info.get_num_image_tokens(image_width=w, image_height=h, keep_ratio=ratio) for h, w in sizes]
            assert budget == kept  # the server's prompt budget asks with LLaVA's signature
            assert out.prompt_token_ids.count(IMAGE) == sum(kept)
            assert len(out.prompt_token_ids) == len(want.prompt_token_ids) - sum(tokens) + sum(kept)
            expected = reference(index, merge_passes=passes)
            assert expected.image_tokens == kept and expected.prompt_len == len(out.prompt_token_ids)
            agreement.add((ratio, index), out.outputs[0], expected)
            changed += list(out.outputs[0].token_ids) != list(want.outputs[0].token_ids)
    same, diff = agreement.same, agreement.max_diff
    print(f"AIM: same tokens {same} of {agreement.total}; max |dlogprob| {diff:.3g}; differs from stock {changed}")
    print(f"AIM: (ratio, prompt, vLLM, reference) where the tokens differ: {agreement.mismatched}")
    assert same == 2 * len(PROMPTS) and diff < LOGPROB_ATOL
    assert changed >= len(PROMPTS)


def test_lookm_decodes_as_the_reference(engine, reference, tiny_onevision_path) -> None:
    """Per request (``extra_args``), at ratio 1 and after AIM 1/2: the reference runs the same method over its
    own cache; the kept count is the plan's, and the uncompacted reference decodes otherwise."""
    from mmrag.serving.vllm_plugin.kv.plan import request_extra_args

    prompts, params = functools.partial(_prompts, tiny_onevision_path), _params(request_extra_args(LOOKM))
    agreement, differs = parity.lookm_against_reference(engine, prompts, params, reference, LOOKM, (IMAGE,))
    assert agreement.same == agreement.total and agreement.max_diff < LOGPROB_ATOL
    assert differs > 0


def test_lookm_keeps_the_planned_blocks(engine, tiny_onevision_path) -> None:
    """One request of two images (tiles and newlines in vLLM's image spans): the prefill step keeps
    ``ceil(kept / block)`` blocks, fewer than the prompt's, and all come back when it ends."""
    from vllm import SamplingParams

    from mmrag.serving.vllm_plugin.kv.plan import image_mask, image_spans, request_extra_args

    pool = parity.scheduler(engine).kv_cache_manager.block_pool
    before = pool.get_num_free_blocks()
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, extra_args=request_extra_args(LOOKM))
    engine.llm_engine.add_request("two-images", _prompts(tiny_onevision_path)[1], params)
    engine.llm_engine.step()
    (state,) = parity.scheduler(engine).requests.values()
    spans = image_spans(state.mm_features)
    assert [length for _, length in spans] == STOCK_TOKENS[1]
    assert all(state.prompt_token_ids[o : o + n] == [IMAGE] * n for o, n in spans)
    length = state.num_prompt_tokens
    kept = LOOKM.kept_count(image_mask(length, spans))
    assert kept == length - sum(STOCK_TOKENS[1]) + math.ceil(sum(STOCK_TOKENS[1]) * LOOKM.image_budget)
    assert before - pool.get_num_free_blocks() == math.ceil(kept / BLOCK_SIZE) < math.ceil(length / BLOCK_SIZE)
    while engine.llm_engine.has_unfinished_requests():
        engine.llm_engine.step()
    assert pool.get_num_free_blocks() == before


@pytest.fixture(scope="module")
def spread_engine(tiny_onevision_path, engine):
    """The plugin with spread positions (a deployment setting: the LM's RoPE section); AIM per request."""
    yield from parity.plugin_engine(_engine_kwargs(tiny_onevision_path, aim_positions="spread"))


def test_spread_positions_decode_as_the_reference(spread_engine, stock_outputs, reference, tiny_onevision_path):
    """Ratio 1 on the M-RoPE path is plain RoPE (stock's tokens); at 1/2 and 1/4 every prompt decodes as the
    reference laying each merged image over its packed span, and the layout is seen (some decoding differs from
    the contiguous reference's)."""
    stock, _ = stock_outputs
    outs = spread_engine.generate(_prompts(tiny_onevision_path, {"aim_keep_ratio": 1.0}), _params(), use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == [list(w.outputs[0].token_ids) for w in stock]
    agreement, differs = parity.Agreement(), 0
    for ratio, passes in ((0.5, 1), (0.25, 2)):
        outs = spread_engine.generate(
            _prompts(tiny_onevision_path, {"aim_keep_ratio": ratio}), _params(), use_tqdm=False
        )
        for index, out in enumerate(outs):
            expected = reference(index, merge_passes=passes, positions="spread")
            assert expected.prompt_len == len(out.prompt_token_ids)
            agreement.add((ratio, index), out.outputs[0], expected)
            differs += expected.token_ids != reference(index, merge_passes=passes).token_ids
    print(f"spread: same tokens {agreement.same} of {agreement.total}; max |dlogprob| {agreement.max_diff:.3g}")
    print(f"spread: (ratio, prompt, vLLM, reference) where the tokens differ: {agreement.mismatched}")
    assert agreement.same == agreement.total and agreement.max_diff < LOGPROB_ATOL
    assert differs > 0


def test_registered_and_served_by_the_plugin(tiny_onevision_path) -> None:
    import json

    from mmrag.serving.config import MmragConfig
    from mmrag.serving.engine.args import aim_enabled
    from mmrag.serving.models.registry import MODELS
    from mmrag.serving.vllm_plugin.aim import aim_overrides

    assert MODELS["tiny-llava-onevision"].multimodal
    config = json.loads((tiny_onevision_path / "config.json").read_text())
    assert config["architectures"] == ["LlavaOnevisionForConditionalGeneration"]
    assert (
        config["vision_config"]["model_type"] == "siglip_vision_model"
        and config["text_config"]["model_type"] == "qwen2"
    )
    assert aim_enabled(MmragConfig.model_validate({"compression": {"aim_keep_ratio": 0.5}}), str(tiny_onevision_path))
    assert aim_overrides(tiny_onevision_path, 0.5) == {
        "architectures": ["AimLlavaOnevisionForConditionalGeneration"],
        "aim_keep_ratio": 0.5,
    }
    spread = aim_overrides(tiny_onevision_path, 0.5, "spread")
    assert spread["text_config"]["rope_parameters"]["mrope_section"]  # the LM's RoPE, on vLLM's M-RoPE path


def test_checkpoint_is_a_pure_function_of_the_seed(tmp_path, tiny_onevision_path) -> None:
    from mmrag.serving.models.tiny_onevision import make_tiny_onevision

    again = make_tiny_onevision(tmp_path / "again")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "processor_config.json"):
        assert (again / name).read_bytes() == (tiny_onevision_path / name).read_bytes()
