"""xRAG's ``retrieval`` modality on Qwen2.5-VL and LLaVA-OneVision (``XragQwen2_5_VL``, ``XragLlavaOnevision``),
on the tiny random checkpoints, fp32, one plugin engine per family (one alive at a time).

- the checkpoint's architecture picks the family's xRAG class (``xrag_overrides``), with a seeded projector
  whose card names the checkpoint;
- every ``<xrag>`` stays one prompt token, and vLLM decodes as the family's HF reference
  (:mod:`mmrag.kernels.reference`) whose ``<xrag>`` input rows are replaced by ``projector(vector)``: greedy
  tokens and log-probabilities, for documents alone, documents and an image, documents and an image at AIM
  ratio 1/2 (Qwen2.5-VL: both position layouts), and the same with LOOK-M per request; the reference with
  the placeholder's own embedding row decodes otherwise (the vectors are read);
- on Qwen2.5-VL (M-RoPE) each ``<xrag>`` takes one text position on all three axes: the positions vLLM
  computes for a request equal the reference's (transformers' ``get_rope_index``), merged image included;
- a vector of the wrong dimension is refused with a message naming the projector's, and the engine serves on.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mmrag.kernels.methods.lookm import LookM
from tests.vllm_plugin import parity
from tests.vllm_plugin.parity import LOGPROB_ATOL

pytestmark = pytest.mark.slow

STEPS = 6
ENCODER, ENCODER_DIM = "minilm", 384
LOOKM = LookM(image_budget=0.25, score_from="chunked")


@dataclass(frozen=True)
class Family:
    name: str
    xrag_class: str
    image_pad: str  # the chat template's image part
    image_token: int
    layouts: tuple[str, ...]  # AIM position layouts to check


FAMILIES = {
    "qwen2.5-vl": Family(
        "qwen2.5-vl", "XragQwen2_5_VL", "<|vision_start|><|image_pad|><|vision_end|>", 5, ("contiguous", "spread")
    ),
    "llava-onevision": Family("llava-onevision", "XragLlavaOnevision", "<image>", 3, ("contiguous",)),
}
# (documents, image (height, width) or None, AIM keep ratio, LOOK-M): 112x112 is 16 tokens on Qwen2.5-VL,
# 88 packed tokens on OneVision.
CASES = [
    (2, None, 1.0, False),
    (3, (112, 112), 1.0, False),
    (2, (112, 112), 0.5, False),
    (3, (112, 112), 0.5, True),
]


@dataclass
class Served:
    family: Family
    path: Path
    projector: nn.Module
    token_id: int
    engine: object
    processor: object
    hf_model: nn.Module


def _make_checkpoint(name: str, out: Path) -> Path:
    if name == "qwen2.5-vl":
        from mmrag.serving.models.tiny_qwen_vl import make_tiny_qwen_vl

        return make_tiny_qwen_vl(out)
    from mmrag.serving.models.tiny_onevision import make_tiny_onevision

    return make_tiny_onevision(out)


def _reference_class(name: str):
    if name == "qwen2.5-vl":
        from mmrag.kernels.reference.qwen_vl import QwenReference

        return QwenReference
    from mmrag.kernels.reference.onevision import OnevisionReference

    return OnevisionReference


@pytest.fixture(scope="module", params=list(FAMILIES))
def served(request, tmp_path_factory: pytest.TempPathFactory):
    """The family's checkpoint, a seeded projector for it, the plugin engine (AIM at deployment ratio 1, the
    KV worker, xRAG), and the reference's processor and HF model."""
    from mmrag.serving.xrag.projector import ProjectorCard, XragProjector, llm_identity, save_projector

    family = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(f"xrag-{family.name}")
    path = _make_checkpoint(family.name, root / f"tiny-{family.name}")
    identity = llm_identity(path)
    torch.manual_seed(0)
    projector = XragProjector(ENCODER_DIM, identity.hidden_size).eval()
    projector_dir = save_projector(projector, ProjectorCard(ENCODER, ENCODER_DIM, identity), root / "projector")
    kwargs = parity.parity_engine_kwargs(
        path,
        {"lookm": {"enabled": True, "image_budget": LOOKM.image_budget}},
        {"xrag": {"projector": str(projector_dir)}, "max_top_k": 4},
        limit_mm_per_prompt={"image": 1, "video": 0},
    )
    processor, hf_model = parity.processor_and_model(_reference_class(family.name), path)
    for engine in parity.plugin_engine(kwargs):
        token_id = kwargs["hf_overrides"]["xrag_token_index"]
        yield Served(family, path, projector, token_id, engine, processor, hf_model)


