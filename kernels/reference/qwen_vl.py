"""The reference for Qwen2.5-VL: transformers' own model (eager attention), with AIM's merge and a KV method
applied exactly, the oracle the plugin's ``AimQwen2_5_VL`` and KV worker are checked against.

Unlike :class:`~mmrag.kernels.reference.engine.ReferenceEngine` (which runs a LLaVA's layers by hand), this
one drives ``Qwen2_5_VLForConditionalGeneration`` through its public forward with ``inputs_embeds``,
explicit M-RoPE ``position_ids`` and a ``DynamicCache``, and takes the prefill's post-RoPE queries and keys
from an attention function registered with transformers (eager attention, op for op, plus a capture).
Each part is derived independently of the vLLM plugin's code:

- **merge**: :class:`~mmrag.kernels.methods.aim.AIMMerge` (``num_passes`` halvings) on each frame's
  projected tokens, the merged tokens sorted by the first input token each stands for (its
  ``source_index``);
- **positions**: transformers' ``get_rope_index`` on a prompt whose images keep their full grid
  (``spread``: the merged tokens take the evenly spread cells of it) or are given the smaller
  ``(h', w')`` grid (``contiguous``: the merged tokens take its first cells), the unused placeholders
  then dropped, the text continuing past the largest position (:func:`_continue_text_past_the_largest`);
- **KV method**: :func:`~mmrag.kernels.reference.hf_forward.compact_prefill_cache` after the prefill, and
  decoding continues past the largest position.

One prompt at a time, greedy.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from mmrag.kernels.methods.aim import AIMMerge
from mmrag.kernels.methods.base import KVMethod
from mmrag.kernels.reference import hf_forward
from mmrag.kernels.token_merge import spread_positions

__all__ = ["QwenReference", "contiguous_grid"]

_ATTENTION = "mmrag_reference_capture"


def contiguous_grid(height: int, width: int, kept: int) -> tuple[int, int]:
    """The smaller grid of the image's aspect ratio that ``kept`` merged tokens fill row by row."""
    used_w = min(width, math.ceil(width * math.sqrt(kept / (height * width)) - 1e-9))
    return math.ceil(kept / used_w), used_w


