"""``AimLlavaOnevision``: vLLM's LLaVA-OneVision with AIM stage (a), each image's packed visual tokens merged
after the projector, before the LLM.

Pinned to vLLM 0.32 (``model_executor/models/llava_onevision.py``, ``llava_next.py``); the seams are these:

- **What is merged.** An image reaches the LLM as one packed sequence: the base view's tokens, then the
  anyres tile grid (unpadded to the image's aspect ratio) row by row, each row closed by the learned
  ``image_newline`` vector. AIM merges that whole sequence, newlines included, as ``T`` tokens to
  ``ceil(T x ratio)`` (:func:`~mmrag.serving.vllm_plugin.aim.aim_kept_tokens`). Why: ``T`` is the count vLLM
  reserves in the frontend (``get_num_image_tokens``, before any pixel is encoded), so the kept count stays
  a pure function of it, as for LLaVA and Qwen2.5-VL; and a newline is one vector repeated, so its closest
  token in the other half of a pass is another newline (cosine 1) wherever there is one, and merged
  newlines are the newline again (the mean of equal vectors; on the tiny model's images they merged only
  with each other: docs/compression.md). Holding them out instead would leave row markers with no rows
  left to close. The merged tokens come back in reading order (each at the place of the first input token
  it stands for: :func:`~mmrag.serving.vllm_plugin.aim.merge_in_reading_order`), so base view, grid rows
  and newlines keep their order on the 1-D positions the Qwen2 LM reads.
- **Count.** :meth:`AimLlavaOnevisionMultiModalProcessor._apply_hf_processor_main` hands the model each
  image's kept count (``aim_kept_tokens``); the prompt update expands each ``<image>`` to it, and the model
  merges to exactly what was reserved. Images given as ``image_embeds`` carry no count and pass unmerged.
- **Ratio.** As for LLaVA (:mod:`mmrag.serving.vllm_plugin.model`): ``hf_config.aim_keep_ratio`` per
  deployment, ``mm_processor_kwargs={"aim_keep_ratio": r}`` per request, part of every cache key.
- **Positions.** Consecutive by default (stock vLLM's): the merged image is a shorter run and the text after
  it moves closer, AIM's contiguous layout. With ``compression.aim_positions: spread`` the Qwen2 LM's text
  config carries an M-RoPE section (:func:`~mmrag.serving.vllm_plugin.aim.rope_overrides`, as for LLaVA), and
  :meth:`AimLlavaOnevision.get_mrope_input_positions` spreads each merged image over its original span (the
  stock count travels with each image as ``aim_full_tokens``).
- **Videos** pass unmerged (their stock count: pooled frames and one newline).

At ratio 1 nothing is merged and no tensor is touched: stock vLLM bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import BatchFeature
from vllm.model_executor.models.interfaces import SupportsMRoPE
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from mmrag.serving.vllm_plugin.aim import (
    FULL_TOKENS_FIELD,
    KEEP_RATIO_KEY,
    KEPT_TOKENS_FIELD,
    SpreadPositions,
    aim_kept_tokens,
    merge_in_reading_order,
    request_keep_ratio,
)

__all__ = ["AimLlavaOnevision"]


class AimLlavaOnevisionProcessingInfo(LlavaOnevisionProcessingInfo):
    def keep_ratio(self, mm_kwargs: Mapping[str, object]) -> float:
        return request_keep_ratio(mm_kwargs, self.get_hf_config())

    def get_full_image_tokens(self, *, image_width: int, image_height: int) -> int:
        """The stock count (base view, unpadded tile grid, one newline per row): the server's
        ``visual_tokens_before``."""
        return super().get_num_image_tokens(image_width=image_width, image_height=image_height)

    def get_num_image_tokens(self, *, image_width: int, image_height: int, keep_ratio: float | None = None) -> int:
        """vLLM's own callers (profiling: the most tokens an image can take) get the stock count; the server's
        prompt budget (:mod:`mmrag.serving.engine.prompt`) passes the request's ``keep_ratio`` and gets the
        merged count."""
        full = self.get_full_image_tokens(image_width=image_width, image_height=image_height)
        return full if keep_ratio is None else aim_kept_tokens(full, keep_ratio)


class AimLlavaOnevisionMultiModalProcessor(LlavaOnevisionMultiModalProcessor):
    info: AimLlavaOnevisionProcessingInfo

    def _apply_hf_processor_main(self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]) -> BatchFeature:
        """Stock processing (the ratio is ours, HF never sees it) plus each image's kept and stock count."""
        ratio = self.info.keep_ratio(hf_kwargs)
        stock_kwargs = {k: v for k, v in hf_kwargs.items() if k != KEEP_RATIO_KEY}
        outputs = super()._apply_hf_processor_main(mm_items, stock_kwargs)
        images = mm_items.get("image")
        if isinstance(images, ImageProcessorItems) and len(images) > 0:
            sizes = [images.get_image_size(i) for i in range(len(images))]
            full = [self.info.get_full_image_tokens(image_width=s.width, image_height=s.height) for s in sizes]
            outputs[KEPT_TOKENS_FIELD] = torch.tensor([aim_kept_tokens(t, ratio) for t in full], dtype=torch.int64)
            outputs[FULL_TOKENS_FIELD] = torch.tensor(full, dtype=torch.int64)
        return outputs

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
        stock = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        image_token_id = self.info.get_hf_config().image_token_index
        images = [update for update in stock if update.modality == "image"]
        if len(images) != 1:
            raise RuntimeError(f"vLLM's LLaVA-OneVision processor changed: {len(images)} image updates")
        (image,) = images

        def replacement(item_idx: int):
            item = out_mm_kwargs["image"][item_idx]
            if KEPT_TOKENS_FIELD not in item:  # embeddings given by the caller: their own length
                return image.replacement(item_idx) if callable(image.replacement) else image.replacement
            return [image_token_id] * int(item[KEPT_TOKENS_FIELD].data)

        return [
            PromptReplacement(modality="image", target=[image_token_id], replacement=replacement),
            *(update for update in stock if update.modality != "image"),
        ]


