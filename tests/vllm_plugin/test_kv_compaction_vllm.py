"""KV methods inside vLLM (scheduler + worker of :mod:`mmrag.serving.vllm_plugin.kv`) on the trained model.

- every registered KV method (:data:`mmrag.kernels.methods.KV_METHODS`), chosen per request on one engine,
  decodes as the reference engine running the same method (the grid);

- greedy tokens and their log-probabilities over 24 decode steps (past block boundaries: 32-token
  blocks) equal the reference engine running the same LOOK-M, in fp32; the same comparison against the
  reference engine *without* LOOK-M fails, so the check sees the compaction; requests that opt out decode
  as the reference engine without LOOK-M (compression off: the stock model's outputs);
- the scheduler frees the tail blocks after the prefill, and the pool gets exactly the blocks back;
- text-only prompts and requests that opt out keep their whole cache;
- every task family (text-only ones too) with compression off answers as the reference engine: the shipped
  model in vLLM with the same prompts as training;
- under block pressure vLLM preempts compacted requests; they re-prefill uncompacted, finish, and every
  block returns to the pool.

The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the tests can read the
scheduler's block pool.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from mmrag.kernels.methods import KV_METHODS, make_kv_method
from mmrag.kernels.methods.lookm import LookM
from mmrag.training.tasks import FAMILIES, make_task

pytestmark = pytest.mark.slow

BLOCK_SIZE = 32
STEPS = 24
SETTINGS = LookM(image_budget=0.25, score_from="chunked")
# fp32 both sides; measured max |difference| of the chosen tokens' log-probabilities: 1.2e-6 (vs 6.8e-2 without LOOK-M).
LOGPROB_ATOL = 1e-4


def _tasks():
    tasks = [make_task(family, i, split="heldout", max_images=4) for family in FAMILIES for i in range(2)]
    return [task for task in tasks if task.images]


def _lookm_llm(aim_keep_ratio: float = 1.0, aim_positions: str = "contiguous", **kwargs):
    """The trained model on vLLM with LOOK-M by default (the server's engine arguments for it), its engine
    core in this process (the tests read the scheduler)."""
    from vllm import LLM

    from mmrag.serving.config import MmragConfig
    from mmrag.serving.engine.args import engine_kwargs
    from mmrag.serving.models.trained import trained_model_path

    config = MmragConfig.model_validate(
        {
            "engine": {"max_model_len": 1024, "dtype": "float32", "engine_kwargs": {"block_size": BLOCK_SIZE}},
            "limits": {"max_images_per_request": 4},
            "compression": {
                "aim_keep_ratio": aim_keep_ratio,
                "aim_positions": aim_positions,
                "lookm": {"enabled": True, "image_budget": SETTINGS.image_budget},
            },
        }
    )
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        return LLM(**{**engine_kwargs(config, str(trained_model_path())), **kwargs})
    finally:
        if previous is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous


@pytest.fixture(scope="module")
def engine():
    llm = _lookm_llm()
    yield llm
    llm.llm_engine.engine_core.shutdown()


def _prompt(task, processor) -> dict:
    from PIL import Image

    from mmrag.training.tasks.chat import template_messages

    prompt = {"prompt": processor.apply_chat_template(template_messages(task), add_generation_prompt=True)}
    if task.images:
        prompt["multi_modal_data"] = {"image": [Image.fromarray(px) for px in task.images]}
    return prompt


def _generate(engine, prompts: list[dict], extra_args: dict | None = None):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True, logprobs=0, extra_args=extra_args)
    return engine.generate(prompts, params, use_tqdm=False)


def _chosen_logprobs(choice) -> torch.Tensor:
    return torch.tensor([choice.logprobs[i][t].logprob for i, t in enumerate(choice.token_ids)])


def _reference_logprobs(reference, task, tokenizer, steps: int) -> tuple[list[int], torch.Tensor]:
    from mmrag.training.data import encode_prompt, pixel_values

    ids = torch.tensor([encode_prompt(task, tokenizer, reference.model.config.image_seq_length)])
    out = reference.generate(ids, pixel_values(task.images), max_new_tokens=steps)
    logprobs = torch.log_softmax(out.logits.float(), dim=-1)
    return out.token_ids, logprobs[torch.arange(len(out.token_ids)), out.token_ids]


def test_decoding_matches_the_reference_engine_with_lookm(engine) -> None:
    from transformers import AutoProcessor

    from mmrag.kernels.reference.engine import ReferenceEngine, ReferenceMethods
    from mmrag.serving.models.trained import trained_model_path
    from mmrag.serving.vllm_plugin.kv.plan import request_extra_args

    path = trained_model_path()
    processor = AutoProcessor.from_pretrained(path)
    tasks = _tasks()
    prompts = [_prompt(task, processor) for task in tasks]
    compacted = _generate(engine, prompts)
    opted_out = _generate(engine, prompts, extra_args=request_extra_args(None))

    with_lookm = ReferenceEngine.from_pretrained(path, ReferenceMethods(kv=SETTINGS))
    without = ReferenceEngine.from_pretrained(path)
    diff = {"lookm": 0.0, "off": 0.0, "lookm vs full": 0.0}
    same = dict.fromkeys(diff, 0)
    for task, out, out_off in zip(tasks, compacted, opted_out, strict=True):
        choice, choice_off = out.outputs[0], out_off.outputs[0]
        tokens, expected = _reference_logprobs(with_lookm, task, processor.tokenizer, STEPS)
        full_tokens, full = _reference_logprobs(without, task, processor.tokenizer, STEPS)
        for name, got, want, want_tokens in (
            ("lookm", choice, expected, tokens),
            ("off", choice_off, full, full_tokens),
            ("lookm vs full", choice, full, full_tokens),
        ):
            if list(got.token_ids) == want_tokens:
                same[name] += 1
                diff[name] = max(diff[name], float((_chosen_logprobs(got) - want).abs().max()))
            else:
                diff[name] = math.inf
    print(f"same tokens {same} of {len(tasks)}; max |dlogprob| {diff}")
    assert same["lookm"] >= len(tasks) - 1 and same["off"] >= len(tasks) - 1
    assert diff["lookm"] < LOGPROB_ATOL and diff["off"] < LOGPROB_ATOL
    assert diff["lookm vs full"] > 10 * LOGPROB_ATOL  # the uncompressed model decodes measurably differently


def test_every_family_opted_out_answers_as_the_reference_engine(engine) -> None:
    """The shipped model's answers in vLLM, every family (text-only ones too) with compression off, are the
    reference engine's: the same prompts as training. (Stock vLLM's class on this checkpoint had a module and an
    engine start of its own; the plugin at ratio 1 is stock vLLM bit for bit, test_aim_vllm.py.) How often those
    answers are right is the accuracy tests' business."""
    from transformers import AutoProcessor
    from vllm import SamplingParams

    from mmrag.kernels.reference.engine import ReferenceEngine
    from mmrag.serving.models.trained import trained_model_path
    from mmrag.serving.vllm_plugin.kv.plan import request_extra_args
    from mmrag.training.data import encode_prompt, pixel_values

    path = trained_model_path()
    processor = AutoProcessor.from_pretrained(path)
    tokenizer = processor.tokenizer
    tasks = [make_task(family, i, split="heldout", max_images=4) for family in FAMILIES for i in range(2)]
    assert any(not task.images for task in tasks) and any(task.images for task in tasks)
    reference = ReferenceEngine.from_pretrained(path)
    expected = []
    for task in tasks:
        ids = torch.tensor([encode_prompt(task, tokenizer, reference.model.config.image_seq_length)])
        out = reference.generate(ids, pixel_values(task.images), max_new_tokens=8, eos_token_id=tokenizer.eos_token_id)
        expected.append(tokenizer.decode(out.token_ids, skip_special_tokens=True))
    params = SamplingParams(temperature=0.0, max_tokens=8, extra_args=request_extra_args(None))
    outs = engine.generate([_prompt(task, processor) for task in tasks], params, use_tqdm=False)
    pairs = list(zip([o.outputs[0].text for o in outs], expected, strict=True))
    print(pairs)
    assert sum(got == want for got, want in pairs) >= len(tasks) - 1, pairs


