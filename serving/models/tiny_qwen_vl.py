"""A tiny random-weight Qwen2.5-VL checkpoint, generated deterministically, in the layout vLLM loads natively.

The second model family of the plugin (after LLaVA): a Qwen2.5-VL vision tower (windowed ViT, 2x2 patch
merger) and a Qwen2 text model on multimodal RoPE (M-RoPE: temporal, height and width positions), with a
byte-level tokenizer, Qwen's ChatML chat template and its vision tokens. It exists for plumbing: the
plugin's parity tests run it, and every file is a pure function of the seed.

Layout: ``Qwen2_5_VLForConditionalGeneration`` saved by transformers 5 (``model.visual.*``,
``model.language_model.*``, ``lm_head.*``), which vLLM 0.32's weight mapper reads as it is; no renaming.
Sizes: text attention head size 64 (vLLM's CPU attention rejects 16), one KV head, M-RoPE sections
``[16, 8, 8]`` (half the head size, split as Qwen splits ``[16, 24, 24]`` of 64). Images are resized to
multiples of 28 pixels (patch 14 x merge 2) between :attr:`TinyQwenVLSpec.min_pixels` and
``max_pixels``: a 112x112 image is 8x8 patches, 4x4 = 16 visual tokens after the merger.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmrag.serving.models import checkpoint

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "TinyQwenVLSpec", "locate_tiny_qwen_vl", "make_tiny_qwen_vl"]

# ChatML, as Qwen2.5-VL's own template writes it.
CHAT_TEMPLATE = checkpoint.chatml_template(
    image="<|vision_start|><|image_pad|><|vision_end|>", video="<|vision_start|><|video_pad|><|vision_end|>"
)

# Qwen's special tokens (the names its processor and vLLM look up), then the 256 bytes.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


@dataclass(frozen=True)
class TinyQwenVLSpec(checkpoint.TinySpec):
    """Shape of the generated model. Defaults are the fixture the tests use."""

    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    mrope_section: tuple[int, int, int] = (16, 8, 8)
    # Images are resized to 56x56 .. 224x224 pixels (4 .. 64 visual tokens): small prompts for tests.
    min_pixels: int = 56 * 56
    max_pixels: int = 224 * 224
    # Standard deviation of every weight matrix (see build_model).
    init_std: float = 0.1


def locate_tiny_qwen_vl(seed: int = 0) -> Path:
    """Registry entry ``tiny-qwen2.5-vl``: generated into the cache once per seed."""
    from mmrag.serving.models.registry import prepared

    return prepared(
        "tiny-qwen2.5-vl",
        f"qwen2.5-vl|xrag-token|seed:{seed}",
        lambda out: make_tiny_qwen_vl(out, TinyQwenVLSpec(seed=seed)),
    )


def make_tiny_qwen_vl(out_dir: str | Path, spec: TinyQwenVLSpec | None = None) -> Path:
    """Write the checkpoint to ``out_dir`` and return it. Safe to call again: files are rewritten."""
    spec = spec or TinyQwenVLSpec()
    tokenizer = _build_tokenizer(spec)
    processor, model = build_processor(tokenizer, spec), build_model(spec, tokenizer)
    return checkpoint.save_checkpoint(out_dir, processor, model, spec)


def _build_tokenizer(spec: TinyQwenVLSpec):
    media = {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_bos_token": "<|vision_start|>",
        "vision_eos_token": "<|vision_end|>",
    }
    return checkpoint.chatml_tokenizer(SPECIAL_TOKENS, media, CHAT_TEMPLATE, spec.max_position_embeddings)


def build_processor(tokenizer, spec: TinyQwenVLSpec):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    sizes = {
        "min_pixels": spec.min_pixels,
        "max_pixels": spec.max_pixels,
        "patch_size": spec.patch_size,
        "temporal_patch_size": spec.temporal_patch_size,
        "merge_size": spec.spatial_merge_size,
    }
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**sizes),
        chat_template=CHAT_TEMPLATE,
    )


def build_model(spec: TinyQwenVLSpec, tokenizer):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if 2 * sum(spec.mrope_section) != spec.head_dim:
        raise ValueError(f"mrope_section {spec.mrope_section} must sum to half the head size {spec.head_dim}")
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    vision = {
        "depth": spec.vision_layers,
        "hidden_size": spec.vision_hidden,
        "intermediate_size": 2 * spec.vision_hidden,
        "num_heads": spec.vision_hidden // spec.head_dim,
        "patch_size": spec.patch_size,
        "spatial_merge_size": spec.spatial_merge_size,
        "temporal_patch_size": spec.temporal_patch_size,
        "out_hidden_size": spec.text_hidden,
        "window_size": 112,  # 8 patches: windows of 4x4 merged tokens
        "fullatt_block_indexes": [spec.vision_layers - 1],
        "tokens_per_second": 2,
    }
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(spec.mrope_section)}
    text = checkpoint.qwen2_text_config(spec, tokenizer, rope_parameters=rope)
    config = Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    checkpoint.redraw_weights(model, spec.init_std)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
