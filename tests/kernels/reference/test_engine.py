"""The reference engine on the tiny LLaVA: transformers parity, and each method against an independent oracle.

Oracles are transformers itself: fed the merged prompt (AIM stage a), run with the pruning masks injected
into its layers by hooks (AIM stage b), asked for its eager attention probabilities and decoded with the
evicted entries masked (LOOK-M).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from mmrag.kernels.aim import pagerank_importance, select_live_tokens
from mmrag.kernels.attention_scores import sum_query_groups
from mmrag.kernels.lookm import LookMBudget, merge_evicted, text_prior_keep_indices
from mmrag.kernels.methods.aim import AIMMerge, AIMPrune
from mmrag.kernels.methods.lookm import LookM
from mmrag.kernels.reference import ReferenceEngine, ReferenceMethods
from mmrag.kernels.token_merge import merge_tokens

IMAGE_TOKEN = 3
# LOOK-M share kept by score in the tests: above the text share, so that image entries compete on score
# (at the default 0.1 the 80-token prompt's text alone fills the budget).
HEAVY = 0.7


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


@contextmanager
def _layer_masks(model: nn.Module, masks: dict[int, Callable[[int], torch.Tensor]]) -> Iterator[None]:
    """Replace the attention mask transformers hands to decoder layer ``i`` by ``masks[i](q_len)``."""

    def hook(index: int):
        def replace(_module: nn.Module, args: tuple, kwargs: dict[str, Any]):
            kwargs["attention_mask"] = masks[index](args[0].shape[1] if args else kwargs["hidden_states"].shape[1])
            return args, kwargs

        return replace

    layers = model.model.language_model.layers
    handles = [layers[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in masks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# -- the fixture itself ------------------------------------------------------------------------


def test_tiny_checkpoint_loads_every_weight(tiny_llava_dir, tiny_llava) -> None:
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    from mmrag.serving.models.tiny import to_hub_name

    _, info = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and info["error_msgs"] == []
    stored = load_file(str(tiny_llava_dir / "model.safetensors"))
    state = tiny_llava.state_dict()
    assert len(stored) == len(state)
    for name, tensor in state.items():
        assert torch.equal(stored[to_hub_name(name)], tensor), name


# -- methods off: plain transformers, bit for bit ------------------------------------------------


@pytest.mark.parametrize(
    ("model", "prompt"),
    [("tiny_llava", "two_image_prompt"), ("tiny_llava", "text_prompt"), ("peaky_llava", "two_image_prompt")],
)
def test_methods_off_equals_transformers(model: str, prompt: str, request: pytest.FixtureRequest) -> None:
    inputs = request.getfixturevalue(prompt)
    tiny_llava = request.getfixturevalue(model)
    engine = ReferenceEngine(tiny_llava)
    with torch.no_grad():
        expected = tiny_llava(**inputs).logits[0]
    prefill = engine.prefill(inputs["input_ids"], inputs.get("pixel_values"))
    assert torch.equal(prefill.logits, expected)

    ours = engine.generate(inputs["input_ids"], inputs.get("pixel_values"), max_new_tokens=8, eos_token_id=2)
    theirs = tiny_llava.generate(
        **inputs, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    assert ours.token_ids == theirs.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    their_logits = torch.stack(theirs.logits)[:, 0]
    # transformers' generate computes the first step's head on the last position only (a different
    # matmul shape, last-bit differences): that step is compared with the full forward instead.
    assert torch.equal(ours.logits[0], expected[-1])
    assert torch.equal(ours.logits[1:], their_logits[1:])
    assert ours.kv_entries == ours.full_kv_entries


def test_methods_off_equals_transformers_in_bf16(tiny_llava, two_image_prompt) -> None:
    model = copy.deepcopy(tiny_llava).to(torch.bfloat16)
    inputs = {**two_image_prompt, "pixel_values": two_image_prompt["pixel_values"].to(torch.bfloat16)}
    with torch.no_grad():
        expected = model(**inputs).logits[0]
    prefill = ReferenceEngine(model).prefill(inputs["input_ids"], inputs["pixel_values"])
    assert prefill.logits.dtype == torch.bfloat16
    assert torch.equal(prefill.logits, expected)


def test_batch_and_method_combinations_are_refused(tiny_llava, text_prompt) -> None:
    with pytest.raises(ValueError, match="cannot both"):
        ReferenceMethods(prune=AIMPrune(), kv=LookM())
    with pytest.raises(ValueError, match="one prompt"):
        ReferenceEngine(tiny_llava).prefill(text_prompt["input_ids"].expand(2, -1))


# -- AIM stage (a) ------------------------------------------------------------------------------


def _merged_prompt(model: nn.Module, ids: torch.Tensor, pixels: torch.Tensor, passes: int):
    """The prompt with each image's run cut to its merged count, and its embeddings holding the merged
    tokens: what the engine should feed the LLM. Also the kept positions' original indices."""
    kept = 16 >> passes
    with torch.no_grad():
        features = torch.stack(model.model.get_image_features(pixel_values=pixels).pooler_output)
        merged = merge_tokens(features, num_passes=passes).tokens
    image_pos = (ids[0] == IMAGE_TOKEN).nonzero()[:, 0].view(-1, 16)
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[image_pos[:, kept:].reshape(-1)] = False
    short_ids = ids[:, keep]
    embeds = model.get_input_embeddings()(short_ids).detach()
    embeds[short_ids == IMAGE_TOKEN] = merged.reshape(-1, merged.shape[-1])
    return short_ids, embeds, keep.nonzero()[:, 0]