def _vectors(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, ENCODER_DIM)).astype(np.float32)


def _text(served: Served, documents: int, image: bool) -> str:
    body = ("Background: " + " and ".join(["<xrag>"] * documents) + "\nWhat do they say?") if documents else "Hi"
    content = (served.family.image_pad if image else "") + body
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def _request(served: Served, index: int, mm_kwargs: dict | None = None) -> dict:
    documents, size, ratio, _ = CASES[index]
    data: dict = {"retrieval": _vectors(documents, index)}
    if size is not None:
        data["image"] = parity.noise_pictures([size], 10 * index)
    return {
        "prompt": _text(served, documents, size is not None),
        "multi_modal_data": data,
        "mm_processor_kwargs": {"aim_keep_ratio": ratio, **(mm_kwargs or {})},
    }


class _XragRows(nn.Module):
    """The LM's token embedding with each ``<xrag>`` row of a prompt (more than one token) replaced by
    ``rows`` in order: how xRAG's paper feeds a document to the LM, applied to transformers' model."""

    def __init__(self, embed: nn.Module, token_id: int) -> None:
        super().__init__()
        self.embed, self.token_id, self.rows = embed, token_id, None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.embed(ids)
        if self.rows is None or ids.shape[-1] == 1:
            return out  # decoding: a generated token is text
        mask = ids == self.token_id
        assert int(mask.sum()) == len(self.rows), "one vector per <xrag>"
        return out.masked_scatter(mask[..., None], self.rows.to(out.dtype))


def _reference(served: Served, index: int, *, replace: bool = True, layout: str = "contiguous"):
    """The family's reference on ``CASES[index]``, the ``<xrag>`` rows projected (or left as the token's row)."""
    documents, size, ratio, lookm = CASES[index]
    language_model = served.hf_model.model.language_model
    embed = language_model.embed_tokens
    wrapper = _XragRows(embed.embed if isinstance(embed, _XragRows) else embed, served.token_id)
    with torch.no_grad():
        wrapper.rows = served.projector(torch.from_numpy(_vectors(documents, index))) if replace else None
    language_model.embed_tokens = wrapper
    settings = {"merge_passes": {1.0: 0, 0.5: 1}[ratio], "kv": LOOKM if lookm else None}
    text = _text(served, documents, size is not None)
    images = parity.noise_pictures([size], 10 * index) if size is not None else None
    if served.family.name == "qwen2.5-vl":
        inputs = served.processor(text=[text], images=images, return_tensors="pt")
        reference = _reference_class(served.family.name)(served.hf_model, layout=layout, **settings)
        args = (inputs["input_ids"][0], inputs.get("pixel_values"), inputs.get("image_grid_thw"))
    else:
        ids = torch.tensor(served.processor.tokenizer(text)["input_ids"])  # one <image>, unexpanded
        pixels = served.processor.image_processor(images, return_tensors="pt") if images else {}
        reference = _reference_class(served.family.name)(served.hf_model, **settings)
        args = (ids, pixels.get("pixel_values"), pixels.get("image_sizes"))
    return reference.generate(*args, STEPS), reference


def _params(lookm: bool):
    from mmrag.serving.vllm_plugin.kv.plan import request_extra_args

    return parity.greedy_params(STEPS, request_extra_args(LOOKM) if lookm else None)


def test_the_checkpoint_architecture_picks_the_family_xrag_class(served: Served) -> None:
    from mmrag.serving.vllm_plugin import xrag
    from mmrag.serving.xrag.projector import XRAG_TOKEN

    assert served.engine.apply_model(type) == [getattr(xrag, served.family.xrag_class)]
    # The tiny checkpoints carry <xrag> in their first spare row (above the specials and the 256 bytes).
    tokenizer = served.processor.tokenizer
    assert tokenizer.convert_tokens_to_ids(XRAG_TOKEN) == served.token_id == len(tokenizer) - 1
    assert served.token_id < served.hf_model.config.get_text_config().vocab_size


