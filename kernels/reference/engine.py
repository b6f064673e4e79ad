"""A transformers LLaVA run by hand, layer by layer, so that AIM and LOOK-M can act inside the prefill.

This is the oracle the vLLM integration is checked against. It drives the modules of a
``LlavaForConditionalGeneration`` (Llama text model) itself and repeats transformers' eager attention
op for op; with no method enabled its logits equal transformers' bit for bit (the tests assert it).

One prompt at a time (batch 1). Prefill:

1. image features from the model's own vision tower and projector; AIM stage (a) merges them per image and
   the prompt keeps as many ``<image>`` placeholders as merged tokens (at contiguous positions, or spread
   over the image's original span: ``AIMMerge.positions``);
2. every decoder layer computes the full eager attention (the prompt output always uses the full KV);
   AIM stage (b) then decides which visual keys the later layers may read (a mask, as in AIM), and
   a KV method (LOOK-M or a control) compacts what the cache stores of this layer;
3. greedy decoding appends one entry per token to each layer and queries at the logical position.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from mmrag.kernels.methods.aim import AIMMerge, AIMPrune
from mmrag.kernels.methods.base import KVMethod
from mmrag.kernels.reference.cache import LayerKV, ReferenceCache
from mmrag.kernels.token_merge import spread_positions

__all__ = ["GenerationOutput", "PrefillOutput", "ReferenceEngine", "ReferenceMethods"]


@dataclass(frozen=True)
class ReferenceMethods:
    """Which methods run. All ``None``: plain transformers.

    AIM's pruning masks keys but keeps them in the cache, LOOK-M removes cache entries; stacking the two
    is not defined by either paper, so it is refused. AIM's merge composes with either.
    """

    merge: AIMMerge | None = None
    prune: AIMPrune | None = None
    kv: KVMethod | None = None

    def __post_init__(self) -> None:
        if self.prune is not None and self.kv is not None:
            raise ValueError("AIM pruning and a KV method cannot both be enabled")


@dataclass
class PrefillOutput:
    """Attributes:
    logits: ``(L, V)`` next-token logits at every prompt position.
    input_ids: ``(L,)`` the prompt the LLM read (after any visual-token merge).
    is_image: ``(L,)`` bool, the visual positions.
    cache: the (compressed) cache, ready for :meth:`ReferenceEngine.decode_step`.
    live_tokens: per decoder layer, the prompt tokens live as keys there (``L`` unless AIM prunes): the
    token counts AIM's analytic FLOPs use.
    """

    logits: torch.Tensor
    input_ids: torch.Tensor
    is_image: torch.Tensor
    cache: ReferenceCache
    live_tokens: list[int]


@dataclass
class GenerationOutput:
    """Attributes:
    token_ids: the greedy tokens, eos included when reached.
    logits: ``(len(token_ids), V)``, the logits each token was chosen from.
    prompt_len: prompt tokens the LLM read. kv_entries: live prompt KV entries after prefill, all layers
    and KV heads. full_kv_entries: the same without any method (``layers * Hkv * prompt_len``).
    live_tokens: per layer, prompt tokens live as keys during prefill (:class:`PrefillOutput`).
    """

    token_ids: list[int]
    logits: torch.Tensor
    prompt_len: int
    kv_entries: int
    full_kv_entries: int
    live_tokens: list[int]


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask -> 0 where allowed, the dtype minimum elsewhere (transformers' eager convention)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


class ReferenceEngine:
    """Prefill + greedy decoding of a LLaVA (Llama text model) with AIM and/or LOOK-M applied."""

    def __init__(self, model: nn.Module, methods: ReferenceMethods | None = None) -> None:
        self.model = model.eval()
        self.methods = methods or ReferenceMethods()
        self.text = model.model.language_model
        self.image_token_id = int(model.config.image_token_id)
        text_config = model.config.text_config
        self.num_kv_heads = text_config.num_key_value_heads
        self.groups = text_config.num_attention_heads // text_config.num_key_value_heads

    @classmethod
    def from_pretrained(
        cls, path: str | Path, methods: ReferenceMethods | None = None, dtype: torch.dtype = torch.float32
    ) -> ReferenceEngine:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="eager")
        return cls(model, methods)

    # -- prompt ---------------------------------------------------------------------------------

    def _embed_prompt(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(1, L0)`` ids -> ``(L,)`` ids, ``(1, L, C)`` embeddings and ``(L,)`` positions, visual tokens
        merged if asked."""
        ids = input_ids[0]
        positions = torch.arange(ids.numel(), device=ids.device)
        if pixel_values is None:
            return ids, self.text.embed_tokens(input_ids), positions
        features = torch.stack(self.model.model.get_image_features(pixel_values=pixel_values).pooler_output)
        if self.methods.merge is not None:
            features = self.methods.merge.apply(features).tokens
            ids, positions = self._shrink_placeholders(ids, features.shape[0], self.methods.merge)
        embeds = self.text.embed_tokens(ids[None])
        image_mask = (ids == self.image_token_id)[None, :, None].expand_as(embeds)
        flat = features.reshape(-1, features.shape[-1]).to(embeds.device, embeds.dtype)
        return ids, embeds.masked_scatter(image_mask, flat), positions

    def _shrink_placeholders(
        self, ids: torch.Tensor, num_images: int, merge: AIMMerge
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the first ``merge.tokens_per_image`` placeholders of each image's run (runs of equal length);
        also the positions the kept prompt takes (``merge.positions``)."""
        image_pos = (ids == self.image_token_id).nonzero()[:, 0]
        if image_pos.numel() % num_images:
            raise ValueError(f"{image_pos.numel()} image tokens for {num_images} images")
        runs = image_pos.view(num_images, -1)
        kept = merge.tokens_per_image(runs.shape[1])
        keep = torch.ones_like(ids, dtype=torch.bool)
        keep[runs[:, kept:].reshape(-1)] = False
        if merge.positions == "contiguous":
            return ids[keep], torch.arange(int(keep.sum()), device=ids.device)
        positions = torch.arange(ids.numel(), device=ids.device)  # the unmerged prompt's, text included
        positions[runs[:, :kept]] = runs[:, :1] + torch.tensor(spread_positions(runs.shape[1], kept), device=ids.device)
        return ids[keep], positions[keep]

    # -- one layer ------------------------------------------------------------------------------

    def _qkv(
        self, layer: nn.Module, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Post-RoPE ``(1, Hq, n, D)`` queries, ``(1, Hkv, n, D)`` keys and values of ``hidden``."""
        attn = layer.self_attn
        shape = (*hidden.shape[:-1], -1, attn.head_dim)
        q = attn.q_proj(hidden).view(shape).transpose(1, 2)
        k = attn.k_proj(hidden).view(shape).transpose(1, 2)
        v = attn.v_proj(hidden).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scaling: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """transformers' ``eager_attention_forward``, op for op; also returns the logits and probabilities."""
        logits = torch.matmul(q, repeat_kv(k, self.groups).transpose(2, 3)) * scaling
        if mask is not None:
            logits = logits + mask
        probs = nn.functional.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, repeat_kv(v, self.groups)).transpose(1, 2).contiguous()
        return out, logits, probs

    def _finish_layer(self, layer: nn.Module, residual: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        attn_out = layer.self_attn.o_proj(attn_out.reshape(*residual.shape[:-1], -1).contiguous())
        hidden = residual + attn_out
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    # -- prefill and decode ---------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> PrefillOutput:
        """Run the prompt (``(1, L0)`` ids, optional ``(num_images, 3, H, W)`` pixels) and build the cache."""
        if input_ids.shape[0] != 1:
            raise ValueError("the reference engine runs one prompt at a time")
        ids, hidden, positions = self._embed_prompt(input_ids, pixel_values)
        seq_len = ids.numel()
        is_image = ids == self.image_token_id
        position_embeddings = self.text.rotary_emb(hidden, positions[None])
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=ids.device).tril()
        causal_mask = _additive(causal, hidden.dtype)[None, None]
        live = torch.ones(seq_len, dtype=torch.bool, device=ids.device)
        prune = self.methods.prune
        # Spread positions leave gaps: decoding continues after the last prompt position, not at seq_len.
        cache = ReferenceCache(prompt_len=seq_len, next_position=int(positions[-1]) + 1)
        live_tokens = []
        for index, layer in enumerate(self.text.layers):
            live_tokens.append(int(live.sum()))
            mask = causal_mask
            if not live.all():
                # Two additive masks, as AIM builds them (a masked future key sums to -inf: harmless).
                mask = causal_mask + _additive(live, hidden.dtype)
            q, k, v = self._qkv(layer, layer.input_layernorm(hidden), position_embeddings)
            out, logits, probs = self._attend(q, k, v, mask, layer.self_attn.scaling)
            cache.layers.append(self._store(k, v, live, is_image, probs, q, layer.self_attn.scaling))
            hidden = self._finish_layer(layer, hidden, out)
            if prune is not None and is_image.any():
                live = prune.next_live(index, logits[0], ~is_image, live)
        logits = self.model.lm_head(self.text.norm(hidden))
        return PrefillOutput(logits[0], ids, is_image, cache, live_tokens)

    def _store(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        live: torch.Tensor,
        is_image: torch.Tensor,
        probs: torch.Tensor,
        q: torch.Tensor,
        scaling: float,
    ) -> LayerKV:
        """What the cache keeps of one layer: everything, everything with a key mask, or the KV method's subset."""
        positions = torch.arange(k.shape[2], device=k.device).expand(k.shape[1], -1)
        method = self.methods.kv
        if method is not None and is_image.any():
            scores = method.scores(probs[0], q[0], k[0], scaling)
            keys, values, positions = method.compress(k[0], v[0], scores, is_image)
            return LayerKV(keys[None], values[None], positions)
        key_mask = None if live.all() else live.expand(k.shape[1], -1).clone()
        return LayerKV(k, v, positions, key_mask)

    @torch.no_grad()
    def decode_step(self, cache: ReferenceCache, token_id: int) -> torch.Tensor:
        """Feed one token at ``cache.next_position``; returns the ``(V,)`` next-token logits."""
        device = cache.layers[0].keys.device
        ids = torch.tensor([[token_id]], device=device)
        hidden = self.text.embed_tokens(ids)
        position = torch.tensor([[cache.next_position]], device=device)
        position_embeddings = self.text.rotary_emb(hidden, position)
        for layer, kv in zip(self.text.layers, cache.layers, strict=True):
            q, k, v = self._qkv(layer, layer.input_layernorm(hidden), position_embeddings)
            kv.append(k, v)
            mask = None
            if kv.key_mask is not None:
                allowed = kv.key_mask.repeat_interleave(self.groups, dim=0)
                mask = _additive(allowed, hidden.dtype)[None, :, None, :]
            out, _, _ = self._attend(q, kv.keys, kv.values, mask, layer.self_attn.scaling)
            hidden = self._finish_layer(layer, hidden, out)
        cache.next_position += 1
        return self.model.lm_head(self.text.norm(hidden))[0, -1]

    @torch.no_grad()
    def teacher_forced_logits(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, token_ids: list[int]
    ) -> torch.Tensor:
        """``(len(token_ids), V)``: the logits this engine predicts each of ``token_ids`` from, when fed them.

        How a compressed engine is compared with the full one on the same continuation.
        """
        prefill = self.prefill(input_ids, pixel_values)
        steps = [prefill.logits[-1]]
        steps += [self.decode_step(prefill.cache, token) for token in token_ids[:-1]]
        return torch.stack(steps)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 16,
        eos_token_id: int | None = None,
    ) -> GenerationOutput:
        """Greedy decoding; stops after ``max_new_tokens`` or at ``eos_token_id``."""
        prefill = self.prefill(input_ids, pixel_values)
        cache = prefill.cache
        kv_entries = cache.num_live_entries()
        step_logits = [prefill.logits[-1]]
        tokens: list[int] = []
        while True:
            token = int(step_logits[-1].argmax())
            tokens.append(token)
            if len(tokens) == max_new_tokens or token == eos_token_id:
                break
            step_logits.append(self.decode_step(cache, token))
        layers = len(cache.layers)
        return GenerationOutput(
            token_ids=tokens,
            logits=torch.stack(step_logits),
            prompt_len=cache.prompt_len,
            kv_entries=kv_entries,
            full_kv_entries=layers * self.num_kv_heads * cache.prompt_len,
            live_tokens=prefill.live_tokens,
        )
