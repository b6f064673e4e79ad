"""Qwen2.5-VL through the plugin (``AimQwen2_5_VL`` + the KV worker), on the tiny random Qwen2.5-VL, fp32.

- stock vLLM serves the checkpoint natively and answers an image chat;
- at keep ratio 1 the plugin's prompts, greedy tokens and log-probabilities equal stock vLLM's, bit for bit;
- AIM (ratios 1/2 and 1/4, per request) shrinks each image, and each frame of a video, to ``ceil(T x ratio)``
  placeholders and decodes as
  the reference (transformers' Qwen2.5-VL with the same merge and positions, derived with its own
  ``get_rope_index``), for both position layouts, which decode differently from each other;
- LOOK-M (per request) keeps the planned count, frees the tail blocks, and decodes as the reference over
  the kept entries; text-only prompts keep their cache.

One stock engine (started, used and shut down first) and one plugin engine, whose core runs in this process
so that the tests can read its scheduler.
"""

from __future__ import annotations

import functools
import math

import pytest

from mmrag.kernels.methods.lookm import LookM
from tests.vllm_plugin import parity
from tests.vllm_plugin.conftest import noise_picture
from tests.vllm_plugin.parity import BLOCK_SIZE, LOGPROB_ATOL

pytestmark = pytest.mark.slow

STEPS = 12
LOOKM = LookM(image_budget=0.25, score_from="chunked")
# (text, image sizes, video): 112x112 is a 4x4 grid of 16 visual tokens, 112x168 4x6 (24), 56x56 2x2 (4); the
# video is 4 frames of 56x84, 2 temporal patches of 2x3 = 6 tokens each (12), at 2 frames a second.
VIDEO = (4, 56, 84)
PROMPTS = [
    ("Describe the picture.", [(112, 112)], False),
    ("Which of the two is brighter?", [(112, 112), (112, 168)], False),
    ("and this one, small", [(56, 56), (168, 112)], False),
    ("three of them: list them", [(112, 168), (56, 112), (112, 112)], False),
    ("the picture, then the clip", [(56, 112)], True),
]
TEXT_ONLY = "no image here, just text"


def _messages(text: str, sizes: list[tuple[int, int]], video: bool) -> list[dict]:
    parts = [{"type": "image"} for _ in sizes] + ([{"type": "video"}] if video else [])
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def _video(seed: int):
    import numpy as np

    frames = np.random.default_rng(seed).integers(0, 256, (*VIDEO, 3), dtype=np.uint8)
    metadata = {"fps": 2.0, "duration": VIDEO[0] / 2.0, "total_num_frames": VIDEO[0]}
    return frames, {**metadata, "frames_indices": list(range(VIDEO[0])), "video_backend": "opencv"}


def _prompts(path, mm_kwargs: dict | None = None) -> list[dict]:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    prompts = []
    for i, (text, sizes, video) in enumerate(PROMPTS):
        prompt = {
            "prompt": processor.apply_chat_template(_messages(text, sizes, video), add_generation_prompt=True),
            "multi_modal_data": {
                "image": parity.noise_pictures(sizes, 10 * i),
                **({"video": [_video(i)]} if video else {}),
            },
        }
        if mm_kwargs:
            prompt["mm_processor_kwargs"] = mm_kwargs
        prompts.append(prompt)
    return prompts


def _params(extra_args: dict | None = None):
    return parity.greedy_params(STEPS, extra_args)


def _engine_kwargs(path, **compression) -> dict:
    return parity.parity_engine_kwargs(
        path,
        compression,
        limit_mm_per_prompt={"image": 4, "video": 1},
        mm_processor_kwargs={"do_sample_frames": False},  # every frame given is a frame
    )


@pytest.fixture(scope="module")
def stock_outputs(tiny_qwen_vl_path):
    """Stock vLLM (its own Qwen2.5-VL class) on PROMPTS and an image chat; shut down before the plugin starts."""
    kwargs = parity.without_plugin(_engine_kwargs(tiny_qwen_vl_path, lookm={"enabled": True}))
    with parity.in_process_llm(kwargs) as llm:
        outputs = llm.generate(_prompts(tiny_qwen_vl_path), _params(), use_tqdm=False)
        image = noise_picture(99, 112, 112)
        chat = [
            {"role": "user", "content": [{"type": "image_pil", "image_pil": image}, {"type": "text", "text": "hi"}]}
        ]
        (answer,) = llm.chat(chat, _params(), use_tqdm=False)
        return outputs, answer, llm.llm_engine.model_config.architectures