def _scheduler(engine):
    return engine.llm_engine.engine_core.engine_core.scheduler


def _prefill_one(engine, prompt: dict, extra_args: dict | None = None) -> tuple[int, int, str]:
    """Free blocks before, after the prefill step; the request id."""
    from vllm import SamplingParams

    pool = _scheduler(engine).kv_cache_manager.block_pool
    before = pool.get_num_free_blocks()
    request_id = f"r{before}-{len(prompt['prompt'])}-{extra_args}"
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, extra_args=extra_args)
    engine.llm_engine.add_request(request_id, prompt, params)
    engine.llm_engine.step()
    after = pool.get_num_free_blocks()
    while engine.llm_engine.has_unfinished_requests():
        engine.llm_engine.step()
    assert pool.get_num_free_blocks() == before  # everything back once the request finishes
    return before, after, request_id


def test_prefill_frees_the_tail_blocks(engine) -> None:
    from transformers import AutoProcessor

    from mmrag.serving.models.trained import trained_model_path
    from mmrag.serving.vllm_plugin.kv.plan import image_mask

    processor = AutoProcessor.from_pretrained(trained_model_path())
    task = max(_tasks(), key=lambda t: len(t.images))
    prompt = _prompt(task, processor)
    before, after, _ = _prefill_one(engine, prompt)
    prompt_len = len(processor(text=prompt["prompt"], images=prompt["multi_modal_data"]["image"])["input_ids"][0])
    image_tokens = len(task.images) * 16
    kept = prompt_len - image_tokens + math.ceil(image_tokens * SETTINGS.image_budget)
    assert SETTINGS.kept_count(image_mask(prompt_len, [(0, image_tokens)])) == kept
    # The prefill step holds ceil(L / bs) blocks until update_from_output; then ceil(kept / bs) remain.
    assert before - after == math.ceil(kept / BLOCK_SIZE) < math.ceil(prompt_len / BLOCK_SIZE)


