"""The reference engine's KV cache: per layer, possibly compacted, with logical positions kept apart.

After LOOK-M a layer holds ``n_keep < L`` prompt entries (the same count in every head, different members);
their keys were rotated at their original positions, and decoding continues at position ``L``, not at
``n_keep``: logical positions (RoPE) and physical slots (cache rows) part ways, as they must in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["LayerKV", "ReferenceCache"]


@dataclass
class LayerKV:
    """One decoder layer's cache for one sequence.

    Attributes:
        keys, values: ``(1, Hkv, n, D)``: the prompt entries kept, then one per decoded token.
        prompt_positions: ``(Hkv, n_prompt)`` logical positions of the prompt entries kept.
        key_mask: ``(Hkv, n)`` bool, entries visible to new queries (AIM masks keys); ``None``: all.
    """

    keys: torch.Tensor
    values: torch.Tensor
    prompt_positions: torch.Tensor
    key_mask: torch.Tensor | None = None

    def append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Add one decoded token's ``(1, Hkv, 1, D)`` key and value (never evicted: "look once")."""
        self.keys = torch.cat([self.keys, key], dim=-2)
        self.values = torch.cat([self.values, value], dim=-2)
        if self.key_mask is not None:
            live = torch.ones(self.key_mask.shape[0], 1, dtype=torch.bool, device=self.key_mask.device)
            self.key_mask = torch.cat([self.key_mask, live], dim=1)

    @property
    def num_live_entries(self) -> int:
        """KV entries that attention can still read, summed over heads."""
        if self.key_mask is None:
            return self.keys.shape[1] * self.keys.shape[2]
        return int(self.key_mask.sum())


@dataclass
class ReferenceCache:
    """All layers of one sequence, plus the logical position of the next token.

    Attributes:
        layers: one :class:`LayerKV` per decoder layer.
        prompt_len: ``L``, prompt tokens after any visual-token merge.
        next_position: RoPE position of the next token (``L`` + tokens decoded so far).
    """

    layers: list[LayerKV] = field(default_factory=list)
    prompt_len: int = 0
    next_position: int = 0

    def num_live_entries(self) -> int:
        return sum(layer.num_live_entries for layer in self.layers)
