"""The reference for LLaVA-OneVision: transformers' own model (eager attention), with AIM's merge and a KV
method applied exactly, the oracle the plugin's ``AimLlavaOnevision`` and KV worker are checked against.

Like :class:`~mmrag.kernels.reference.qwen_vl.QwenReference` it drives transformers' model through its
public forward with ``inputs_embeds``, explicit positions and a ``DynamicCache``, and takes the prefill's
post-RoPE queries and keys from an attention function registered with transformers (eager attention, op
for op, plus a capture). Each part is derived independently of the vLLM plugin's code:

- **image tokens**: transformers' ``get_image_features`` with every image tiled (anyres), which packs the
  base view, the unpadded tile grid and one ``image_newline`` per row (vLLM lays out every image so;
  transformers' processor would give multi-image prompts the base view only, so the prompt's
  placeholders are expanded here, one per packed or merged token);
- **merge**: :class:`~mmrag.kernels.methods.aim.AIMMerge` (``num_passes`` halvings) on each image's packed
  tokens, newlines included, the merged tokens sorted by the first input token each stands for (its
  ``source_index``);
- **positions**: one per token, consecutive (the merged image is a shorter run);
- **KV method**: after the prefill, each layer's cache is replaced by what the method keeps of it (scores
  from the same queries and keys), and decoding continues at the logical positions.

One prompt at a time, greedy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mmrag.kernels.methods.aim import AIMMerge
from mmrag.kernels.methods.base import KVMethod

__all__ = ["OnevisionReference", "OnevisionReferenceOutput"]

_ATTENTION = "mmrag_onevision_capture"


def _capture_attention(module: nn.Module, query, key, value, attention_mask, scaling: float, **kwargs):
    """transformers' eager attention (Qwen2's); a prefill's post-RoPE queries, keys and values are kept."""
    from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward

    if query.shape[2] > 1:
        module.mmrag_prefill = (query, key, value)
    return eager_attention_forward(module, query, key, value, attention_mask, scaling, **kwargs)


@dataclass
class OnevisionReferenceOutput:
    """Attributes: token_ids: the greedy tokens. logprobs: ``(len(token_ids),)`` each chosen token's
    log-probability. prompt_len: tokens the LLM read. image_tokens: placeholders per image. kept: prompt KV
    entries per layer and head after the KV method (``prompt_len`` without one)."""

    token_ids: list[int]
    logprobs: torch.Tensor
    prompt_len: int
    image_tokens: list[int]
    kept: int


class OnevisionReference:
    """LLaVA-OneVision with AIM's merge at ``merge_passes`` halvings (0: none) and an optional KV method
    compacting the cache after the prefill."""

    def __init__(self, model: nn.Module, merge_passes: int = 0, kv: KVMethod | None = None) -> None:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

        AttentionInterface.register(_ATTENTION, _capture_attention)
        # Its mask is eager attention's (an unregistered name gets none: attention would not be causal).
        ALL_MASK_ATTENTION_FUNCTIONS.register(_ATTENTION, eager_mask)
        self.model = model.eval()
        self.model.model.language_model.config._attn_implementation = _ATTENTION
        self.merge = AIMMerge(num_passes=merge_passes) if merge_passes else None
        self.kv = kv
        self.config = model.config

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> OnevisionReference:
        from transformers import LlavaOnevisionForConditionalGeneration

        model = LlavaOnevisionForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager"
        )
        return cls(model, **kwargs)

    def image_tokens(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """Per image: ``(T, C)`` packed tokens, or ``(kept, C)`` merged, in reading order of their first source."""
        packed = self.model.model.get_image_features(
            pixel_values,
            image_sizes,
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            vision_aspect_ratio=self.config.vision_aspect_ratio,
            batch_num_images=None,  # every image tiled, as vLLM does
        ).pooler_output
        if self.merge is None:
            return list(packed)
        merged = []
        for item in packed:
            result = self.merge.apply(item[None])
            kept = result.tokens.shape[1]
            first = torch.full((1, kept), item.shape[0], dtype=torch.long)
            sources = torch.arange(item.shape[0])[None]
            first = first.scatter_reduce(1, result.source_index, sources, "amin")
            order = first[0].argsort()
            merged.append(result.tokens[0, order])
        return merged

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        max_new_tokens: int = 8,
    ) -> OnevisionReferenceOutput:
        """Greedy decoding of the ``(L0,)`` prompt, one ``<image>`` token per image (unexpanded)."""
        from transformers import DynamicCache

        token = self.config.image_token_index
        images = self.image_tokens(pixel_values, image_sizes) if pixel_values is not None else []
        pieces, index = [], 0
        for t in input_ids.tolist():
            if t == token:
                pieces += [token] * images[index].shape[0]
                index += 1
            else:
                pieces.append(t)
        if index != len(images):
            raise ValueError(f"{index} <image> placeholders for {len(images)} images")
        ids = torch.tensor(pieces)
        embeds = self.model.get_input_embeddings()(ids[None])
        if images:
            features = torch.cat(images).to(embeds.dtype)
            embeds = embeds.masked_scatter((ids == token)[None, :, None].expand_as(embeds), features)
        cache = DynamicCache(config=self.config)
        length = ids.numel()
        out = self.model(
            inputs_embeds=embeds, position_ids=torch.arange(length)[None], past_key_values=cache, use_cache=True
        )
        is_image = ids == token
        kept = self._compact(cache, is_image) if self.kv is not None and is_image.any() else length
        logits, tokens, logprobs = out.logits[0, -1], [], []
        for step in range(max_new_tokens):
            chosen = int(logits.argmax())
            tokens.append(chosen)
            logprobs.append(torch.log_softmax(logits.float(), dim=-1)[chosen])
            if step + 1 == max_new_tokens:
                break
            out = self.model(
                input_ids=torch.tensor([[chosen]]),
                position_ids=torch.tensor([[length + step]]),
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[0, -1]
        return OnevisionReferenceOutput(tokens, torch.stack(logprobs), length, [i.shape[0] for i in images], kept)

    def _compact(self, cache, is_image: torch.Tensor) -> int:
        """Replace every layer's prompt cache by what the KV method keeps of it (same count in each layer)."""
        kept = None
        for index, layer in enumerate(self.model.model.language_model.layers):
            attn = layer.self_attn
            q, k, v = attn.mmrag_prefill
            del attn.mmrag_prefill
            scores = self.kv.scores(None, q[0], k[0], attn.scaling)
            keys, values, _ = self.kv.compress(k[0], v[0], scores, is_image)
            cache.layers[index].keys, cache.layers[index].values = keys[None], values[None]
            kept = keys.shape[1]
        return int(kept)
