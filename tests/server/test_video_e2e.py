"""A video through the chat endpoint on the real engine: the app in this process (no Ray Serve) over vLLM on the
tiny random Qwen2.5-VL with AIM, asked through the ``openai`` SDK. The answer arrives and ``usage.mmrag``
counts the video's visual tokens, before AIM (the processor's stock count) and after (each temporal patch
merged to ``ceil(T x ratio)``), and LOOK-M's kept KV entries count the video's placeholders as image entries.

The frames are 112x112: 8x8 patches of 14 pixels, 4x4 = 16 tokens after the 2x2 patch merger; 6 sampled
frames are 3 temporal patches of 2 frames, 48 tokens in all, 3 x ceil(16 x 0.5) = 24 kept at ratio 0.5.
Decoding, limits and errors are tests/server/test_video.py's, over a fake engine.

The same server serves the shipped xRAG projector for this checkpoint (``serving/data/tiny-qwen2.5-vl-xrag-minilm``,
so the engine's class is ``XragQwen2_5_VL``, the AIM class plus the ``retrieval`` modality): a request in
``xrag`` mode with an image gets its documents as one ``<xrag>`` token each beside the merged image. The
retriever is a stand-in returning two fixed documents with seeded vectors (Milvus and the encoder are the
retrieval tests'); the prompt, the engine and the projector are the real ones."""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient

from mmrag.serving.config import MmragConfig
from mmrag.serving.openai.server import create_app
from mmrag.serving.pipeline import LocalBackend
from mmrag.serving.retrieval.protocol import RetrievalInfo, RetrievalResult, RetrievedChunk

pytestmark = pytest.mark.slow

cv2 = pytest.importorskip("cv2")

RATIO = 0.5
FRAMES = 6


def noise_clip(frames: int, size: int = 112) -> bytes:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "clip.mp4")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 2.0, (size, size))
        for _ in range(frames):
            writer.write(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        writer.release()
        return Path(path).read_bytes()


DOCUMENTS = ("The lighthouse keeper is called Ines.", "The ferry leaves at nine.")


class Documents:
    """A retriever stand-in: the same documents for every query, each with a seeded MiniLM-sized vector."""

    async def retrieve(self, options, query_text: str) -> RetrievalResult:
        vectors = np.random.default_rng(0).standard_normal((len(DOCUMENTS), 384)).astype(np.float32)
        chunks = [
            RetrievedChunk(id=str(i), score=1.0, text=text, source=f"doc{i}.txt", vector=vector.tolist())
            for i, (text, vector) in enumerate(zip(DOCUMENTS, vectors, strict=True))
        ]
        return RetrievalResult(chunks=chunks, info=RetrievalInfo(mode=options.mode))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from mmrag.serving.engine.vllm_engine import VllmEngine
    from mmrag.serving.models.tiny_qwen_vl import make_tiny_qwen_vl
    from mmrag.training.train_projector import shipped_projector_dir

    # Named as the registered model, which the shipped projector's card names.
    path = make_tiny_qwen_vl(tmp_path_factory.mktemp("models") / "tiny-qwen2.5-vl")
    config = MmragConfig.model_validate(
        {
            "model": {"name": "tiny-qwen2.5-vl", "path": str(path)},
            "retrieval": {"default_mode": "none", "xrag": {"projector": str(shipped_projector_dir("tiny-qwen2.5-vl"))}},
            "engine": {"max_model_len": 512, "kv_cache_space_gib": 1},
            "compression": {"aim_keep_ratio": RATIO, "lookm": {"enabled": True, "image_budget": 0.25}},
            "limits": {"max_video_frames": FRAMES},
        }
    )
    engine = VllmEngine(config, str(path))
    with TestClient(create_app(config, LocalBackend(engine, Documents()))) as http:
        http.portal.call(engine.start)  # on the app's event loop: vLLM's client lives on the loop it started on
        try:
            sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
            yield sdk, config.model.served_name, engine
        finally:
            http.portal.call(engine.shutdown)


def test_a_video_is_answered_and_its_visual_tokens_merged_by_aim(client) -> None:
    client, model, _ = client
    url = "data:video/mp4;base64," + base64.b64encode(noise_clip(2 * FRAMES)).decode()
    video = {"type": "video_url", "video_url": {"url": url}}
    text = {"type": "text", "text": "What happens?"}
    completion = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": [video, text]}], max_tokens=4, temperature=0
    )
    assert completion.choices[0].message.content and completion.choices[0].finish_reason == "length"
    usage = completion.usage.model_extra["mmrag"]
    assert (usage["visual_tokens_before"], usage["visual_tokens_after"]) == (48, 24)
    assert usage["visual_tokens_after"] / usage["visual_tokens_before"] == RATIO < 1
    # LOOK-M keeps every text entry and a quarter of the video's: its frames are image entries to it
    text_entries = completion.usage.prompt_tokens - 24
    assert (usage["kv_tokens_prompt"], usage["kv_tokens_kept"]) == (completion.usage.prompt_tokens, text_entries + 6)
    # the prompt holds the merged video: <|vision_start|>, its 24 placeholders, <|vision_end|>
    plain = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": [text]}], max_tokens=1, temperature=0
    )
    assert completion.usage.prompt_tokens - plain.usage.prompt_tokens == 1 + 24 + 1
    assert plain.usage.model_extra.get("mmrag") is None


