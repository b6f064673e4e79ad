"""LOOK-M at an image budget and the naive controls, in the reference engine: the same entries per head."""

from __future__ import annotations

import pytest
import torch

from mmrag.kernels.kv_baselines import image_keep_count
from mmrag.kernels.methods import make_kv_method
from mmrag.kernels.methods.lookm import LookM
from mmrag.kernels.reference.engine import ReferenceEngine, ReferenceMethods

BUDGET = 0.2
METHODS = {
    "lookm": LookM(image_budget=BUDGET),
    "lookm_evict": LookM(image_budget=BUDGET, merge=None),
    "random": make_kv_method("random", image_budget=BUDGET),
    "recent": make_kv_method("recent", image_budget=BUDGET),
    "scores": make_kv_method("scores", image_budget=BUDGET),
}


@pytest.mark.parametrize("name", METHODS)
def test_every_rule_keeps_text_plus_the_image_budget(peaky_llava, two_image_prompt, name):
    ids, pixels = two_image_prompt["input_ids"], two_image_prompt["pixel_values"]
    engine = ReferenceEngine(peaky_llava, ReferenceMethods(kv=METHODS[name]))
    out = engine.generate(ids, pixels, max_new_tokens=3)
    config = peaky_llava.config.text_config
    is_image = ids[0] == peaky_llava.config.image_token_id
    per_head = int((~is_image).sum()) + image_keep_count(int(is_image.sum()), BUDGET)
    assert out.kv_entries == config.num_hidden_layers * config.num_key_value_heads * per_head
    assert len(out.token_ids) == 3


def test_rules_keep_different_entries(peaky_llava, two_image_prompt):
    ids, pixels = two_image_prompt["input_ids"], two_image_prompt["pixel_values"]
    kept = {}
    for name in ("lookm_evict", "random", "recent", "scores"):
        prefill = ReferenceEngine(peaky_llava, ReferenceMethods(kv=METHODS[name])).prefill(ids, pixels)
        kept[name] = prefill.cache.layers[0].prompt_positions
    is_image = ids[0] == peaky_llava.config.image_token_id
    text = set((~is_image).nonzero()[:, 0].tolist())
    assert text <= set(kept["lookm_evict"][0].tolist()) and text <= set(kept["random"][0].tolist())
    assert kept["recent"][0].tolist() == list(range(ids.shape[1] - kept["recent"].shape[1], ids.shape[1]))
    assert not torch.equal(kept["lookm_evict"], kept["random"])
    assert not torch.equal(kept["scores"], kept["recent"])
