"""AIM stage (a) at a keep ratio: how many visual tokens an image keeps, and the merge that gets there.

vLLM expands each ``<image>`` placeholder in the frontend, before the vision tower runs, so the kept
count must be a pure function of the image's token count and the ratio. It is
``max(1, ceil(T * ratio))``, reached by bipartite passes (:mod:`mmrag.kernels.token_merge`) of
``min(t // 2, t - kept)`` merges each. For ratios 1/2, 1/4, ... every pass halves, which is exactly the
reference engine's :class:`~mmrag.kernels.methods.aim.AIMMerge` with 1, 2, ... passes
(``ceil(ceil(T/2)/2) == ceil(T/4)``, odd ``T`` included). No vLLM import here: the processor (frontend)
and the model (worker) both call these functions, and the tests call them without vLLM.

Positions: AIM's merged tokens take consecutive positions (``"contiguous"``, stock vLLM's layout). With
``"spread"`` they sit across the image's original span and the text after keeps its positions
(:func:`~mmrag.kernels.token_merge.spread_positions`): vLLM's per-request position table (its multimodal
RoPE path, :func:`rope_overrides`) carries them, from :func:`prompt_positions`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mmrag.kernels.token_merge import merge_tokens, spread_positions

__all__ = [
    "DEFAULT_KEEP_RATIO",
    "FULL_TOKENS_FIELD",
    "KEEP_RATIO_KEY",
    "KEPT_TOKENS_FIELD",
    "ONEVISION_ARCHITECTURE",
    "QWEN_VL_ARCHITECTURE",
    "SpreadPositions",
    "aim_kept_tokens",
    "aim_merge",
    "aim_overrides",
    "check_keep_ratio",
    "merge_in_reading_order",
    "merge_schedule",
    "merge_to_count",
    "mrope_image_positions",
    "mrope_prompt_positions",
    "prompt_positions",
    "rope_overrides",
    "spread_input_positions",
]

DEFAULT_KEEP_RATIO = 1.0
# The checkpoint architecture served by the plugin's Qwen2.5-VL class (the others are LLaVA).
QWEN_VL_ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
# The checkpoint architecture served by the plugin's LLaVA-OneVision class.
ONEVISION_ARCHITECTURE = "LlavaOnevisionForConditionalGeneration"
# The per-request ``mm_processor_kwargs`` key and the ``hf_config`` attribute (deployment default).
KEEP_RATIO_KEY = "aim_keep_ratio"
# Per-image processor outputs carrying the kept and the stock count to the model (ints: never cast to bf16).
KEPT_TOKENS_FIELD = "aim_kept_tokens"
FULL_TOKENS_FIELD = "aim_full_tokens"
# Slack for ratios such as 0.3 whose product with T lands a rounding error above an integer.
_EPS = 1e-9


def check_keep_ratio(ratio: float) -> float:
    """``ratio`` as a float in ``(0, 1]``; anything else is a ``ValueError``."""
    if isinstance(ratio, bool) or not isinstance(ratio, int | float):
        raise ValueError(f"aim_keep_ratio must be a number in (0, 1], got {ratio!r}")
    ratio = float(ratio)
    if not (0.0 < ratio <= 1.0) or math.isnan(ratio):
        raise ValueError(f"aim_keep_ratio must be in (0, 1], got {ratio}")
    return ratio


def request_keep_ratio(mm_kwargs: Mapping[str, object], hf_config: object) -> float:
    """A request's keep ratio (its processor kwargs), else the served default that :func:`aim_overrides` wrote
    into the model's config, else 1; checked. Every family's processor reads it this way."""
    ratio = mm_kwargs.get(KEEP_RATIO_KEY)
    if ratio is None:
        ratio = getattr(hf_config, KEEP_RATIO_KEY, DEFAULT_KEEP_RATIO)
    return check_keep_ratio(ratio)  # type: ignore[arg-type]


def aim_kept_tokens(num_tokens: int, ratio: float) -> int:
    """Visual tokens one image keeps: ``max(1, ceil(num_tokens * ratio))`` (``num_tokens`` at ratio 1)."""
    ratio = check_keep_ratio(ratio)
    if num_tokens <= 0:
        return num_tokens
    return min(num_tokens, max(1, math.ceil(num_tokens * ratio - _EPS)))


def merge_schedule(num_tokens: int, kept: int) -> list[int]:
    """Merges per bipartite pass (each at most half the tokens left) to go from ``num_tokens`` to ``kept``."""
    if not 1 <= kept <= num_tokens:
        raise ValueError(f"cannot merge {num_tokens} tokens to {kept}")
    schedule, current = [], num_tokens
    while current > kept:
        r = min(current // 2, current - kept)
        schedule.append(r)
        current -= r
    return schedule


def merge_to_count(features: torch.Tensor, kept: int) -> torch.Tensor:
    """Merge ``(F, T, C)`` visual features (F images of T tokens) to ``(F, kept, C)``.

    AIM's unweighted mean; the metric is the features themselves (the projected tokens), as in the
    reference engine.
    """
    for r in merge_schedule(features.shape[1], kept):
        features = merge_tokens(features, num_passes=1, r=r).tokens
    return features


def merge_in_reading_order(features: torch.Tensor, kept: int) -> torch.Tensor:
    """:func:`merge_to_count`, its output then sorted by the first input token (reading order) each stands for.

    The bipartite merge returns the kept A tokens by similarity, then B; on a model whose positions say
    where a token sits in the image (M-RoPE), the merged tokens take grid cells in reading order
    (:func:`mrope_image_positions`), so they are put in that order first: token ``j`` is the one whose
    earliest source comes ``j``-th. Each input lands in exactly one output, so the first sources differ and
    the order is total. ``kept == T``: the input itself.
    """
    frames, num_tokens, _ = features.shape
    source = torch.arange(num_tokens, device=features.device).expand(frames, -1)
    for r in merge_schedule(num_tokens, kept):
        result = merge_tokens(features, num_passes=1, r=r)
        features, source = result.tokens, result.source_index.gather(1, source)
    if kept == num_tokens:
        return features
    first = torch.full((frames, kept), num_tokens, dtype=torch.long, device=features.device)
    first = first.scatter_reduce(1, source, torch.arange(num_tokens, device=features.device).expand(frames, -1), "amin")
    order = first.argsort(dim=1)
    return features.gather(1, order[..., None].expand_as(features))


def aim_merge(features: torch.Tensor, ratio: float) -> torch.Tensor:
    """``(F, T, C)`` -> ``(F, aim_kept_tokens(T, ratio), C)``."""
    return merge_to_count(features, aim_kept_tokens(features.shape[1], ratio))


def prompt_positions(num_tokens: int, images: Sequence[tuple[int, int, int]]) -> tuple[list[int], int]:
    """RoPE positions of a prompt whose merged images keep their original spans, and the shift decoding adds.

    Args:
        num_tokens: prompt length (merged placeholders counted).
        images: ``(offset, kept, full)`` per image: where its ``kept`` placeholders start in the prompt and
            how many tokens it had before the merge.

    Returns:
        One position per prompt token, and ``last + 1 - num_tokens`` (vLLM's ``mrope_position_delta``: token
        ``i`` after the prompt sits at position ``i + delta``).
    """
    positions: list[int] = []
    shift = cursor = 0
    for offset, kept, full in sorted(images):
        positions += range(cursor + shift, offset + shift)
        positions += [offset + shift + p for p in spread_positions(full, kept)]
        shift += full - kept
        cursor = offset + kept
    positions += range(cursor + shift, num_tokens + shift)
    return positions, shift


def spread_input_positions(num_tokens: int, mm_features: Sequence[Any]) -> tuple[torch.Tensor, int]:
    """A plain-RoPE LM's ``(3, L)`` positions on vLLM's M-RoPE path (the three rows equal), and the decode shift.

    ``mm_features`` are vLLM's per-item ``MultiModalFeatureSpec``s: each merged image spreads over its stock
    count (``FULL_TOKENS_FIELD``, travelling with the image); items without one (embeddings, videos) are laid
    out unmerged."""
    items = []
    for feature in mm_features:
        span = feature.mm_position
        full = span.length
        if feature.data is not None and FULL_TOKENS_FIELD in feature.data:
            full = int(feature.data[FULL_TOKENS_FIELD].data)
        items.append((span.offset, span.length, full))
    positions, delta = prompt_positions(num_tokens, items)
    return torch.tensor(positions, dtype=torch.int64).expand(3, -1).clone(), delta


class SpreadPositions:
    """Mixin of the plain-RoPE model classes (LLaVA, LLaVA-OneVision; with vLLM's ``SupportsMRoPE``): vLLM asks for
    :meth:`get_mrope_input_positions` only when the text config declares an M-RoPE section (``aim_positions:
    spread``, :func:`rope_overrides`); otherwise positions are vLLM's usual consecutive ones."""

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        """``(3, L)`` positions, the three rows equal (plain RoPE), and the decode shift."""
        return spread_input_positions(len(input_tokens), mm_features)


def mrope_image_positions(
    grid: tuple[int, int, int], kept: int, layout: str = "contiguous", t_factor: float = 1.0
) -> tuple[torch.Tensor, int]:
    """M-RoPE ``(3, t * kept)`` (temporal, height, width) positions of one merged image or video, from its
    start, and its extent (the offset where the text after it starts).

    ``grid`` is the image's ``(t, h, w)`` after the 2x2 patch merger; each frame's ``h * w`` tokens were merged
    to ``kept`` (frames are never merged together: frame ``f`` keeps Qwen's temporal position
    ``int(f * t_factor)``). The merged tokens come in reading order (:func:`merge_in_reading_order`).

    - ``"spread"``: the merged tokens keep the image's grid, spread evenly over its cells in reading order
      (token ``j`` at cell :func:`~mmrag.kernels.token_merge.spread_positions` ``(h * w, kept)[j]``); the
      extent is the unmerged image's, so the text after keeps its positions.
    - ``"contiguous"``: the merged tokens fill a smaller grid of the image's aspect ratio row by row, as Qwen
      lays out a smaller image (``w' = ceil(w * sqrt(kept / (h * w)))`` columns), and the text after follows
      that grid, so the prompt's positions shrink as AIM's contiguous layout shrinks them on LLaVA.

    A pure function of the grid and the count (never of the merge), because vLLM lays a request's positions
    out when it is added, before its images are encoded. ``kept == h * w``: Qwen's own positions, either way.
    """
    frames, height, width = grid
    cells = height * width
    if not 1 <= kept <= cells:
        raise ValueError(f"cannot place {kept} tokens on a {height}x{width} grid")
    if layout == "spread" or kept == cells:
        index = torch.tensor(spread_positions(cells, kept))
        rows, cols, used_h, used_w = index // width, index % width, height, width
    elif layout == "contiguous":
        used_w = min(width, math.ceil(width * math.sqrt(kept / cells) - _EPS))
        used_h = math.ceil(kept / used_w)
        index = torch.arange(kept)
        rows, cols = index // used_w, index % used_w
    else:
        raise ValueError(f"layout must be 'contiguous' or 'spread', not {layout!r}")
    times = (torch.arange(frames, dtype=torch.float64) * t_factor).long()
    positions = torch.stack([times.repeat_interleave(kept), rows.repeat(frames), cols.repeat(frames)])
    extent = max(int(times[-1]), used_h - 1, used_w - 1) + 1
    return positions, extent


def mrope_prompt_positions(
    num_tokens: int, items: Sequence[tuple[int, tuple[int, int, int], int, float, str]]
) -> tuple[torch.Tensor, int]:
    """``(3, num_tokens)`` M-RoPE positions of a prompt with merged images, and the decode shift.

    ``items``: ``(offset, (t, h, w), kept per frame, t_factor, layout)`` per image or video, its ``t * kept``
    placeholders starting at ``offset``. Text takes one position per token on all three axes, continuing
    from the extent of what came before (Qwen2.5-VL's rule); images :func:`mrope_image_positions`.
    Returns vLLM's ``mrope_position_delta``: token ``i`` after the prompt sits at ``i + delta``.
    """
    chunks: list[torch.Tensor] = []
    cursor = start = 0
    for offset, grid, kept, t_factor, layout in sorted(items):
        chunks.append(torch.arange(start, offset).expand(3, -1) - start + cursor)
        cursor += offset - start
        image, extent = mrope_image_positions(grid, kept, layout, t_factor)
        chunks.append(image + cursor)
        cursor += extent
        start = offset + grid[0] * kept
    chunks.append(torch.arange(start, num_tokens).expand(3, -1) - start + cursor)
    cursor += num_tokens - start
    return torch.cat(chunks, dim=1).to(torch.int64), cursor - num_tokens


def rope_overrides(text_config: dict[str, Any]) -> dict[str, Any]:
    """``hf_overrides`` that move a Llama text model onto vLLM's multimodal RoPE, with one section per axis.

    vLLM takes per-request positions only on that path (``SupportsMRoPE``); the model gives all three axes
    the same positions, which makes it ordinary RoPE whatever the sections. Only plain RoPE (no scaling)
    maps this way; any other ``rope_type`` is refused.
    """
    # transformers 5 writes rope_parameters; older checkpoints rope_theta and rope_scaling.
    legacy = text_config.get("rope_scaling") or {"rope_type": "default"}
    rope = dict(text_config.get("rope_parameters") or {**legacy, "rope_theta": text_config.get("rope_theta", 1e4)})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ValueError(f"compression.aim_positions=spread needs plain RoPE, the model's is {kind!r}")
    head_dim = text_config.get("head_dim") or text_config["hidden_size"] // text_config["num_attention_heads"]
    half = head_dim // 2
    rope["mrope_section"] = [half - 2 * (half // 3), half // 3, half // 3]
    return {"text_config": {"rope_parameters": rope}}


def aim_overrides(model_path: str | Path, keep_ratio: float, positions: str = "contiguous") -> dict[str, Any]:
    """``hf_overrides`` serving a checkpoint as the plugin's AIM model: the class, the deployment's keep ratio,
    and the positions: for LLaVA and LLaVA-OneVision with ``positions="spread"`` the M-RoPE section
    (:func:`rope_overrides`), for Qwen2.5-VL the layout by name. Every vLLM process sees them: the frontend's
    processor and the workers' model."""
    from mmrag.serving.vllm_plugin import AIM_ARCHITECTURE, AIM_ONEVISION_ARCHITECTURE, AIM_QWEN_ARCHITECTURE

    hf_config = json.loads((Path(model_path) / "config.json").read_text())
    if ONEVISION_ARCHITECTURE in (hf_config.get("architectures") or []):
        overrides = {"architectures": [AIM_ONEVISION_ARCHITECTURE], KEEP_RATIO_KEY: keep_ratio}
        if positions == "spread":  # its Qwen2 LM reads plain RoPE, as LLaVA's does
            overrides.update(rope_overrides(hf_config.get("text_config") or {}))
        return overrides
    if QWEN_VL_ARCHITECTURE in (hf_config.get("architectures") or []):
        # M-RoPE natively: the layout is the model's own setting (AimQwen2_5_VL.get_mrope_input_positions).
        return {"architectures": [AIM_QWEN_ARCHITECTURE], KEEP_RATIO_KEY: keep_ratio, "aim_positions": positions}
    overrides: dict[str, Any] = {"architectures": [AIM_ARCHITECTURE], KEEP_RATIO_KEY: keep_ratio}
    if positions == "spread":
        overrides.update(rope_overrides(hf_config.get("text_config") or {}))
    return overrides
