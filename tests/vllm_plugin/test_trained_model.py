"""The shipped trained model served by stock vLLM: same prompts as training, same answers as the
reference engine (fp32 there, bf16 in vLLM: a near tie may flip, so one disagreement is allowed).
How often those answers are right is the accuracy tests' business (tests/training, tests/e2e)."""

from __future__ import annotations

import os

import pytest
import torch

from mmrag.training.tasks import FAMILIES, make_task

pytestmark = pytest.mark.slow


def test_vllm_answers_like_the_reference_engine() -> None:
    from PIL import Image
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from mmrag.kernels.reference.engine import ReferenceEngine
    from mmrag.serving.models.trained import trained_model_path
    from mmrag.training.data import encode_prompt, pixel_values
    from mmrag.training.tasks.chat import template_messages

    path = trained_model_path()
    processor = AutoProcessor.from_pretrained(path)
    tokenizer = processor.tokenizer
    tasks = [make_task(family, i, split="heldout", max_images=4) for family in FAMILIES for i in range(2)]
    reference = ReferenceEngine.from_pretrained(path)
    expected = []
    for task in tasks:
        ids = torch.tensor([encode_prompt(task, tokenizer, reference.model.config.image_seq_length)])
        out = reference.generate(ids, pixel_values(task.images), max_new_tokens=8, eos_token_id=tokenizer.eos_token_id)
        expected.append(tokenizer.decode(out.token_ids, skip_special_tokens=True))

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = LLM(model=str(path), enforce_eager=True, max_model_len=1024, seed=0, limit_mm_per_prompt={"image": 4})
    try:
        prompts = []
        for task in tasks:
            prompt = {"prompt": processor.apply_chat_template(template_messages(task), add_generation_prompt=True)}
            if task.images:
                prompt["multi_modal_data"] = {"image": [Image.fromarray(px) for px in task.images]}
            prompts.append(prompt)
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
    got = [o.outputs[0].text for o in outs]
    agree = sum(g == e for g, e in zip(got, expected, strict=True))
    assert agree >= len(tasks) - 1, list(zip(got, expected, strict=True))