@MULTIMODAL_REGISTRY.register_processor(
    AimLlavaOnevisionMultiModalProcessor,
    info=AimLlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class AimLlavaOnevision(SpreadPositions, LlavaOnevisionForConditionalGeneration, SupportsMRoPE):
    """LLaVA-OneVision whose image embeddings are merged per image to the count the processor reserved."""

    def embed_multimodal(self, **kwargs: object):
        kwargs.pop(FULL_TOKENS_FIELD, None)
        kept = kwargs.pop(KEPT_TOKENS_FIELD, None)
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
        if not inputs:
            return []
        embeddings: list[torch.Tensor] = []
        for modality, item_input in inputs.items():  # the order of the kwargs, as vLLM's own
            if modality == "video":
                embeddings += list(self._process_video_pixels(item_input))
                continue
            images = list(self._process_image_input(item_input))
            if kept is None or item_input["type"] == "image_embeds":
                embeddings += images
                continue
            counts = [int(c) for c in (kept.tolist() if isinstance(kept, torch.Tensor) else kept)]
            if len(counts) != len(images):
                raise ValueError(f"{len(images)} images but {len(counts)} kept-token counts")
            embeddings += [self._merge(image, count) for image, count in zip(images, counts, strict=True)]
        return embeddings

    @staticmethod
    def _merge(image: torch.Tensor, kept: int) -> torch.Tensor:
        """One image's packed ``(T, C)`` tokens -> ``(kept, C)`` in reading order."""
        if kept == image.shape[0]:
            return image  # ratio 1: stock vLLM, untouched
        if not 1 <= kept < image.shape[0]:
            raise ValueError(f"cannot merge {image.shape[0]} image tokens to {kept}")
        return merge_in_reading_order(image[None], kept)[0]
