"""A tiny random-weight LLaVA checkpoint, generated deterministically, in the layout vLLM loads.

The checkpoint is a CLIP vision tower + a 2-layer MLP projector + a Llama text model, with a byte-level
tokenizer, a chat template and an ``<image>`` placeholder. It exists for plumbing: tests and the default
server run it, and every file is a pure function of the seed (the same seed gives identical bytes).

Sizes are the smallest vLLM's CPU backend accepts: attention head size 64 (16 is rejected), one KV head.
A 56x56 image gives 16 visual tokens (4x4 patches of 14 pixels, CLS dropped).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmrag.serving.models.checkpoint import TinySpec, byte_level_tokenizer, save_checkpoint, save_weights

# Literal text is emitted through {{ '...' }} so that the whitespace-trimming tags keep it intact.
# GENERATION_PROMPT is substituted last: the trained model ends it with a space (see chat_template).
_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ 'SYSTEM: ' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' }}"
    "{%- else -%}{{ 'ASSISTANT: ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] in ('image', 'image_url') -%}{{ '<image>\\n' }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ '</s>' }}{%- endif -%}{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'GENERATION_PROMPT' }}{%- endif -%}"
)


def chat_template(generation_prompt: str = "ASSISTANT:") -> str:
    return _CHAT_TEMPLATE.replace("GENERATION_PROMPT", generation_prompt)


CHAT_TEMPLATE = chat_template()

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<image>")


@dataclass(frozen=True)
class TinyLlavaSpec(TinySpec):
    """Shape of the generated model. Defaults are the fixture the tests and the default server use."""

    image_size: int = 56
    # CLIP hidden state the projector reads: -2 as in LLaVA-1.5; -1 wastes no layer in a tower this small.
    vision_feature_layer: int = -2

    @property
    def visual_tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def locate_tiny_random(seed: int = 0) -> Path:
    """Registry entry ``tiny-random``: generated into the cache once per seed."""
    from mmrag.serving.models.registry import prepared

    return prepared("tiny-random", f"seed:{seed}", lambda out: make_tiny_llava(out, TinyLlavaSpec(seed=seed)))


def make_tiny_llava(out_dir: str | Path, spec: TinyLlavaSpec | None = None) -> Path:
    """Write the checkpoint to ``out_dir`` and return it. Safe to call again: files are rewritten."""
    spec = spec or TinyLlavaSpec()
    tokenizer = _build_tokenizer(spec)
    return write_checkpoint(out_dir, build_model(spec, tokenizer), tokenizer, spec)


def write_checkpoint(out_dir: str | Path, model, tokenizer, spec: TinyLlavaSpec) -> Path:
    """Processor, config and bf16 weights in the hub layout, plus the spec that built them; returns the directory."""
    return save_checkpoint(out_dir, build_processor(tokenizer, spec), model, spec, to_hub_name)


def _build_tokenizer(spec: TinyLlavaSpec):
    return wrap_tokenizer(byte_level_tokenizer(SPECIAL_TOKENS), CHAT_TEMPLATE, spec.max_position_embeddings)


def wrap_tokenizer(core, template: str, max_length: int):
    """A ``tokenizers.Tokenizer`` holding :data:`SPECIAL_TOKENS` as the checkpoint's fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=template,
        model_max_length=max_length,
    )


def build_processor(tokenizer, spec: TinyLlavaSpec):
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )


def build_model(spec: TinyLlavaSpec, tokenizer):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=2 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_hidden // spec.head_dim,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.text_hidden,
        intermediate_size=2 * spec.text_hidden,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_hidden // spec.head_dim,
        num_key_value_heads=spec.text_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=spec.vision_feature_layer,
        image_seq_length=spec.visual_tokens_per_image,
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# transformers 5 names the sub-modules differently from the hub checkpoints; vLLM's loader expects the
# hub layout, so weights are written under those names (the layout of e.g. llava-hf/llava-1.5-7b-hf).
_HUB_PREFIXES = (
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


def to_hub_name(name: str) -> str:
    for ours, hub in _HUB_PREFIXES:
        if name.startswith(ours):
            return hub + name[len(ours) :]
    raise ValueError(f"unexpected LLaVA weight name {name!r}")


def from_hub_name(name: str) -> str:
    """The inverse of :func:`to_hub_name`: a hub checkpoint's weight name as transformers 5 calls it."""
    for ours, hub in _HUB_PREFIXES:
        if name.startswith(hub):
            return ours + name[len(hub) :]
    raise ValueError(f"unexpected LLaVA hub weight name {name!r}")


def save_hub_weights(model, out: Path) -> None:
    """Config, generation config and bf16 weights under the hub names; a tied LM head is not written."""
    save_weights(model, out, to_hub_name)
