"""A tiny random-weight LLaVA-OneVision checkpoint, generated deterministically, in the layout vLLM loads natively.

The plugin's third model family: a SigLIP vision tower read at its last layer (all patches, no CLS), a
2-layer MLP projector, a learned ``image_newline`` vector and a Qwen2 text model, with anyres tiling (each
image is one base view plus tiles laid out by ``image_grid_pinpoints``), a byte-level tokenizer and a ChatML
chat template with ``<image>`` and ``<video>``. It exists for plumbing: the plugin's parity tests run it,
and every file is a pure function of the seed.

Layout: ``LlavaOnevisionForConditionalGeneration`` as transformers 5 saves it
(``model.multi_modal_projector.*``, ``model.image_newline``, ``model.language_model.*``, ``lm_head.*``)
with the tower under the hub's ``model.vision_tower.vision_model.*``, which vLLM 0.32's weight mapper reads
as it is and transformers loads.

Sizes: 56x56 views of 14-pixel patches (4x4 = 16 tokens a view), tiles up to 2x2
(``TinyOnevisionSpec.pinpoints``): a 112x112 image is the base view's 16 tokens plus an 8x8 tile grid with
one newline per row (72), 88 in all; a 56x112 one 16 + 4x8 + 4 = 52; an 84x112 one is unpadded to 6x8 rows
(16 + 48 + 6 = 70). The largest grid (8x8) stays under anyres_max_9's interpolation threshold, so no
feature is resampled. Text attention head size 64 (vLLM's CPU attention rejects 16), one KV head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmrag.serving.models import checkpoint

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "TinyOnevisionSpec", "locate_tiny_onevision", "make_tiny_onevision"]

# ChatML as LLaVA-OneVision writes it, each image or video placeholder on its own line before the text.
CHAT_TEMPLATE = checkpoint.chatml_template(image="<image>\\n", video="<video>\\n")

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")


@dataclass(frozen=True)
class TinyOnevisionSpec(checkpoint.TinySpec):
    """Shape of the generated model. Defaults are the fixture the tests use."""

    image_size: int = 56
    # Tiles of image_size pixels: (height, width) resolutions anyres chooses among (1x1 .. 2x2 tiles).
    pinpoints: tuple[tuple[int, int], ...] = ((56, 56), (56, 112), (112, 56), (112, 112))
    vision_hidden: int = 64
    vision_heads: int = 2
    # Standard deviation of every weight matrix and of image_newline (see build_model).
    init_std: float = 0.1

    @property
    def view_tokens(self) -> int:
        """Tokens of one 56x56 view (base image or tile): all patches, SigLIP has no CLS."""
        return (self.image_size // self.patch_size) ** 2


def locate_tiny_onevision(seed: int = 0) -> Path:
    """Registry entry ``tiny-llava-onevision``: generated into the cache once per seed."""
    from mmrag.serving.models.registry import prepared

    return prepared(
        "tiny-llava-onevision",
        f"llava-onevision|xrag-token|seed:{seed}",
        lambda out: make_tiny_onevision(out, TinyOnevisionSpec(seed=seed)),
    )


def make_tiny_onevision(out_dir: str | Path, spec: TinyOnevisionSpec | None = None) -> Path:
    """Write the checkpoint to ``out_dir`` and return it. Safe to call again: files are rewritten."""
    spec = spec or TinyOnevisionSpec()
    tokenizer = _build_tokenizer(spec)
    processor, model = build_processor(tokenizer, spec), build_model(spec, tokenizer)
    return checkpoint.save_checkpoint(out_dir, processor, model, spec, _hub_name)


def _build_tokenizer(spec: TinyOnevisionSpec):
    media = {"image_token": "<image>", "video_token": "<video>"}
    return checkpoint.chatml_tokenizer(SPECIAL_TOKENS, media, CHAT_TEMPLATE, spec.max_position_embeddings)


def build_processor(tokenizer, spec: TinyOnevisionSpec):
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    size = {"height": spec.image_size, "width": spec.image_size}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=[list(p) for p in spec.pinpoints]),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=spec.view_tokens,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
    )


def build_model(spec: TinyOnevisionSpec, tokenizer):
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": spec.vision_hidden,
        "intermediate_size": 2 * spec.vision_hidden,
        "num_hidden_layers": spec.vision_layers,
        "num_attention_heads": spec.vision_heads,
        "image_size": spec.image_size,
        "patch_size": spec.patch_size,
        "vision_use_head": False,
    }
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=checkpoint.qwen2_text_config(spec, tokenizer, model_type="qwen2", tie_word_embeddings=False),
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=[list(p) for p in spec.pinpoints],
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    # image_newline (1-D) is drawn too, so that a newline differs from the content tokens around it.
    checkpoint.redraw_weights(model, spec.init_std, vectors=("image_newline",))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def _hub_name(name: str) -> str:
    """transformers 5's weight name as the hub checkpoints write it: the SigLIP tower keeps its ``vision_model``
    level (vLLM's SiglipVisionModel has it; transformers strips it again on load)."""
    tower = "model.vision_tower."
    return name.replace(tower, tower + "vision_model.", 1) if name.startswith(tower) else name