def test_aim_merge_equals_transformers_on_the_merged_prompt(tiny_llava, two_image_prompt) -> None:
    ids, pixels = two_image_prompt["input_ids"], two_image_prompt["pixel_values"]
    engine = ReferenceEngine(tiny_llava, ReferenceMethods(merge=AIMMerge(num_passes=2)))
    prefill = engine.prefill(ids, pixels)
    assert prefill.input_ids.numel() == ids.shape[1] - 2 * (16 - 4)
    assert int(prefill.is_image.sum()) == 2 * 4

    short_ids, embeds, _ = _merged_prompt(tiny_llava, ids, pixels, passes=2)
    with torch.no_grad():
        expected = tiny_llava(inputs_embeds=embeds).logits[0]
    assert torch.equal(prefill.input_ids, short_ids[0])
    assert torch.equal(prefill.logits, expected)
    assert prefill.cache.next_position == short_ids.shape[1]


def test_aim_merge_spread_keeps_the_images_spans(tiny_llava, two_image_prompt) -> None:
    """Spread: the 4 merged tokens of a 16-token image sit at offsets 2, 6, 10, 14 of its span, the text
    keeps its original positions, and decoding continues after the unmerged prompt's last position."""
    ids, pixels = two_image_prompt["input_ids"], two_image_prompt["pixel_values"]
    engine = ReferenceEngine(tiny_llava, ReferenceMethods(merge=AIMMerge(num_passes=2, positions="spread")))
    prefill = engine.prefill(ids, pixels)
    short_ids, embeds, original = _merged_prompt(tiny_llava, ids, pixels, passes=2)
    starts = (ids[0] == IMAGE_TOKEN).nonzero()[:, 0].view(-1, 16)[:, 0]
    positions = original.clone()
    for start in starts.tolist():
        run = (original >= start) & (original < start + 4)  # the kept: the run's first 4 placeholders
        positions[run] = start + torch.tensor([2, 6, 10, 14])
    next_token = 7
    with torch.no_grad():
        expected = tiny_llava(inputs_embeds=embeds, position_ids=positions[None]).logits[0]
        step_embeds = torch.cat([embeds, tiny_llava.get_input_embeddings()(torch.tensor([[next_token]]))], dim=1)
        step_positions = torch.cat([positions, torch.tensor([ids.shape[1]])])[None]
        expected_step = tiny_llava(inputs_embeds=step_embeds, position_ids=step_positions).logits[0, -1]
    assert torch.equal(prefill.input_ids, short_ids[0])
    torch.testing.assert_close(prefill.logits, expected, rtol=0, atol=1e-6)
    assert prefill.cache.next_position == ids.shape[1]
    torch.testing.assert_close(engine.decode_step(prefill.cache, next_token), expected_step, rtol=1e-5, atol=1e-5)


# -- AIM stage (b) ------------------------------------------------------------------------------