@pytest.mark.parametrize("index", range(len(CASES)))
def test_documents_decode_as_the_reference(served: Served, index: int) -> None:
    """Greedy tokens and log-probabilities equal the reference's with the projected rows; with the
    placeholder's own row instead the reference decodes otherwise."""
    documents, _, ratio, lookm = CASES[index]
    for layout in served.family.layouts if ratio < 1 else ("contiguous",):
        (out,) = served.engine.generate(
            [_request(served, index, {"aim_positions": layout} if served.family.name == "qwen2.5-vl" else None)],
            _params(lookm),
            use_tqdm=False,
        )
        assert out.prompt_token_ids.count(served.token_id) == documents
        expected, _ = _reference(served, index, layout=layout)
        assert expected.prompt_len == len(out.prompt_token_ids)
        if lookm:  # the reference's LOOK-M evicts image entries only; the documents are text to it
            images = out.prompt_token_ids.count(served.family.image_token)
            assert expected.kept == expected.prompt_len - images + math.ceil(images * LOOKM.image_budget)
        choice = out.outputs[0]
        diff = float((parity.chosen_logprobs(choice) - expected.logprobs).abs().max())
        print(f"{served.family.name} case {index} {layout}: max |dlogprob| {diff:.3g}")
        assert list(choice.token_ids) == expected.token_ids
        assert diff < LOGPROB_ATOL
        unprojected, _ = _reference(served, index, replace=False, layout=layout)
        assert (
            unprojected.token_ids != expected.token_ids or (unprojected.logprobs - expected.logprobs).abs().max() > 1e-3
        )


def test_xrag_is_one_text_position_on_every_axis(served: Served) -> None:
    """Qwen2.5-VL: the M-RoPE positions vLLM lays out for a request with an image merged at 1/2 and two
    documents equal the reference's; the documents' rows are one step each on all three axes."""
    if served.family.name != "qwen2.5-vl":
        pytest.skip("M-RoPE: Qwen2.5-VL only")
    from vllm import SamplingParams

    index = 2
    engine = served.engine.llm_engine
    engine.add_request("positions", _request(served, index), SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()
    (state,) = parity.scheduler(served.engine).requests.values()
    tokens, features = list(state.prompt_token_ids), list(state.mm_features)
    while engine.has_unfinished_requests():
        engine.step()
    assert sorted(f.modality for f in features) == ["image", "retrieval", "retrieval"]
    ((positions, delta),) = served.engine.apply_model(
        functools.partial(_mrope_positions, tokens=tokens, features=features)
    )
    _, reference = _reference(served, index)
    processor_inputs = served.processor(
        text=[_text(served, 2, True)], images=parity.noise_pictures([CASES[index][1]], 10 * index), return_tensors="pt"
    )
    ids, expected = reference._layout(processor_inputs["input_ids"][0], processor_inputs["image_grid_thw"], None, None)
    assert ids.tolist() == tokens
    assert torch.equal(positions, expected)
    assert delta == int(expected.max()) + 1 - len(tokens)
    for column in [i for i, t in enumerate(tokens) if t == served.token_id]:
        assert positions[:, column].tolist() == [int(positions[0, column - 1]) + 1] * 3


def _mrope_positions(model, tokens: list[int], features: list) -> tuple[torch.Tensor, int]:
    return model.get_mrope_input_positions(tokens, features)


def test_wrong_dimension_is_refused(served: Served) -> None:
    from vllm import SamplingParams

    bad = {"prompt": _text(served, 2, False), "multi_modal_data": {"retrieval": np.zeros((2, 100), np.float32)}}
    with pytest.raises(ValueError, match=f"{ENCODER_DIM}-d"):
        served.engine.generate([bad], SamplingParams(max_tokens=1), use_tqdm=False)
    (out,) = served.engine.generate([_request(served, 0)], SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 2
