"""What a compression method costs in answer quality and saves in compute, against the full context.

The measures issue 4's fidelity benchmark reports, for one prompt (:func:`compare`), averaged over
prompts for each method and budget of a grid (:func:`evaluate`, :func:`default_grid`):

- ``top1_agreement``: share of the full engine's greedy tokens that the candidate, fed the same tokens
  (teacher forcing, so one early disagreement does not derail the rest), also ranks first;
- ``mean_kl``: mean over those steps of ``KL(p_full || p_candidate)`` of the next-token distributions;
- ``kv_ratio``: prompt KV entries the candidate keeps over the full cache's;
- ``prefill_flops`` and its ratio: analytic, counted as AIM does (LLM-Viewer: each layer at the token
  count it sees; matmuls only, 2 FLOPs per multiply-add; element-wise terms left out).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from mmrag.kernels.methods.aim import AIMMerge, AIMPrune
from mmrag.kernels.methods.lookm import LookM
from mmrag.kernels.reference.engine import ReferenceEngine, ReferenceMethods

__all__ = ["Fidelity", "compare", "default_grid", "evaluate", "mean_kl", "prefill_flops", "top1_agreement"]


def top1_agreement(reference_tokens: list[int], candidate_logits: torch.Tensor) -> float:
    """Share of steps where ``candidate_logits`` (``(n, V)``) ranks the reference token first."""
    predicted = candidate_logits.argmax(dim=-1).tolist()
    return sum(p == t for p, t in zip(predicted, reference_tokens, strict=True)) / len(reference_tokens)


def mean_kl(reference_logits: torch.Tensor, candidate_logits: torch.Tensor) -> float:
    """Mean over steps of ``KL(softmax(reference) || softmax(candidate))``, in nats; ``(n, V)`` each."""
    log_p = torch.log_softmax(reference_logits.double(), dim=-1)
    log_q = torch.log_softmax(candidate_logits.double(), dim=-1)
    return float((log_p.exp() * (log_p - log_q)).sum(dim=-1).mean())


def prefill_flops(text_config: Any, tokens_per_layer: list[int]) -> int:
    """Matmul FLOPs of a Llama-style prefill where layer ``i`` processes ``tokens_per_layer[i]`` tokens.

    Per layer with ``n`` tokens: Q, K, V, O projections and the gated MLP (``2 n * in * out`` each), then
    ``Q K^T`` and ``P V`` over the full ``n x n`` square (``2 n^2 d`` per head each; LLM-Viewer's prefill
    count takes no causal discount). The language-model head is left out (one position either way).
    """
    hidden, inter = text_config.hidden_size, text_config.intermediate_size
    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    weights = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2 + hidden * inter * 3
    return sum(2 * n * weights + 2 * 2 * n * n * head_dim * heads for n in tokens_per_layer)


@dataclass(frozen=True)
class Fidelity:
    """One candidate against the full context on one prompt (fields: see the module docstring)."""

    top1_agreement: float
    mean_kl: float
    kv_ratio: float
    prefill_flops: int
    full_prefill_flops: int
    prompt_len: int
    full_prompt_len: int

    @property
    def flops_ratio(self) -> float:
        return self.prefill_flops / self.full_prefill_flops

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flops_ratio": self.flops_ratio}


@torch.no_grad()
def compare(
    full: ReferenceEngine,
    candidate: ReferenceEngine,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    max_new_tokens: int = 16,
) -> Fidelity:
    """Greedy-decode with ``full``, replay its tokens through ``candidate``, and measure the difference."""
    reference = full.generate(input_ids, pixel_values, max_new_tokens)
    candidate_logits = candidate.teacher_forced_logits(input_ids, pixel_values, reference.token_ids)
    prefill = candidate.prefill(input_ids, pixel_values)
    text_config = full.model.config.text_config
    full_kv = reference.full_kv_entries
    return Fidelity(
        top1_agreement=top1_agreement(reference.token_ids, candidate_logits),
        mean_kl=mean_kl(reference.logits, candidate_logits),
        kv_ratio=prefill.cache.num_live_entries() / full_kv,
        prefill_flops=prefill_flops(text_config, prefill.live_tokens),
        full_prefill_flops=prefill_flops(text_config, reference.live_tokens),
        prompt_len=prefill.cache.prompt_len,
        full_prompt_len=reference.prompt_len,
    )


def default_grid(num_layers: int) -> dict[str, ReferenceMethods]:
    """Each method at a few budgets, named for a results table.

    AIM's pruning schedule is the authors' LLaVA-1.5 one (start 13, end 20 of 32 layers) scaled to
    ``num_layers``, starting no later than the second-to-last layer (the last layer's choice reaches no
    layer). LOOK-M runs its three merges and plain eviction at the default budget (0.1 + 0.1), and pivotal
    at two larger ones: a budget only matters once it exceeds the prompt's text share, which is large in
    short test prompts.
    """
    start = min(round(13 / 32 * num_layers), max(num_layers - 2, 0))
    end = max(start, round(20 / 32 * num_layers))
    grid = {
        "aim-merge-50%": ReferenceMethods(merge=AIMMerge(num_passes=1)),
        "aim-merge-25%": ReferenceMethods(merge=AIMMerge(num_passes=2)),
        "aim-prune": ReferenceMethods(prune=AIMPrune(start_layer=start, end_layer=end)),
        "aim-merge-25%+prune": ReferenceMethods(merge=AIMMerge(), prune=AIMPrune(start_layer=start, end_layer=end)),
    }
    for strategy in ("pivotal", "averaged", "weighted", None):
        grid[f"lookm-{strategy or 'evict'}-0.1"] = ReferenceMethods(kv=LookM(heavy_ratio=0.1, merge=strategy))
    for heavy in (0.3, 0.6):
        grid[f"lookm-pivotal-{heavy}"] = ReferenceMethods(kv=LookM(heavy_ratio=heavy))
    return grid


def evaluate(
    model: Any,
    prompts: list[tuple[torch.Tensor, torch.Tensor | None]],
    grid: dict[str, ReferenceMethods],
    max_new_tokens: int = 16,
) -> dict[str, dict[str, float]]:
    """Mean of every :class:`Fidelity` field over ``prompts`` (``(input_ids, pixel_values)`` pairs), by name."""
    full = ReferenceEngine(model)
    table: dict[str, dict[str, float]] = {}
    for name, methods in grid.items():
        candidate = ReferenceEngine(model, methods)
        rows = [compare(full, candidate, ids, pixels, max_new_tokens).as_dict() for ids, pixels in prompts]
        table[name] = {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]}
    return table