def test_text_only_and_opted_out_requests_keep_their_cache(engine) -> None:
    from transformers import AutoProcessor

    from mmrag.serving.models.trained import trained_model_path
    from mmrag.serving.vllm_plugin.kv.plan import request_extra_args

    processor = AutoProcessor.from_pretrained(trained_model_path())
    task = max(_tasks(), key=lambda t: len(t.images))
    prompt = _prompt(task, processor)
    prompt_len = len(processor(text=prompt["prompt"], images=prompt["multi_modal_data"]["image"])["input_ids"][0])
    before, after, _ = _prefill_one(engine, prompt, extra_args=request_extra_args(None))
    assert before - after == math.ceil(prompt_len / BLOCK_SIZE)
    text = {"prompt": "USER: what is the colour of the sky?\nASSISTANT:" * 8}
    text_len = len(processor.tokenizer(text["prompt"])["input_ids"])
    before, after, _ = _prefill_one(engine, text)
    assert before - after == math.ceil(text_len / BLOCK_SIZE)
    assert not _scheduler(engine)._offsets


def _grid_method(name: str):
    """Every registered method at the same image budget; attention-ranked ones score from Q and K in row
    chunks on both sides (vLLM has no probabilities), so the two engines rank the same numbers."""
    import dataclasses

    method = make_kv_method(name, image_budget=SETTINGS.image_budget)
    if "score_from" in {f.name for f in dataclasses.fields(method)}:
        method = dataclasses.replace(method, score_from="chunked")
    return method


@pytest.mark.parametrize("name", sorted(KV_METHODS))
def test_every_registered_kv_method_is_served_per_request_as_the_reference_engine_runs_it(engine, name) -> None:
    """One engine (deployment default LOOK-M); each request names its method in ``extra_args``. (Before the
    tests that start engines of their own: shutting one down tears down the process's parallel groups.)"""
    from transformers import AutoProcessor

    from mmrag.kernels.reference.engine import ReferenceEngine, ReferenceMethods
    from mmrag.serving.models.trained import trained_model_path
    from mmrag.serving.vllm_plugin.kv.plan import request_extra_args

    path = trained_model_path()
    processor = AutoProcessor.from_pretrained(path)
    tasks = _tasks()
    method = _grid_method(name)
    outs = _generate(engine, [_prompt(task, processor) for task in tasks], extra_args=request_extra_args(method))
    reference = ReferenceEngine.from_pretrained(path, ReferenceMethods(kv=method))
    full = ReferenceEngine.from_pretrained(path)
    same, diff, differs_from_full = 0, 0.0, 0
    for task, out in zip(tasks, outs, strict=True):
        choice = out.outputs[0]
        tokens, expected = _reference_logprobs(reference, task, processor.tokenizer, STEPS)
        full_tokens, full_logprobs = _reference_logprobs(full, task, processor.tokenizer, STEPS)
        if list(choice.token_ids) == tokens:
            same += 1
            diff = max(diff, float((_chosen_logprobs(choice) - expected).abs().max()))
        if list(choice.token_ids) != full_tokens or float((_chosen_logprobs(choice) - full_logprobs).abs().max()) > (
            10 * LOGPROB_ATOL
        ):
            differs_from_full += 1
    print(
        f"{name}: same tokens {same} of {len(tasks)}; max |dlogprob| {diff:.3g}; differs from full {differs_from_full}"
    )
    assert same >= len(tasks) - 1 and diff < LOGPROB_ATOL
    assert differs_from_full > 0  # the method acted: the full cache decodes measurably differently


