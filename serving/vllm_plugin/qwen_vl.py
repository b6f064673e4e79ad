"""``AimQwen2_5_VL``: vLLM's Qwen2.5-VL with AIM stage (a), each image's (and video frame's) visual tokens
merged after the 2x2 patch merger, before the LLM.

Pinned to vLLM 0.32 (``model_executor/models/qwen2_5_vl.py``, ``qwen2_vl.py``); the seams are these:

- **Count.** :meth:`AimQwen2_5_VLMultiModalProcessor._get_prompt_updates` expands each image's
  ``<|image_pad|>`` to ``aim_kept_tokens(h * w, ratio)`` placeholders, and each video's to ``t`` times the
  count of one frame (frames are merged one by one, never across time), from the ``(t, h, w)`` grid the
  HF processor returns. The processor hands the model the per-frame count (``aim_kept_tokens`` per image,
  ``aim_video_kept_tokens`` per video), so the model merges to exactly what was reserved.
- **Ratio.** As for LLaVA (:mod:`mmrag.serving.vllm_plugin.model`): ``hf_config.aim_keep_ratio`` per
  deployment, ``mm_processor_kwargs={"aim_keep_ratio": r}`` per request, part of every cache key.
- **Positions.** vLLM lays a request's M-RoPE positions out when it is added, before its images are encoded,
  so merged tokens take positions that are a pure function of the grid and the kept count
  (:func:`~mmrag.serving.vllm_plugin.aim.mrope_image_positions`: ``contiguous`` or ``spread``, from
  ``hf_config.aim_positions``, or per request ``mm_processor_kwargs={"aim_positions": ...}``, which like the
  ratio is part of the cache keys), and the merge returns its tokens in reading order
  (:func:`~mmrag.serving.vllm_plugin.aim.merge_in_reading_order`) so that content and cells agree as
  far as they can. Unmerged items get Qwen's own positions: at ratio 1 this is stock vLLM bit for bit.
- **Not combined with EVS.** vLLM's own video pruning (``video_pruning_rate``) rewrites positions after
  the encoder; a deployment asking for both is refused at load.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from mmrag.serving.vllm_plugin.aim import (
    KEEP_RATIO_KEY,
    aim_kept_tokens,
    merge_in_reading_order,
    mrope_prompt_positions,
    request_keep_ratio,
)

__all__ = ["KEPT_FIELDS", "LAYOUTS", "LAYOUT_FIELDS", "POSITIONS_KEY", "AimQwen2_5_VL"]

# The ``hf_config`` attribute naming the merged tokens' position layout ("contiguous" or "spread").
POSITIONS_KEY = "aim_positions"
# Per-item processor outputs, by modality (ints: never cast): the kept tokens per frame, and the layout
# (index into LAYOUTS), so that a request may choose its own with mm_processor_kwargs={"aim_positions": ...}.
KEPT_FIELDS = {"image": "aim_kept_tokens", "video": "aim_video_kept_tokens"}
LAYOUT_FIELDS = {"image": "aim_layout", "video": "aim_video_layout"}
LAYOUTS = ("contiguous", "spread")
_GRID_FIELDS = {"image": "image_grid_thw", "video": "video_grid_thw"}


def _frame_tokens(grid: Sequence[int], merge_size: int) -> int:
    """Visual tokens of one frame after the patch merger."""
    return (int(grid[1]) // merge_size) * (int(grid[2]) // merge_size)


class AimQwen2_5_VLProcessingInfo(Qwen2_5_VLProcessingInfo):
    def keep_ratio(self, mm_kwargs: Mapping[str, object]) -> float:
        return request_keep_ratio(mm_kwargs, self.get_hf_config())

    def get_full_image_tokens(self, *, image_width: int, image_height: int) -> int:
        """The stock count of an image (after the patch merger, before AIM): what the server reports as
        ``visual_tokens_before``."""
        return super().get_num_image_tokens(
            image_width=image_width, image_height=image_height, image_processor=self.get_image_processor(), mm_kwargs={}
        )

    def get_num_image_tokens(
        self,
        *,
        image_width: int,
        image_height: int,
        image_processor: Any = None,
        mm_kwargs: Mapping[str, object] | None = None,
        keep_ratio: float | None = None,
    ) -> int:
        """vLLM's own callers (profiling: the most tokens an image can take) get the stock count; the server's
        prompt budget (:mod:`mmrag.serving.engine.prompt`, LLaVA's signature) passes the request's
        ``keep_ratio`` and gets the merged count."""
        full = super().get_num_image_tokens(
            image_width=image_width,
            image_height=image_height,
            image_processor=image_processor if image_processor is not None else self.get_image_processor(),
            mm_kwargs=mm_kwargs or {},
        )
        return full if keep_ratio is None else aim_kept_tokens(full, keep_ratio)

    def layout(self, mm_kwargs: Mapping[str, object]) -> str:
        layout = mm_kwargs.get(POSITIONS_KEY) or getattr(self.get_hf_config(), POSITIONS_KEY, LAYOUTS[0])
        if layout not in LAYOUTS:
            raise ValueError(f"aim_positions must be one of {list(LAYOUTS)}, got {layout!r}")
        return str(layout)


class AimQwen2_5_VLMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    info: AimQwen2_5_VLProcessingInfo

    @property
    def _merge_size(self) -> int:
        return self.info.get_hf_config().vision_config.spatial_merge_size

    def _apply_hf_processor_main(self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]) -> BatchFeature:
        """Stock processing (the ratio is ours, HF never sees it) plus each item's kept count per frame."""
        ratio, layout = self.info.keep_ratio(hf_kwargs), LAYOUTS.index(self.info.layout(hf_kwargs))
        stock_kwargs = {k: v for k, v in hf_kwargs.items() if k not in (KEEP_RATIO_KEY, POSITIONS_KEY)}
        outputs = super()._apply_hf_processor_main(mm_items, stock_kwargs)
        for modality, field in KEPT_FIELDS.items():
            grids = outputs.get(_GRID_FIELDS[modality])
            if grids is not None and f"{modality}_embeds" not in outputs:
                counts = [aim_kept_tokens(_frame_tokens(g, self._merge_size), ratio) for g in grids.tolist()]
                outputs[field] = torch.tensor(counts, dtype=torch.int64)
                outputs[LAYOUT_FIELDS[modality]] = torch.full((len(counts),), layout, dtype=torch.int64)
        return outputs

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        for modality in KEPT_FIELDS:
            fields[KEPT_FIELDS[modality]] = MultiModalFieldConfig.batched(modality)
            fields[LAYOUT_FIELDS[modality]] = MultiModalFieldConfig.batched(modality)
        return fields

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, Any],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()
        placeholder = {"image": config.image_token_id, "video": config.video_token_id}
        ratio = self.info.keep_ratio(hf_processor_mm_kwargs)

        def replacement(item_idx: int, modality: str) -> list[int]:
            item = out_mm_kwargs[modality][item_idx]
            grid = item[_GRID_FIELDS[modality]].data
            assert isinstance(grid, torch.Tensor)
            frames, full = int(grid[0]), _frame_tokens(grid.tolist(), self._merge_size)
            # Embeddings given by the caller (no kept field) pass unmerged: their count is their length.
            kept = aim_kept_tokens(full, ratio) if KEPT_FIELDS[modality] in item else full
            return [placeholder[modality]] * (frames * kept)

        return [
            PromptReplacement(
                modality=modality, target=[placeholder[modality]], replacement=partial(replacement, modality=modality)
            )
            for modality in ("image", "video")
        ]