@pytest.fixture(scope="module")
def engine(tiny_qwen_vl_path, stock_outputs):
    """The plugin, AIM at deployment ratio 1 (requests choose theirs)."""
    yield from parity.plugin_engine(_engine_kwargs(tiny_qwen_vl_path, lookm={"enabled": True, "image_budget": 0.25}))


@pytest.fixture(scope="module")
def reference(tiny_qwen_vl_path):
    """``reference(index, **settings)``: the reference's greedy decoding of ``PROMPTS[index]``."""
    from mmrag.kernels.reference.qwen_vl import QwenReference

    processor, model = parity.processor_and_model(QwenReference, tiny_qwen_vl_path)

    def run(index: int, **settings):
        from transformers.video_utils import VideoMetadata

        text, sizes, video = PROMPTS[index]
        prompt = processor.apply_chat_template(_messages(text, sizes, video), add_generation_prompt=True)
        videos = {}
        if video:
            frames, metadata = _video(index)
            fields = ("fps", "duration", "total_num_frames", "frames_indices")
            videos = {"videos": [frames], "video_metadata": [VideoMetadata(**{k: metadata[k] for k in fields})]}
        inputs = processor(
            text=[prompt],
            images=parity.noise_pictures(sizes, 10 * index),
            return_tensors="pt",
            do_sample_frames=False,
            **videos,
        )
        engine = QwenReference(model, **settings)
        return engine.generate(
            inputs["input_ids"][0],
            inputs["pixel_values"],
            inputs["image_grid_thw"],
            STEPS,
            pixel_values_videos=inputs.get("pixel_values_videos"),
            video_grid_thw=inputs.get("video_grid_thw"),
            second_per_grid_ts=inputs.get("second_per_grid_ts"),
        )

    return run


def test_stock_vllm_serves_the_checkpoint_natively(stock_outputs) -> None:
    _, answer, architecture = stock_outputs
    assert architecture == ["Qwen2_5_VLForConditionalGeneration"]
    assert len(answer.outputs[0].token_ids) == STEPS
    assert answer.prompt_token_ids.count(5) == 16  # <|image_pad|> x 16: a 112x112 image after the 2x2 merger