def _continue_text_past_the_largest(positions: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """``(3, L)`` positions with every text token one past the largest position before it.

    That is Qwen2.5-VL's original rule and vLLM 0.32's; transformers 5.19's ``get_rope_index`` continues
    after a video at ``max(t, h, w)`` of its grid instead, which differs when a video's temporal positions
    (scaled by seconds per patch x tokens per second) pass its spatial extent. Each visual run keeps the
    positions ``get_rope_index`` gave it, relative to its first token.
    """
    out = torch.empty_like(positions)
    cursor, index, length = 0, 0, positions.shape[1]
    while index < length:
        if not visual[index]:
            out[:, index] = cursor
            cursor, index = cursor + 1, index + 1
            continue
        end = index
        while end < length and visual[end]:
            end += 1
        run = positions[:, index:end] - positions[0, index] + cursor
        out[:, index:end] = run
        cursor, index = int(run.max()) + 1, end
    return out


class QwenReference:
    """Qwen2.5-VL with AIM's merge at ``merge_passes`` halvings (0: none), merged tokens at the ``layout``
    positions, and an optional KV method compacting the cache after the prefill."""

    def __init__(
        self, model: nn.Module, merge_passes: int = 0, layout: str = "contiguous", kv: KVMethod | None = None
    ) -> None:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import eager_attention_forward

        if layout not in ("contiguous", "spread"):
            raise ValueError(f"layout must be 'contiguous' or 'spread', not {layout!r}")
        self.model = model.eval()
        hf_forward.capture_prefill_attention(self.model.model.language_model, _ATTENTION, eager_attention_forward)
        self.merge = AIMMerge(num_passes=merge_passes) if merge_passes else None
        self.layout = layout
        self.kv = kv
        self.config = model.config
        self.merge_size = self.config.vision_config.spatial_merge_size

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> QwenReference:
        from transformers import Qwen2_5_VLForConditionalGeneration

        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager"
        )
        return cls(model, **kwargs)

    # -- the prompt -----------------------------------------------------------------------------

    def _merged(self, features: tuple[torch.Tensor, ...], grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Per image or video: ``(t * kept, C)`` tokens, each frame merged, in reading order of their first
        source."""
        if self.merge is None:
            return list(features)
        return [
            hf_forward.merge_in_reading_order(self.merge, item.view(frames, -1, item.shape[-1])).reshape(
                -1, item.shape[-1]
            )
            for item, (frames, _, _) in zip(features, grid_thw.tolist(), strict=True)
        ]

    def _layout(
        self,
        input_ids: torch.Tensor,
        image_grid_thw: torch.Tensor | None,
        video_grid_thw: torch.Tensor | None,
        second_per_grid_ts: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The merged prompt's ids ``(L,)`` and positions ``(3, L)`` from transformers' ``get_rope_index``:
        each image (video) laid out on the grid its merged tokens use, then the cells no merged token takes
        dropped."""
        merge = self.merge_size
        tokens = {1: self.config.image_token_id, 2: self.config.video_token_id}
        if image_grid_thw is None and video_grid_thw is None:  # text only: one position per token
            return input_ids, torch.arange(input_ids.numel()).expand(3, -1)
        pending = {
            kind: list(grids.tolist()) if grids is not None else []
            for kind, grids in ((1, image_grid_thw), (2, video_grid_thw))
        }
        laid_grids: dict[int, list[tuple[int, int, int]]] = {1: [], 2: []}
        ids = input_ids.tolist()
        laid: list[int] = []
        wanted: list[bool] = []
        cursor = 0
        while cursor < len(ids):
            kind = next((k for k, token in tokens.items() if ids[cursor] == token), 0)
            if not kind:
                laid.append(ids[cursor])
                wanted.append(True)
                cursor += 1
                continue
            frames, height, width = pending[kind].pop(0)
            h, w = height // merge, width // merge
            full = h * w
            kept = self.merge.tokens_per_image(full) if self.merge else full
            if self.layout == "spread" or kept == full:
                grid_h, grid_w, cells = h, w, set(spread_positions(full, kept))
            else:
                grid_h, grid_w = contiguous_grid(h, w, kept)
                cells = set(range(kept))
            laid_grids[kind].append((frames, grid_h * merge, grid_w * merge))
            for _ in range(frames):
                laid += [tokens[kind]] * (grid_h * grid_w)
                wanted += [c in cells for c in range(grid_h * grid_w)]
            cursor += frames * full
        laid_ids = torch.tensor([laid])
        types = (laid_ids == tokens[1]).int() + 2 * (laid_ids == tokens[2]).int()
        positions, _ = self.model.model.get_rope_index(
            laid_ids,
            types,
            image_grid_thw=torch.tensor(laid_grids[1], dtype=torch.long) if laid_grids[1] else None,
            video_grid_thw=torch.tensor(laid_grids[2], dtype=torch.long) if laid_grids[2] else None,
            second_per_grid_ts=second_per_grid_ts,
        )
        positions = _continue_text_past_the_largest(positions[:, 0], types[0] > 0)
        mask = torch.tensor(wanted)
        return laid_ids[0][mask], positions[:, mask]

    # -- generation -----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        max_new_tokens: int = 8,
        *,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
    ) -> hf_forward.ReferenceOutput:
        """Greedy decoding of the ``(L0,)`` prompt (unmerged placeholders, as the HF processor writes them)."""
        from transformers import DynamicCache

        model = self.model.model
        ids, positions = self._layout(input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts)
        embeds = model.language_model.embed_tokens(ids[None])
        for token, pixels, grids, encode in (
            (self.config.image_token_id, pixel_values, image_grid_thw, model.get_image_features),
            (self.config.video_token_id, pixel_values_videos, video_grid_thw, model.get_video_features),
        ):
            if pixels is None:
                continue
            features = torch.cat(self._merged(encode(pixels, grids).pooler_output, grids)).to(embeds.dtype)
            mask = (ids == token)[None, :, None].expand_as(embeds)
            embeds = embeds.masked_scatter(mask, features)
        cache = DynamicCache(config=self.config)
        out = self.model(inputs_embeds=embeds, position_ids=positions[:, None], past_key_values=cache, use_cache=True)
        visual = (ids == self.config.image_token_id) | (ids == self.config.video_token_id)
        kept = ids.numel()
        if self.kv is not None and visual.any():  # video frames are image entries to the KV method
            kept = hf_forward.compact_prefill_cache(model.language_model.layers, cache, self.kv, visual)
        next_position = int(positions.max()) + 1  # M-RoPE: the text goes on past the largest position
        tokens, logprobs = hf_forward.greedy_decode(
            self.model, cache, out.logits[0, -1], max_new_tokens, next_position, (3, 1, 1)
        )
        return hf_forward.ReferenceOutput(tokens, logprobs, ids.numel(), kept)