@MULTIMODAL_REGISTRY.register_processor(
    AimQwen2_5_VLMultiModalProcessor, info=AimQwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class AimQwen2_5_VL(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL whose image and video embeddings are merged per frame to the count the processor reserved."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if self.is_multimodal_pruning_enabled:
            raise ValueError("AIM on Qwen2.5-VL cannot run with vLLM's video pruning (video_pruning_rate)")
        self.aim_positions = getattr(self.config, POSITIONS_KEY, "contiguous")

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        """Qwen's positions when nothing was merged (stock vLLM's code); otherwise the AIM layout."""
        by_offset = {f.mm_position.offset: f for f in mm_features}
        items, merged = [], False
        for offset, frames, height, width, t_factor in self.iter_mm_grid_thw(mm_features):
            feature = by_offset[offset]
            kept = feature.mm_position.length // frames
            merged |= kept != height * width
            layout = self.aim_positions
            if feature.data is not None and (field := feature.data.get(LAYOUT_FIELDS[feature.modality])) is not None:
                layout = LAYOUTS[int(field.data)]
            items.append((offset, (frames, height, width), kept, t_factor, layout))
        if not merged:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        return mrope_prompt_positions(len(input_tokens), items)

    def embed_multimodal(self, **kwargs: object):
        kept = {modality: kwargs.pop(field, None) for modality, field in KEPT_FIELDS.items()}
        for field in LAYOUT_FIELDS.values():
            kwargs.pop(field, None)  # positions only (get_mrope_input_positions)
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
        if not inputs:
            return []
        embeddings: list[torch.Tensor] = []
        for modality, item_input in inputs.items():  # the order of the kwargs, as vLLM's own
            if modality == "image":
                items = self._process_image_input(item_input)
            else:
                items = self._process_video_input(item_input)
            counts = kept[modality]
            if counts is None or item_input["type"].endswith("embeds"):
                embeddings += items
                continue
            grids = item_input[_GRID_FIELDS[modality]].tolist()
            counts = [int(c) for c in (counts.tolist() if isinstance(counts, torch.Tensor) else counts)]
            if len(counts) != len(items):
                raise ValueError(f"{len(items)} {modality} items but {len(counts)} kept-token counts")
            embeddings += [
                self._merge(item, grid, count) for item, grid, count in zip(items, grids, counts, strict=True)
            ]
        return embeddings

    def _merge(self, item: torch.Tensor, grid: Sequence[int], kept: int) -> torch.Tensor:
        """One image's or video's ``(t * h * w, C)`` tokens -> ``(t * kept, C)``, each frame on its own."""
        frames = int(grid[0])
        full = item.shape[0] // frames
        if kept == full:
            return item  # ratio 1: stock vLLM, untouched
        if not 1 <= kept < full or math.prod((frames, full)) != item.shape[0]:
            raise ValueError(f"cannot merge {item.shape[0]} tokens of {frames} frames to {kept} per frame")
        return merge_in_reading_order(item.view(frames, full, -1), kept).reshape(frames * kept, -1)
