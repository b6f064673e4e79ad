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
- **positions**: one per token, consecutive (``"contiguous"``: the merged image is a shorter run), or with
  ``"spread"`` each merged image's tokens at :func:`~mmrag.kernels.token_merge.spread_positions` of its packed
  span and the text after it at its unmerged positions;
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
from mmrag.kernels.reference import hf_forward
from mmrag.kernels.token_merge import spread_positions

__all__ = ["OnevisionReference", "OnevisionReferenceOutput"]

_ATTENTION = "mmrag_onevision_capture"


@dataclass
class OnevisionReferenceOutput(hf_forward.ReferenceOutput):
    """:class:`~mmrag.kernels.reference.hf_forward.ReferenceOutput` and image_tokens: placeholders per image
    (packed, or merged)."""

    image_tokens: list[int]


class OnevisionReference:
    """LLaVA-OneVision with AIM's merge at ``merge_passes`` halvings (0: none), its tokens at ``positions``
    (``"contiguous"`` or ``"spread"``), and an optional KV method compacting the cache after the prefill."""

    def __init__(
        self, model: nn.Module, merge_passes: int = 0, kv: KVMethod | None = None, positions: str = "contiguous"
    ) -> None:
        from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward  # its LM is Qwen2

        self.model = model.eval()
        hf_forward.capture_prefill_attention(self.model.model.language_model, _ATTENTION, eager_attention_forward)
        self.merge = AIMMerge(num_passes=merge_passes) if merge_passes else None
        self.kv = kv
        if positions not in ("contiguous", "spread"):
            raise ValueError(f"positions must be 'contiguous' or 'spread', not {positions!r}")
        self.positions = positions
        self.config = model.config

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> OnevisionReference:
        from transformers import LlavaOnevisionForConditionalGeneration

        model = LlavaOnevisionForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager"
        )
        return cls(model, **kwargs)

    def image_tokens(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """Per image: ``(T, C)`` packed tokens (base view, unpadded tile grid, one newline per row)."""
        packed = self.model.model.get_image_features(
            pixel_values,
            image_sizes,
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            vision_aspect_ratio=self.config.vision_aspect_ratio,
            batch_num_images=None,  # every image tiled, as vLLM does
        ).pooler_output
        return list(packed)

    def merged(self, image: torch.Tensor) -> torch.Tensor:
        """One image's packed tokens, or ``(kept, C)`` merged, in reading order of their first source."""
        if self.merge is None:
            return image
        return hf_forward.merge_in_reading_order(self.merge, image[None])[0]

    def _positions(self, input_ids: torch.Tensor, kept: list[int], full: list[int]) -> torch.Tensor:
        """Positions of the expanded prompt: ``input_ids`` has one ``<image>`` per image, image ``i`` takes
        ``kept[i]`` placeholders standing for ``full[i]`` packed tokens."""
        positions, cursor = [], 0
        images = iter(zip(kept, full, strict=True))
        for t in input_ids.tolist():
            if t != self.config.image_token_index:
                positions.append(cursor)
                cursor += 1
                continue
            k, n = next(images)
            offsets = spread_positions(n, k) if self.positions == "spread" else range(k)
            positions += [cursor + o for o in offsets]
            cursor += n if self.positions == "spread" else k
        return torch.tensor(positions)

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
        packed = self.image_tokens(pixel_values, image_sizes) if pixel_values is not None else []
        images = [self.merged(image) for image in packed]
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
        positions = self._positions(input_ids, [i.shape[0] for i in images], [p.shape[0] for p in packed])
        out = self.model(inputs_embeds=embeds, position_ids=positions[None], past_key_values=cache, use_cache=True)
        is_image = ids == token
        kept = length
        if self.kv is not None and is_image.any():
            kept = hf_forward.compact_prefill_cache(self.model.model.language_model.layers, cache, self.kv, is_image)
        # Spread positions leave gaps: decoding continues after the last prompt position, not at the length.
        next_position = int(positions[-1]) + 1
        tokens, logprobs = hf_forward.greedy_decode(
            self.model, cache, out.logits[0, -1], max_new_tokens, next_position, (1, 1)
        )
        return OnevisionReferenceOutput(tokens, logprobs, length, kept, [i.shape[0] for i in images])