def test_preempted_requests_recompute_and_return_every_block() -> None:
    """A pool of 14 blocks (13 usable: 416 tokens), 8 image prompts decoding 96 tokens each: vLLM must preempt."""
    from transformers import AutoProcessor
    from vllm import SamplingParams

    from mmrag.serving.models.trained import trained_model_path

    llm = _lookm_llm(num_gpu_blocks_override=14, max_model_len=384)
    try:
        scheduler = _scheduler(llm)
        preempted: list[bool] = []  # per preemption: was the request compacted?
        preempt = scheduler._preempt_request

        def counting_preempt(request, *args, **kwargs):
            preempted.append(request.request_id in scheduler._offsets)
            return preempt(request, *args, **kwargs)

        scheduler._preempt_request = counting_preempt
        processor = AutoProcessor.from_pretrained(trained_model_path())
        prompts = [_prompt(task, processor) for task in _tasks()[:8]]
        params = SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert any(preempted), f"the pool was meant to force preemption of compacted requests: {preempted}"
        assert all(len(o.outputs[0].token_ids) == 96 for o in outputs)
        pool = scheduler.kv_cache_manager.block_pool
        assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # all but vLLM's null block
        assert not scheduler._offsets and not scheduler._planned
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_aim_spread_then_lookm_matches_the_reference_engine() -> None:
    """AIM 1/2 with spread positions in front of LOOK-M: positions come from vLLM's M-RoPE table, slots from
    the token index LOOK-M shifts, so the two compose; the reference engine running both is the oracle."""
    from transformers import AutoProcessor

    from mmrag.kernels.methods.aim import AIMMerge
    from mmrag.kernels.reference.engine import ReferenceEngine, ReferenceMethods
    from mmrag.serving.models.trained import trained_model_path

    path = trained_model_path()
    llm = _lookm_llm(aim_keep_ratio=0.5, aim_positions="spread")
    try:
        processor = AutoProcessor.from_pretrained(path)
        tasks = _tasks()
        outs = _generate(llm, [_prompt(task, processor) for task in tasks])
    finally:
        llm.llm_engine.engine_core.shutdown()
    merge = AIMMerge(num_passes=1, positions="spread")
    both = ReferenceEngine.from_pretrained(path, ReferenceMethods(merge=merge, kv=SETTINGS))
    contiguous = ReferenceEngine.from_pretrained(path, ReferenceMethods(merge=AIMMerge(num_passes=1), kv=SETTINGS))
    same, diff, same_as_contiguous = 0, 0.0, 0
    for task, out in zip(tasks, outs, strict=True):
        tokens, expected = _reference_logprobs(both, task, processor.tokenizer, STEPS)
        same_as_contiguous += (
            list(out.outputs[0].token_ids) == _reference_logprobs(contiguous, task, processor.tokenizer, STEPS)[0]
        )
        if list(out.outputs[0].token_ids) == tokens:
            same += 1
            diff = max(diff, float((_chosen_logprobs(out.outputs[0]) - expected).abs().max()))
    print(f"same tokens {same} of {len(tasks)} (contiguous: {same_as_contiguous}); max |dlogprob| {diff:.3g}")
    assert same >= len(tasks) - 1 and diff < LOGPROB_ATOL
    assert same_as_contiguous < same  # the positions are seen: contiguous ones decode otherwise