def test_images_and_a_video_count_together(client) -> None:
    """A 112x112 image (16 tokens, 8 kept) beside the video: the usage figures sum both."""
    client, model, _ = client
    picture = cv2.imencode(".png", np.random.default_rng(1).integers(0, 256, (112, 112, 3), dtype=np.uint8))[1]
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(picture).decode()}}
    url = "data:video/mp4;base64," + base64.b64encode(noise_clip(FRAMES)).decode()
    video = {"type": "video_url", "video_url": {"url": url}}
    completion = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [image, video, {"type": "text", "text": "and?"}]}],
        max_tokens=2,
        temperature=0,
    )
    usage = completion.usage.model_extra["mmrag"]
    assert (usage["visual_tokens_before"], usage["visual_tokens_after"]) == (16 + 48, 8 + 24)


def test_the_prompt_budget_counts_a_video_as_vllm_expands_it(client) -> None:
    """Text RAG's budget (PromptBuilder) predicts the video's placeholders from the frames' shape: the same
    counts as vLLM's processor and the plugin gave above."""
    from mmrag.serving.engine.prompt import video_tokens

    _, _, engine = client
    info = engine._llm.renderer.get_mm_processor().info
    frames = np.zeros((FRAMES, 112, 112, 3), np.uint8)
    assert (video_tokens(info, frames, None), video_tokens(info, frames, RATIO)) == (48, 24)
    assert video_tokens(info, frames[:5], 0.25) == 3 * 4  # an odd count: the last frame repeats to fill a patch


def test_documents_as_xrag_tokens_beside_a_merged_image(client) -> None:
    """``xrag`` mode with an image at AIM 1/2 and LOOK-M: the two documents are two prompt tokens where text
    RAG spends their bytes, the image keeps 8 of its 16 tokens, and LOOK-M keeps every text entry (the
    ``<xrag>`` ones included) and a quarter of the image's."""
    client, model, engine = client
    assert engine._llm.model_config.architectures == ["XragQwen2_5_VLForConditionalGeneration"]
    picture = cv2.imencode(".png", np.random.default_rng(2).integers(0, 256, (112, 112, 3), dtype=np.uint8))[1]
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(picture).decode()}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "Who keeps the lighthouse?"}]}]
    answers = {
        mode: client.chat.completions.create(
            model=model, messages=messages, max_tokens=2, temperature=0, extra_body={"retrieval": {"mode": mode}}
        )
        for mode in ("xrag", "text")
    }
    xrag, text = answers["xrag"], answers["text"]
    assert xrag.choices[0].message.content
    assert xrag.model_extra["retrieval"]["mode"] == "xrag" and xrag.model_extra["retrieval"]["context_documents"] == 2
    # Byte-level tokenizer: a document's text is its bytes; in xrag mode it is one token.
    saved = sum(len(d.encode()) - 1 for d in DOCUMENTS)
    assert text.usage.prompt_tokens - xrag.usage.prompt_tokens == saved
    usage = xrag.usage.model_extra["mmrag"]
    assert (usage["visual_tokens_before"], usage["visual_tokens_after"]) == (16, 8)
    assert (usage["kv_tokens_prompt"], usage["kv_tokens_kept"]) == (
        xrag.usage.prompt_tokens,
        xrag.usage.prompt_tokens - 8 + 2,
    )
