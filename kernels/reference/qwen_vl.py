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
  then dropped;
- **KV method**: after the prefill, each layer's cache is replaced by what the method keeps of it (scores
  from the same queries and keys), and decoding continues at the logical positions.

One prompt at a time, greedy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mmrag.kernels.methods.aim import AIMMerge
from mmrag.kernels.methods.base import KVMethod
from mmrag.kernels.token_merge import spread_positions

__all__ = ["QwenReference", "QwenReferenceOutput", "contiguous_grid"]

_ATTENTION = "mmrag_reference_capture"


def contiguous_grid(height: int, width: int, kept: int) -> tuple[int, int]:
    """The smaller grid of the image's aspect ratio that ``kept`` merged tokens fill row by row."""
    used_w = min(width, math.ceil(width * math.sqrt(kept / (height * width)) - 1e-9))
    return math.ceil(kept / used_w), used_w


def _capture_attention(module: nn.Module, query, key, value, attention_mask, scaling: float, **kwargs):
    """transformers' eager attention; a prefill's post-RoPE queries, keys and values are kept on the module."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import eager_attention_forward

    if query.shape[2] > 1:
        module.mmrag_prefill = (query, key, value)
    return eager_attention_forward(module, query, key, value, attention_mask, scaling, **kwargs)


@dataclass
class QwenReferenceOutput:
    """Attributes: token_ids: the greedy tokens. logprobs: ``(len(token_ids),)`` each chosen token's
    log-probability. prompt_len: tokens the LLM read. kept: prompt KV entries per layer and head after
    the KV method (``prompt_len`` without one)."""

    token_ids: list[int]
    logprobs: torch.Tensor
    prompt_len: int
    kept: int


class QwenReference:
    """Qwen2.5-VL with AIM's merge at ``merge_passes`` halvings (0: none), merged tokens at the ``layout``
    positions, and an optional KV method compacting the cache after the prefill."""

    def __init__(
        self, model: nn.Module, merge_passes: int = 0, layout: str = "contiguous", kv: KVMethod | None = None
    ) -> None:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

        if layout not in ("contiguous", "spread"):
            raise ValueError(f"layout must be 'contiguous' or 'spread', not {layout!r}")
        AttentionInterface.register(_ATTENTION, _capture_attention)
        # Its mask is eager attention's (an unregistered name gets none: attention would not be causal).
        ALL_MASK_ATTENTION_FUNCTIONS.register(_ATTENTION, eager_mask)
        self.model = model.eval()
        self.model.model.language_model.config._attn_implementation = _ATTENTION
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

    def _merged_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Per image: ``(kept, C)`` tokens, each frame merged, in reading order of their first source."""
        features = self.model.model.get_image_features(pixel_values, grid_thw).pooler_output
        if self.merge is None:
            return list(features)
        merged = []
        for item, (frames, _, _) in zip(features, grid_thw.tolist(), strict=True):
            result = self.merge.apply(item.view(frames, -1, item.shape[-1]))
            kept = result.tokens.shape[1]
            first = torch.full((frames, kept), item.shape[0], dtype=torch.long)
            sources = torch.arange(result.source_index.shape[1]).expand(frames, -1)
            first = first.scatter_reduce(1, result.source_index, sources, "amin")
            order = first.argsort(dim=1)
            tokens = result.tokens.gather(1, order[..., None].expand_as(result.tokens))
            merged.append(tokens.reshape(-1, item.shape[-1]))
        return merged

    def _layout(self, input_ids: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The merged prompt's ids ``(L,)`` and positions ``(3, L)`` from transformers' ``get_rope_index``:
        each image laid out on the grid its merged tokens use, then the cells no merged token takes dropped."""
        image_id, merge = self.config.image_token_id, self.merge_size
        ids = input_ids.tolist()
        laid: list[int] = []
        wanted: list[bool] = []
        grids = []
        cursor = 0
        for frames, height, width in grid_thw.tolist():
            h, w = height // merge, width // merge
            full = h * w
            kept = self.merge.tokens_per_image(full) if self.merge else full
            start = ids.index(image_id, cursor)
            laid += ids[cursor:start]
            wanted += [True] * (start - cursor)
            if self.layout == "spread" or kept == full:
                grid_h, grid_w, cells = h, w, set(spread_positions(full, kept))
            else:
                grid_h, grid_w = contiguous_grid(h, w, kept)
                cells = set(range(kept))
            grids.append((frames, grid_h * merge, grid_w * merge))
            for _ in range(frames):
                laid += [image_id] * (grid_h * grid_w)
                wanted += [c in cells for c in range(grid_h * grid_w)]
            cursor = start + frames * full
        laid += ids[cursor:]
        wanted += [True] * (len(ids) - cursor)
        laid_ids = torch.tensor([laid])
        positions, _ = self.model.model.get_rope_index(
            laid_ids, (laid_ids == image_id).int(), image_grid_thw=torch.tensor(grids, dtype=torch.long)
        )
        mask = torch.tensor(wanted)
        return laid_ids[0][mask], positions[:, 0][:, mask]

    # -- generation -----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        max_new_tokens: int = 8,
    ) -> QwenReferenceOutput:
        """Greedy decoding of the ``(L0,)`` prompt (unmerged placeholders, as the HF processor writes them)."""
        from transformers import DynamicCache

        text = self.model.model.language_model
        if pixel_values is None:
            ids, positions = input_ids, torch.arange(input_ids.numel()).expand(3, -1)
            embeds = text.embed_tokens(ids[None])
        else:
            ids, positions = self._layout(input_ids, image_grid_thw)
            embeds = text.embed_tokens(ids[None])
            features = torch.cat(self._merged_images(pixel_values, image_grid_thw)).to(embeds.dtype)
            mask = (ids == self.config.image_token_id)[None, :, None].expand_as(embeds)
            embeds = embeds.masked_scatter(mask, features)
        cache = DynamicCache(config=self.config)
        out = self.model(inputs_embeds=embeds, position_ids=positions[:, None], past_key_values=cache, use_cache=True)
        kept = self._compact(cache, ids) if self.kv is not None and pixel_values is not None else ids.numel()
        next_position = int(positions.max()) + 1
        logits, tokens, logprobs = out.logits[0, -1], [], []
        for step in range(max_new_tokens):
            token = int(logits.argmax())
            tokens.append(token)
            logprobs.append(torch.log_softmax(logits.float(), dim=-1)[token])
            if step + 1 == max_new_tokens:
                break
            position = torch.full((3, 1, 1), next_position + step)
            out = self.model(
                input_ids=torch.tensor([[token]]), position_ids=position, past_key_values=cache, use_cache=True
            )
            logits = out.logits[0, -1]
        return QwenReferenceOutput(tokens, torch.stack(logprobs), ids.numel(), kept)

    def _compact(self, cache, ids: torch.Tensor) -> int:
        """Replace every layer's prompt cache by what the KV method keeps of it (same count in each layer)."""
        is_image = ids == self.config.image_token_id
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