def _layer0_logits(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """Layer 0's masked attention logits, rebuilt from what transformers feeds its attention module."""
    captured: dict[str, Any] = {}
    attn = model.model.language_model.layers[0].self_attn

    def grab(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        captured.update(kwargs, hidden_states=args[0] if args else kwargs["hidden_states"])

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    hidden, (cos, sin) = captured["hidden_states"], captured["position_embeddings"]
    shape = (*hidden.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(hidden).view(shape).transpose(1, 2)
    k = attn.k_proj(hidden).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    logits = q @ repeat_kv(k, attn.num_key_value_groups).transpose(2, 3) * attn.scaling
    n = logits.shape[-1]
    return (logits + _additive(torch.ones(n, n, dtype=torch.bool).tril()))[0]


def test_aim_prune_selects_and_masks_like_transformers_with_hooks(peaky_llava, two_image_prompt) -> None:
    ids, pixels = two_image_prompt["input_ids"], two_image_prompt["pixel_values"]
    # Two layers: retention 0.5 after layer 0, 0 after layer 1 (which no layer reads).
    engine = ReferenceEngine(peaky_llava, ReferenceMethods(prune=AIMPrune(start_layer=0, end_layer=1)))
    prefill = engine.prefill(ids, pixels)
    is_text = ~prefill.is_image
    seq_len = ids.shape[1]
    assert prefill.cache.layers[0].key_mask is None
    live = prefill.cache.layers[1].key_mask[0, :seq_len]
    assert bool(live[is_text].all())
    assert int(live.sum()) == int(is_text.sum()) + 16  # int(32 * 0.5) visual tokens

    importance = pagerank_importance(_layer0_logits(peaky_llava, two_image_prompt), 0.1, 5)
    expected_live = select_live_tokens(importance, is_text, torch.ones_like(live), int(is_text.sum()) + 16)
    assert torch.equal(live, expected_live)

    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    layer1_prefill = {1: lambda _q: (_additive(causal) + _additive(live))[None, None]}
    with _layer_masks(peaky_llava, layer1_prefill), torch.no_grad():
        hf = peaky_llava(**two_image_prompt, use_cache=True)
    assert torch.equal(prefill.logits, hf.logits[0])

    token = int(prefill.logits[-1].argmax())
    ours = engine.decode_step(prefill.cache, token)
    step_live = torch.cat([live, torch.ones(1, dtype=torch.bool)])
    with _layer_masks(peaky_llava, {1: lambda _q: _additive(step_live)[None, None, None]}), torch.no_grad():
        theirs = peaky_llava(input_ids=torch.tensor([[token]]), past_key_values=hf.past_key_values).logits[0, -1]
    assert torch.equal(ours, theirs)


# -- LOOK-M -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_prefill(peaky_llava, two_image_prompt):
    return ReferenceEngine(peaky_llava).prefill(two_image_prompt["input_ids"], two_image_prompt["pixel_values"])


@pytest.fixture(scope="module")
def hf_attentions(peaky_llava, two_image_prompt) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return peaky_llava(**two_image_prompt, output_attentions=True).attentions


@pytest.mark.parametrize("strategy", ["pivotal", "averaged", "weighted", None])
def test_lookm_cache_is_the_kernels_applied_to_the_full_cache(
    peaky_llava, two_image_prompt, full_prefill, hf_attentions, strategy: str | None
) -> None:
    ids, pixels = two_image_prompt["input_ids"], two_image_prompt["pixel_values"]
    engine = ReferenceEngine(peaky_llava, ReferenceMethods(kv=LookM(heavy_ratio=HEAVY, merge=strategy)))
    prefill = engine.prefill(ids, pixels)
    # LOOK-M only shrinks what is stored: the prompt itself ran on the full KV.
    assert torch.equal(prefill.logits, full_prefill.logits)

    seq_len, is_image = ids.shape[1], prefill.is_image
    budget = LookMBudget.from_ratios(seq_len, HEAVY, 0.1)
    text_outside = int((~is_image[: seq_len - budget.recent]).sum())
    assert budget.heavy - text_outside >= 8, "the test needs image entries chosen by score"
    for layer, (kv, full) in enumerate(zip(prefill.cache.layers, full_prefill.cache.layers, strict=True)):
        scores = sum_query_groups(hf_attentions[layer][0].sum(dim=1), kv.keys.shape[1])
        keep = text_prior_keep_indices(scores, is_image, budget)
        assert torch.equal(kv.prompt_positions, keep)
        assert kv.keys.shape[2] == budget.kept_count(seq_len, text_outside)
        keys, values = merge_evicted(full.keys[0], full.values[0], keep, strategy)
        assert torch.equal(kv.keys[0], keys) and torch.equal(kv.values[0], values)


def test_lookm_decodes_at_logical_positions(peaky_llava, two_image_prompt) -> None:
    """Eviction without merge must decode like the full cache with the evicted entries masked."""
    ids, pixels = two_image_prompt["input_ids"], two_image_prompt["pixel_values"]
    engine = ReferenceEngine(peaky_llava, ReferenceMethods(kv=LookM(heavy_ratio=HEAVY, merge=None)))
    prefill = engine.prefill(ids, pixels)
    seq_len = ids.shape[1]
    assert prefill.cache.next_position == seq_len
    kept = {}
    for layer, kv in enumerate(prefill.cache.layers):
        assert kv.keys.shape[2] < seq_len
        allowed = torch.zeros(seq_len + 1, dtype=torch.bool)
        allowed[kv.prompt_positions[0]] = True  # one KV head in the tiny model
        allowed[seq_len] = True
        kept[layer] = allowed

    tokens = [int(prefill.logits[-1].argmax())]
    with torch.no_grad():
        hf = peaky_llava(**two_image_prompt, use_cache=True)
    masks = {layer: (lambda _q, a=allowed: _additive(a)[None, None, None]) for layer, allowed in kept.items()}
    with _layer_masks(peaky_llava, masks), torch.no_grad():
        theirs = peaky_llava(input_ids=torch.tensor([tokens]), past_key_values=hf.past_key_values).logits[0, -1]

    wrong_position = ReferenceEngine(peaky_llava, engine.methods).prefill(ids, pixels).cache
    wrong_position.next_position = wrong_position.layers[0].keys.shape[2]  # the physical length
    ours = engine.decode_step(prefill.cache, tokens[0])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert prefill.cache.next_position == seq_len + 1
    assert not torch.allclose(engine.decode_step(wrong_position, tokens[0]), theirs, rtol=1e-3, atol=1e-3)


def test_lookm_chunked_score_gives_the_same_cache(peaky_llava, two_image_prompt) -> None:
    ids, pixels = two_image_prompt["input_ids"], two_image_prompt["pixel_values"]
    probs = ReferenceEngine(peaky_llava, ReferenceMethods(kv=LookM(heavy_ratio=HEAVY))).prefill(ids, pixels).cache
    chunked_lookm = LookM(heavy_ratio=HEAVY, score_from="chunked", chunk_size=7)
    chunked = ReferenceEngine(peaky_llava, ReferenceMethods(kv=chunked_lookm))
    cache = chunked.prefill(ids, pixels).cache
    for a, b in zip(probs.layers, cache.layers, strict=True):
        assert torch.equal(a.prompt_positions, b.prompt_positions)
        torch.testing.assert_close(a.keys, b.keys)


@pytest.mark.parametrize(
    "methods",
    [
        ReferenceMethods(kv=LookM()),
        ReferenceMethods(merge=AIMMerge(num_passes=1), kv=LookM(merge="weighted")),
        ReferenceMethods(merge=AIMMerge(), prune=AIMPrune(start_layer=0, end_layer=1)),
    ],
    ids=["lookm", "aim-merge+lookm", "aim"],
)
def test_generation_with_methods_counts_entries(peaky_llava, two_image_prompt, methods: ReferenceMethods) -> None:
    out = ReferenceEngine(peaky_llava, methods).generate(
        two_image_prompt["input_ids"], two_image_prompt["pixel_values"], max_new_tokens=6
    )
    assert len(out.token_ids) == 6 and out.logits.shape == (6, peaky_llava.config.text_config.vocab_size)
    assert 0 < out.kv_entries < out.full_kv_entries
    assert out.full_kv_entries == 2 * 1 * out.prompt_len
    assert out.token_ids == out.logits.argmax(dim=-1).tolist()


def test_lookm_leaves_text_only_prompts_alone(peaky_llava, text_prompt) -> None:
    # LOOK-M compresses image KV: a prompt without images keeps everything (the authors' condition).
    out = ReferenceEngine(peaky_llava, ReferenceMethods(kv=LookM())).generate(
        text_prompt["input_ids"], max_new_tokens=3
    )
    assert out.kv_entries == out.full_kv_entries
