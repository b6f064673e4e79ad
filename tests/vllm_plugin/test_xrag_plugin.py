"""xRAG's ``retrieval`` modality inside vLLM: ``XragLlava`` on a copy of the shipped trained model, one engine.

- one image and two ``<xrag>`` documents: two one-token placeholders, and generation runs;
- the rows vLLM scatters at the ``<xrag>`` positions (captured at the language model's input, in the worker)
  equal the projector computed independently with ``load_projector``, and follow document order;
- documents without an image work, in both accepted input forms;
- a vector of the wrong dimension is refused with a message naming the projector's dimension.
"""

from __future__ import annotations

import operator
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

ENCODER, ENCODER_DIM, HIDDEN = "minilm", 384, 128
IMAGE_TOKENS = 16  # the trained model: a 32x32 image is 16 visual tokens
IMAGE_AND_DOCS = "USER: <image>\nBackground: <xrag> and <xrag>\nWhat is shown?\nASSISTANT:"
DOCS_ONLY = "USER: Background: <xrag>\n<xrag>\n<xrag>\nWhat do they say?\nASSISTANT:"
# bf16 model: the projection in the worker vs the same projector in bf16 here.
ATOL = 1e-2


@dataclass
class XragEngine:
    llm: object
    model_dir: Path
    projector_dir: Path
    token_id: int


def _image(seed: int):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def _vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, ENCODER_DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> XragEngine:
    from vllm import LLM

    from mmrag.serving.models.trained import trained_model_path
    from mmrag.serving.vllm_plugin import XRAG_ARCHITECTURE
    from mmrag.serving.xrag.projector import (
        ProjectorCard,
        XragProjector,
        add_placeholder_token,
        llm_identity,
        save_projector,
    )

    root = tmp_path_factory.mktemp("xrag")
    model_dir = root / "tiny-mllm"
    shutil.copytree(trained_model_path(), model_dir)
    token_id = add_placeholder_token(model_dir)
    assert token_id == 512  # the tokenizer's 512 tokens, inside the 576-row embedding table
    torch.manual_seed(0)
    card = ProjectorCard(ENCODER, ENCODER_DIM, llm_identity(model_dir))
    projector_dir = save_projector(XragProjector(ENCODER_DIM, HIDDEN), card, root / "projector")

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # apply_model ships callables to the worker; the engine core re-pickles them by reference, so they are
    # this module's top-level functions (the worker imports this module) or library callables.
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    llm = LLM(
        model=str(model_dir),
        enforce_eager=True,
        max_model_len=512,
        seed=0,
        enable_prefix_caching=False,  # every prefill row reaches the captured input
        limit_mm_per_prompt={"image": 2, "retrieval": 4},
        hf_overrides={
            "architectures": [XRAG_ARCHITECTURE],
            "xrag_projector": str(projector_dir),
            "xrag_token_index": token_id,
        },
    )
    try:
        llm.apply_model(_install_capture)
        yield XragEngine(llm, model_dir, projector_dir, token_id)
    finally:
        llm.llm_engine.engine_core.shutdown()