def test_plugin_at_ratio_one_is_stock_vllm(engine, stock_outputs, tiny_qwen_vl_path) -> None:
    from mmrag.serving.vllm_plugin.qwen_vl import AimQwen2_5_VL

    assert engine.llm_engine.model_config.architectures == ["AimQwen2_5_VLForConditionalGeneration"]
    assert engine.apply_model(type) == [AimQwen2_5_VL]
    stock, _, _ = stock_outputs
    for mm_kwargs in (None, {"aim_keep_ratio": 1.0, "aim_positions": "spread"}):
        got = engine.generate(_prompts(tiny_qwen_vl_path, mm_kwargs), _params(), use_tqdm=False)
        for want, have in zip(stock, got, strict=True):
            assert have.prompt_token_ids == want.prompt_token_ids
            assert have.outputs[0].token_ids == want.outputs[0].token_ids
            diff = (parity.chosen_logprobs(have.outputs[0]) - parity.chosen_logprobs(want.outputs[0])).abs().max()
            assert diff == 0, f"log-probabilities differ by {diff:.3g}"


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_prompt_shrinks_to_ceil_of_each_image(engine, stock_outputs, tiny_qwen_vl_path, ratio: float) -> None:
    stock, _, _ = stock_outputs
    got = engine.generate(_prompts(tiny_qwen_vl_path, {"aim_keep_ratio": ratio}), _params(), use_tqdm=False)
    info = engine.llm_engine.renderer.get_mm_processor().info  # the server's "visual_tokens_before"
    for (_, sizes, video), want, have in zip(PROMPTS, stock, got, strict=True):
        tokens = [(h // 28) * (w // 28) for h, w in sizes]
        assert [info.get_full_image_tokens(image_width=w, image_height=h) for h, w in sizes] == tokens
        # The server's prompt budget asks with LLaVA's signature (serving/engine/prompt.py).
        kept = [info.get_num_image_tokens(image_width=w, image_height=h, keep_ratio=ratio) for h, w in sizes]
        assert kept == [math.ceil(t * ratio) for t in tokens]
        assert want.prompt_token_ids.count(5) == sum(tokens)
        assert have.prompt_token_ids.count(5) == sum(math.ceil(t * ratio) for t in tokens)
        # A video: each of its frames (temporal patches) is merged on its own.
        frames, per_frame = (VIDEO[0] // 2, (VIDEO[1] // 28) * (VIDEO[2] // 28)) if video else (0, 0)
        assert want.prompt_token_ids.count(6) == frames * per_frame
        assert have.prompt_token_ids.count(6) == frames * math.ceil(per_frame * ratio)
        removed = sum(t - math.ceil(t * ratio) for t in tokens) + frames * (per_frame - math.ceil(per_frame * ratio))
        assert len(have.prompt_token_ids) == len(want.prompt_token_ids) - removed


@pytest.mark.parametrize("layout", ["contiguous", "spread"])
def test_aim_decodes_as_the_reference(engine, reference, tiny_qwen_vl_path, layout: str) -> None:
    """Ratios 1/2 and 1/4 (one and two halving passes), every prompt: same tokens, log-probabilities within
    fp32 noise. The other layout's reference decodes otherwise on most prompts: the positions are seen."""
    other = "spread" if layout == "contiguous" else "contiguous"
    agreement, differs = parity.Agreement(), 0
    for ratio, passes in ((0.5, 1), (0.25, 2)):
        mm_kwargs = {"aim_keep_ratio": ratio, "aim_positions": layout}
        outs = engine.generate(_prompts(tiny_qwen_vl_path, mm_kwargs), _params(), use_tqdm=False)
        for index, out in enumerate(outs):
            expected = reference(index, merge_passes=passes, layout=layout)
            assert len(out.prompt_token_ids) == expected.prompt_len
            agreement.add((ratio, index), out.outputs[0], expected)
            alternative = reference(index, merge_passes=passes, layout=other)
            differs += alternative.token_ids != expected.token_ids
    same, diff = agreement.same, agreement.max_diff
    print(f"{layout}: same tokens {same} of {2 * len(PROMPTS)}; max |dlogprob| {diff:.3g}; {other} differs {differs}")
    print(f"{layout}: (ratio, prompt, vLLM, reference) where the tokens differ: {agreement.mismatched}")
    assert same >= 2 * len(PROMPTS) - 1 and diff < LOGPROB_ATOL
    assert differs >= len(PROMPTS)


def test_lookm_decodes_as_the_reference(engine, reference, tiny_qwen_vl_path) -> None:
    """Per request (``extra_args``), at ratio 1 and after AIM 1/2: the reference runs the same method over its
    own cache; the kept count is the plan's, and the uncompacted reference decodes otherwise."""
    from mmrag.serving.vllm_plugin.kv.plan import request_extra_args

    prompts, params = functools.partial(_prompts, tiny_qwen_vl_path), _params(request_extra_args(LOOKM))
    # Video frames are image entries to LOOK-M: <|image_pad|> (5) and <|video_pad|> (6).
    agreement, differs = parity.lookm_against_reference(engine, prompts, params, reference, LOOKM, (5, 6))
    assert agreement.same >= agreement.total - 1 and agreement.max_diff < LOGPROB_ATOL
    assert differs > 0


def test_lookm_frees_the_tail_blocks(engine, tiny_qwen_vl_path) -> None:
    """One request: the prefill step keeps ``ceil(kept / block)`` blocks; a text-only prompt keeps all."""
    from vllm import SamplingParams

    from mmrag.serving.vllm_plugin.kv.plan import image_mask, image_spans, request_extra_args

    pool = parity.scheduler(engine).kv_cache_manager.block_pool
    prompt = _prompts(tiny_qwen_vl_path)[3]
    text = {"prompt": f"<|im_start|>user\n{TEXT_ONLY * 4}<|im_end|>\n<|im_start|>assistant\n"}
    for name, request, compacted in (("image", prompt, True), ("text", text, False)):
        before = pool.get_num_free_blocks()
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, extra_args=request_extra_args(LOOKM))
        engine.llm_engine.add_request(name, request, params)
        engine.llm_engine.step()
        (state,) = parity.scheduler(engine).requests.values()
        length = state.num_prompt_tokens
        kept = LOOKM.kept_count(image_mask(length, image_spans(state.mm_features))) if compacted else length
        assert before - pool.get_num_free_blocks() == math.ceil(kept / BLOCK_SIZE)
        if compacted:
            assert kept < length and math.ceil(kept / BLOCK_SIZE) < math.ceil(length / BLOCK_SIZE)
        while engine.llm_engine.has_unfinished_requests():
            engine.llm_engine.step()
        assert pool.get_num_free_blocks() == before
