"""Fidelity measures: exact on identical engines, the analytic FLOPs by hand, the ratios per method."""

from __future__ import annotations

import torch

from mmrag.kernels.lookm import LookMBudget
from mmrag.kernels.methods.aim import AIMMerge, AIMPrune
from mmrag.kernels.methods.lookm import LookM
from mmrag.kernels.reference import ReferenceEngine, ReferenceMethods
from mmrag.kernels.reference.fidelity import compare, default_grid, evaluate, mean_kl, prefill_flops, top1_agreement


def test_prefill_flops_by_hand(tiny_llava) -> None:
    # Tiny LLaVA text model: hidden 128, MLP 256, 2 query heads and 1 KV head of 64.
    weights = 128 * 128 * 2 + 128 * 64 * 2 + 128 * 256 * 3
    expected = sum(2 * n * weights + 2 * 2 * n * n * 64 * 2 for n in (10, 20))
    assert prefill_flops(tiny_llava.config.text_config, [10, 20]) == expected


def test_agreement_and_kl_against_torch() -> None:
    gen = torch.Generator().manual_seed(0)
    ref, cand = torch.randn(5, 11, generator=gen), torch.randn(5, 11, generator=gen)
    tokens = ref.argmax(dim=-1).tolist()
    assert top1_agreement(tokens, ref) == 1.0
    assert top1_agreement(tokens, cand) == sum(int(cand[i].argmax()) == tokens[i] for i in range(5)) / 5
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(cand, -1), torch.log_softmax(ref, -1), log_target=True, reduction="none"
    )
    assert abs(mean_kl(ref, cand) - float(kl.sum(-1).mean())) < 1e-6
    assert mean_kl(ref, ref) == 0.0


def test_identical_engines_agree_exactly(tiny_llava, two_image_prompt) -> None:
    ids, pixels = two_image_prompt["input_ids"], two_image_prompt["pixel_values"]
    result = compare(ReferenceEngine(tiny_llava), ReferenceEngine(tiny_llava), ids, pixels, max_new_tokens=5)
    assert result.top1_agreement == 1.0 and result.mean_kl == 0.0
    assert result.kv_ratio == 1.0 and result.flops_ratio == 1.0


def test_ratios_per_method(peaky_llava, two_image_prompt) -> None:
    ids, pixels = two_image_prompt["input_ids"], two_image_prompt["pixel_values"]
    full = ReferenceEngine(peaky_llava)
    seq_len, config = ids.shape[1], peaky_llava.config.text_config

    merged = compare(full, ReferenceEngine(peaky_llava, ReferenceMethods(merge=AIMMerge())), ids, pixels, 4)
    short = seq_len - 2 * 12
    assert merged.prompt_len == short and merged.kv_ratio == short / seq_len
    assert merged.prefill_flops == prefill_flops(config, [short, short])

    pruned = compare(full, ReferenceEngine(peaky_llava, ReferenceMethods(prune=AIMPrune(0, 1))), ids, pixels, 4)
    assert pruned.prefill_flops == prefill_flops(config, [seq_len, seq_len - 16])
    assert pruned.kv_ratio == (seq_len + seq_len - 16) / (2 * seq_len)

    lookm = compare(full, ReferenceEngine(peaky_llava, ReferenceMethods(kv=LookM())), ids, pixels, 4)
    is_image = ids[0] == 3
    budget = LookMBudget.from_ratios(seq_len)
    kept = budget.kept_count(seq_len, int((~is_image[: seq_len - budget.recent]).sum()))
    assert lookm.flops_ratio == 1.0 and lookm.kv_ratio == kept / seq_len
    for result in (merged, pruned, lookm):
        assert 0.0 <= result.top1_agreement <= 1.0 and result.mean_kl >= 0.0


def test_evaluate_over_the_default_grid(peaky_llava, two_image_prompt, text_prompt) -> None:
    grid = default_grid(num_layers=2)
    assert grid["aim-prune"].prune == AIMPrune(start_layer=0, end_layer=1)
    assert default_grid(32)["aim-prune"].prune == AIMPrune(start_layer=13, end_layer=20)
    assert {"aim-merge-25%", "aim-prune", "lookm-pivotal-0.1", "lookm-evict-0.1", "lookm-pivotal-0.6"} <= set(grid)
    prompts = [(two_image_prompt["input_ids"], two_image_prompt["pixel_values"]), (text_prompt["input_ids"], None)]
    chosen = {name: grid[name] for name in ("aim-merge-25%", "lookm-pivotal-0.1")}
    table = evaluate(peaky_llava, prompts, chosen, max_new_tokens=3)
    assert set(table) == set(chosen)
    merged, lookm = table["aim-merge-25%"], table["lookm-pivotal-0.1"]
    # The text prompt is untouched by both methods: its ratios are 1 and count half in the mean.
    assert merged["kv_ratio"] < 1.0 and merged["flops_ratio"] < 1.0
    assert lookm["kv_ratio"] < 1.0 and lookm["flops_ratio"] == 1.0
    single = compare(
        ReferenceEngine(peaky_llava), ReferenceEngine(peaky_llava, chosen["lookm-pivotal-0.1"]), *prompts[0], 3
    )
    assert lookm["kv_ratio"] == (single.kv_ratio + 1.0) / 2