def _install_capture(model) -> None:
    """In the worker: record the ``inputs_embeds`` every forward step gives the language model."""
    language_model = model.get_language_model().model
    forward = language_model.forward
    seen: list[torch.Tensor] = []

    def recording_forward(*args, **kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None:
            seen.append(embeds.detach().float().cpu().clone())
        return forward(*args, **kwargs)

    language_model.forward = recording_forward  # vLLM's compiled-or-not __call__ calls self.forward
    model.xrag_test_seen = seen


def _clear_capture(model) -> None:
    model.xrag_test_seen.clear()


def _captured(model) -> list[torch.Tensor]:
    return list(model.xrag_test_seen)


def _projector_class(model) -> str:
    return type(model.xrag_projector).__qualname__


def _tower_names(model) -> list[str]:
    return list(model._tower_model_names)


def _generate_one(engine: XragEngine, prompt: dict):
    """(output, the prompt's rows at the language model's input) for one request generated alone."""
    from vllm import SamplingParams

    engine.llm.apply_model(_clear_capture)
    (out,) = engine.llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    (seen,) = engine.llm.apply_model(_captured)
    prefill = seen[0]
    assert prefill.shape[0] >= len(out.prompt_token_ids)
    return out, prefill[: len(out.prompt_token_ids)]


def _expected(engine: XragEngine, vectors: np.ndarray) -> torch.Tensor:
    from mmrag.serving.xrag.projector import llm_identity, load_projector

    projector, _ = load_projector(
        engine.projector_dir,
        encoder=ENCODER,
        encoder_dim=ENCODER_DIM,
        llm=llm_identity(engine.model_dir),
        dtype=torch.bfloat16,
    )
    with torch.no_grad():
        return projector(torch.from_numpy(vectors)).float()


def _xrag_positions(engine: XragEngine, token_ids: list[int]) -> list[int]:
    return [i for i, t in enumerate(token_ids) if t == engine.token_id]


def test_served_by_the_plugin_with_the_projector_loaded(engine: XragEngine) -> None:
    from mmrag.serving.vllm_plugin.xrag import XragLlava
    from mmrag.serving.xrag.projector import XragProjector

    assert engine.llm.apply_model(type) == [XragLlava]
    assert engine.llm.apply_model(_projector_class) == [XragProjector.__qualname__]
    (tower_names,) = engine.llm.apply_model(_tower_names)
    assert {"vision_tower", "multi_modal_projector", "xrag_projector"} <= set(tower_names)


def test_profiling_inputs(engine: XragEngine) -> None:
    """The dummy inputs vLLM profiles with (skipped on CPU with enforce_eager, so checked here)."""
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.encoder_budget import get_mm_max_toks_per_item

    processor = MULTIMODAL_REGISTRY.create_processor(engine.llm.llm_engine.model_config)
    dummy = processor.get_dummy_mm_inputs({"image": 1, "retrieval": 3})
    placeholders = dummy["mm_placeholders"]
    assert [(p.offset, p.length) for p in placeholders["image"]] == [(0, IMAGE_TOKENS)]
    assert [(p.offset, p.length) for p in placeholders["retrieval"]] == [(16, 1), (17, 1), (18, 1)]
    # What vLLM budgets the encoder cache with (LLaVA declares no maximum: vLLM counts the dummy inputs).
    assert get_mm_max_toks_per_item(processor, {"image": 1, "retrieval": 1}, None) == {
        "image": IMAGE_TOKENS,
        "retrieval": 1,
    }
    vectors = torch.zeros(3, ENCODER_DIM)
    (embeds,) = engine.llm.apply_model(operator.methodcaller("embed_multimodal", retrieval_vecs=vectors))
    assert embeds.shape == (3, 1, HIDDEN)


def test_image_and_two_documents(engine: XragEngine) -> None:
    vectors = _vectors(2, seed=1)
    prompt = {"prompt": IMAGE_AND_DOCS, "multi_modal_data": {"image": [_image(0)], "retrieval": vectors}}
    (rendered,) = engine.llm.llm_engine.renderer.render_cmpl([prompt], skip_mm_cache=True)
    placeholders = rendered["mm_placeholders"]
    assert [p.length for p in placeholders["image"]] == [IMAGE_TOKENS]
    assert [p.length for p in placeholders["retrieval"]] == [1, 1]
    xrag = _xrag_positions(engine, rendered["prompt_token_ids"])
    assert [p.offset for p in placeholders["retrieval"]] == xrag

    out, rows = _generate_one(engine, prompt)
    assert out.prompt_token_ids == rendered["prompt_token_ids"]
    assert len(_xrag_positions(engine, out.prompt_token_ids)) == 2
    assert len(out.outputs[0].token_ids) > 0
    expected = _expected(engine, vectors)
    error, scale = (rows[xrag] - expected).abs().max(), expected.abs().max()
    print(f"max |vLLM row - projector(v)| = {error:.3g} (values up to {scale:.3g}; 0 measured on CPU bf16)")
    torch.testing.assert_close(rows[xrag], expected, rtol=0, atol=ATOL)

    # Swapped documents: the rows follow the order of the vectors, not of anything cached.
    _, swapped = _generate_one(
        engine, {"prompt": IMAGE_AND_DOCS, "multi_modal_data": {"image": [_image(0)], "retrieval": vectors[::-1]}}
    )
    torch.testing.assert_close(swapped[xrag], expected.flip(0), rtol=0, atol=ATOL)
    assert (expected[0] - expected[1]).abs().max() > 10 * ATOL  # the order check can tell them apart
    # Everything else is unchanged, the image rows included.
    text = [i for i in range(len(rows)) if i not in xrag]
    torch.testing.assert_close(swapped[text], rows[text], rtol=0, atol=0)


@pytest.mark.parametrize("form", ["array", "list"])
def test_documents_without_an_image(engine: XragEngine, form: str) -> None:
    vectors = _vectors(3, seed=2)
    data = vectors if form == "array" else [v for v in vectors]
    out, rows = _generate_one(engine, {"prompt": DOCS_ONLY, "multi_modal_data": {"retrieval": data}})
    xrag = _xrag_positions(engine, out.prompt_token_ids)
    assert len(xrag) == 3
    assert len(out.outputs[0].token_ids) > 0
    torch.testing.assert_close(rows[xrag], _expected(engine, vectors), rtol=0, atol=ATOL)


def test_wrong_dimension_is_refused(engine: XragEngine) -> None:
    from vllm import SamplingParams

    prompt = {"prompt": DOCS_ONLY, "multi_modal_data": {"retrieval": np.zeros((3, 100), dtype=np.float32)}}
    with pytest.raises(ValueError, match=f"{ENCODER_DIM}-d"):
        engine.llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)
    # The engine is still serving.
    ok = {"prompt": DOCS_ONLY, "multi_modal_data": {"retrieval": _vectors(3, seed=3)}}
    (out,) = engine.llm.generate([ok], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    assert len(out.outputs[0].token_ids) > 0
