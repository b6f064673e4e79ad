"""``AimLlava``: vLLM's LLaVA with AIM stage (a) (bipartite visual-token merge after the projector).

Pinned to vLLM 0.32 (``model_executor/models/llava.py``); the seams used are the ones named below.

- **Count.** :meth:`AimLlavaProcessingInfo.get_num_image_tokens` returns
  :func:`~mmrag.serving.vllm_plugin.aim.aim_kept_tokens` of the stock count, so the frontend expands
  each ``<image>`` to the kept count, and profiling (``get_max_image_tokens``) sees it too.
- **Ratio.** The deployment default is ``hf_config.aim_keep_ratio`` (set through ``hf_overrides``, seen
  by every process); a request overrides it with ``mm_processor_kwargs={"aim_keep_ratio": r}``, which
  vLLM folds into each image's hash: the processor cache, encoder cache and prefix-cache keys differ
  per ratio.
- **Consistency.** The processor computes the kept count once per image and hands it to the model as
  the per-image integer field ``aim_kept_tokens``; :meth:`AimLlava.embed_multimodal` merges each image
  to exactly that count, which is what vLLM scatters into the placeholders. Images given as
  precomputed ``image_embeds`` carry no such field and pass unmerged (their count is their length).
- **Positions.** With ``compression.aim_positions: spread`` the text config carries an M-RoPE section
  (:func:`~mmrag.serving.vllm_plugin.aim.rope_overrides`), which puts the model on vLLM's per-request
  position table, and :meth:`AimLlava.get_mrope_input_positions` spreads each merged image over its
  original span (``aim_full_tokens``, the stock count, travels with each image like the kept count).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import BatchFeature
from vllm.model_executor.models.interfaces import SupportsMRoPE
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from mmrag.serving.vllm_plugin.aim import (
    FULL_TOKENS_FIELD,
    KEEP_RATIO_KEY,
    KEPT_TOKENS_FIELD,
    SpreadPositions,
    aim_kept_tokens,
    merge_to_count,
    request_keep_ratio,
)

__all__ = ["AimLlava"]


class AimLlavaProcessingInfo(LlavaProcessingInfo):
    def default_keep_ratio(self) -> float:
        return request_keep_ratio({}, self.get_hf_config())

    def keep_ratio(self, mm_kwargs: Mapping[str, object]) -> float:
        return request_keep_ratio(mm_kwargs, self.get_hf_config())

    def get_full_image_tokens(self, *, image_width: int, image_height: int) -> int:
        """The stock count: projector output tokens before any merge."""
        return super().get_num_image_tokens(image_width=image_width, image_height=image_height)

    def get_num_image_tokens(self, *, image_width: int, image_height: int, keep_ratio: float | None = None) -> int:
        full = self.get_full_image_tokens(image_width=image_width, image_height=image_height)
        return aim_kept_tokens(full, self.default_keep_ratio() if keep_ratio is None else keep_ratio)


class AimLlavaMultiModalProcessor(LlavaMultiModalProcessor):
    info: AimLlavaProcessingInfo

    def _apply_hf_processor_main(self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]) -> BatchFeature:
        """Stock processing (the ratio is ours, HF never sees it) plus each image's kept count."""
        ratio = self.info.keep_ratio(hf_kwargs)
        stock_kwargs = {k: v for k, v in hf_kwargs.items() if k != KEEP_RATIO_KEY}
        outputs = super()._apply_hf_processor_main(mm_items, stock_kwargs)
        images = mm_items.get("image")
        if isinstance(images, ImageProcessorItems) and len(images) > 0:
            kept = [self._image_tokens(images, i, ratio) for i in range(len(images))]
            full = [self._image_tokens(images, i, 1.0) for i in range(len(images))]
            outputs[KEPT_TOKENS_FIELD] = torch.tensor(kept, dtype=torch.int64)
            outputs[FULL_TOKENS_FIELD] = torch.tensor(full, dtype=torch.int64)
        return outputs

    def _image_tokens(self, images: ImageProcessorItems, item_idx: int, ratio: float) -> int:
        size = images.get_image_size(item_idx)
        return self.info.get_num_image_tokens(image_width=size.width, image_height=size.height, keep_ratio=ratio)

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields[KEPT_TOKENS_FIELD] = MultiModalFieldConfig.batched("image")
        fields[FULL_TOKENS_FIELD] = MultiModalFieldConfig.batched("image")
        return fields

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_token_id = self.info.get_hf_config().image_token_index
        ratio = self.info.keep_ratio(hf_processor_mm_kwargs)

        def get_replacement(item_idx: int) -> list[int]:
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if isinstance(images, ImageEmbeddingItems):
                return [image_token_id] * images.get_feature_size(item_idx)
            return [image_token_id] * self._image_tokens(images, item_idx, ratio)

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=get_replacement)]


@MULTIMODAL_REGISTRY.register_processor(
    AimLlavaMultiModalProcessor, info=AimLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class AimLlava(SpreadPositions, LlavaForConditionalGeneration, SupportsMRoPE):
    """LLaVA whose image embeddings are merged per image to the count the processor reserved."""

    def embed_multimodal(self, **kwargs: object):
        kwargs.pop(FULL_TOKENS_FIELD, None)
        kept = kwargs.pop(KEPT_TOKENS_FIELD, None)
        embeds = super().embed_multimodal(**kwargs)
        if kept is None or len(embeds) == 0:
            return embeds
        counts = [int(k) for k in (kept.tolist() if isinstance(kept, torch.Tensor) else kept)]
        if len(counts) != len(embeds):
            raise ValueError(f"{len(embeds)} images but {len(counts)} kept-token counts")
        if all(count == image.shape[0] for count, image in zip(counts, embeds, strict=True)):
            return embeds  # ratio 1: stock vLLM, untouched
        return [merge_to_count(image[None], count)[0] for count, image in zip(counts, embeds, strict=True)]
