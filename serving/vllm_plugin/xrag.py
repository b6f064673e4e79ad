"""xRAG's ``retrieval`` modality on every family the plugin serves: ``XragLlava`` (LLaVA), ``XragQwen2_5_VL``
(Qwen2.5-VL) and ``XragLlavaOnevision`` (LLaVA-OneVision), each the family's AIM class with the same mixins.

xRAG puts each retrieved document into the LLM as ONE token: the placeholder :data:`XRAG_TOKEN` whose input
embedding is ``projector(retrieval_vector)``. Here a document is a multimodal item of its own modality,
``"retrieval"``, beside ``"image"``, so one request may carry both::

    llm.generate({"prompt": "USER: <image>\\nBackground: <xrag> and <xrag>\\n...",
                  "multi_modal_data": {"image": [img], "retrieval": vectors}})   # vectors: (2, encoder_dim)

Pinned to vLLM 0.32 (``model_executor/models/llava.py``, ``qwen2_5_vl.py``, ``llava_onevision.py``,
``multimodal/parse.py``, ``multimodal/processing/``); ``tests/vllm_plugin/test_xrag_plugin.py`` (LLaVA) and
``test_xrag_families.py`` (the other two, against transformers' forward) verify the recipe.

One implementation, four mixins, each put before the family's own class so that the family's behaviour stays
its own: :class:`XragModelMixin` (the projector, ``embed_multimodal`` for the documents' group, M-RoPE
positions), and on the frontend side the ProcessingInfo (limits, one token per item, the family's own data
parser with a ``retrieval`` subparser), the processor (documents bypass the HF processor) and the dummy
inputs; :func:`xrag_processing` registers a family's three. On M-RoPE (Qwen2.5-VL) a ``<xrag>`` is a text
token: one position on all three axes, after what precedes it.

Configuration (``hf_overrides``, seen by every process): ``architectures`` (the family's xRAG class,
:data:`~mmrag.serving.vllm_plugin.XRAG_ARCHITECTURES`),
``xrag_projector`` (a directory written by :func:`~mmrag.serving.xrag.projector.save_projector`; its card gives
the retriever dimension) and ``xrag_token_index`` (the id :func:`~mmrag.serving.xrag.projector.add_placeholder_token`
gave :data:`XRAG_TOKEN`, a spare row of the padded vocabulary). AIM keeps working unchanged in the same class.

Why the projector runs inside the model rather than in the retrieval chain:

- **Batched with the encoders.** ``embed_multimodal`` projects every document scheduled in a step in one
  batched call on the accelerator, next to the vision tower, and the result goes through vLLM's encoder cache
  like an image's.
- **Small messages.** Vectors cross processes (frontend -> engine core -> workers) at the retriever dimension
  (384 floats for MiniLM) in fp32, not at the LLM's hidden size, and are cast to the model dtype in the worker.
- **The projector lives with the LLM it was trained for.** It is loaded by the same process, in the same
  dtype and on the same device as the LLM; the model checks the card's geometry (hidden and vocabulary sizes).
  The full identity check (checkpoint name, retriever) is the engine's, with
  :func:`~mmrag.serving.xrag.projector.load_projector`.
- **Cache identity is the raw vector.** The vectors are routed as *processor data* (``retrieval_vecs``, added
  to the processor output by ``_apply_hf_processor_main``), not passthrough data: passthrough data disables the
  processor cache for the whole request, images included. vLLM hashes each item's fp32 bytes, and that hash
  keys the processor cache, the encoder cache and the prefix-cache blocks from the document on. A different
  document is never served a stale projection (avoid ``multi_modal_uuids`` unless they encode the index
  version and document id: a uuid replaces the content hash).

Each ``<xrag>`` takes exactly one prompt token (the replacement maps ``[xrag_id]`` to itself), so
``get_mm_max_tokens_per_item`` is 1 for ``retrieval`` and each document takes one encoder-cache slot. vLLM
0.32's model runners (V1 ``_execute_mm_encoder`` and V2's encoder runner) group scheduled items by modality
and call ``embed_multimodal`` once per group, so one call sees images or documents, never both.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
import torch
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_onevision import LlavaOnevisionDummyInputsBuilder
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLDummyInputsBuilder
from vllm.model_executor.models.utils import StageMissingLayer
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems, MultiModalDataParser, ProcessorBatchItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from mmrag.serving.vllm_plugin.model import AimLlava, AimLlavaMultiModalProcessor, AimLlavaProcessingInfo
from mmrag.serving.vllm_plugin.onevision import (
    AimLlavaOnevision,
    AimLlavaOnevisionMultiModalProcessor,
    AimLlavaOnevisionProcessingInfo,
)
from mmrag.serving.vllm_plugin.qwen_vl import (
    AimQwen2_5_VL,
    AimQwen2_5_VLMultiModalProcessor,
    AimQwen2_5_VLProcessingInfo,
)
from mmrag.serving.xrag.projector import (
    WEIGHTS_FILE,
    XRAG_TOKEN,
    ProjectorMismatchError,
    XragProjector,
    read_card,
)

__all__ = [
    "PROJECTOR_KEY",
    "RETRIEVAL_FIELD",
    "RETRIEVAL_MODALITY",
    "TOKEN_INDEX_KEY",
    "RetrievalItems",
    "XragLlava",
    "XragLlavaOnevision",
    "XragModelMixin",
    "XragQwen2_5_VL",
    "retrieval_vectors",
    "xrag_processing",
]

RETRIEVAL_MODALITY = "retrieval"
# Processor output (and embed_multimodal keyword) carrying the (n, encoder_dim) fp32 vectors.
RETRIEVAL_FIELD = "retrieval_vecs"
# hf_config attributes, set through hf_overrides.
PROJECTOR_KEY = "xrag_projector"
TOKEN_INDEX_KEY = "xrag_token_index"


def projector_dir(hf_config: object) -> str:
    directory = getattr(hf_config, PROJECTOR_KEY, None)
    if not directory:
        raise ValueError(f"the xRAG model needs hf_overrides[{PROJECTOR_KEY!r}]: the xRAG projector's directory")
    return str(directory)


def xrag_token_id(hf_config: object) -> int:
    token_id = getattr(hf_config, TOKEN_INDEX_KEY, None)
    if token_id is None:
        raise ValueError(f"the xRAG model needs hf_overrides[{TOKEN_INDEX_KEY!r}]: the id of {XRAG_TOKEN}")
    return int(token_id)


@lru_cache(maxsize=8)
def _encoder_dim(directory: str) -> int:
    return read_card(directory).encoder_dim


def _as_vector(item: object) -> torch.Tensor:
    """A CPU fp32 copy (the caller's array may change after the request is submitted)."""
    if isinstance(item, torch.Tensor):
        return item.detach().to(device="cpu", dtype=torch.float32).clone()
    return torch.tensor(np.asarray(item, dtype=np.float32))


def retrieval_vectors(data: object, dim: int) -> list[torch.Tensor]:
    """``data`` (an ``(n, dim)`` array or tensor, one 1-D vector, or a sequence of 1-D vectors) as n CPU fp32
    vectors of shape ``(dim,)``; a ValueError naming ``dim`` for anything else."""
    if isinstance(data, (np.ndarray, torch.Tensor)):
        if data.ndim == 1:
            items: list[object] = [data]
        elif data.ndim == 2:
            items = list(data)
        else:
            raise ValueError(
                f"retrieval vectors must be an (n, {dim}) array or a list of {dim}-d vectors, "
                f"got an array of shape {tuple(data.shape)}"
            )
    elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        is_one_vector = len(data) > 0 and all(isinstance(x, numbers.Real) for x in data)
        items = [data] if is_one_vector else list(data)
    else:
        raise ValueError(
            f"retrieval vectors must be an (n, {dim}) array or a list of {dim}-d vectors, got {type(data).__name__}"
        )
    vectors = []
    for i, item in enumerate(items):
        try:
            vector = _as_vector(item)
        except (TypeError, ValueError) as e:
            raise ValueError(f"retrieval vector {i} is not a {dim}-d float vector: {e}") from e
        if tuple(vector.shape) != (dim,):
            raise ValueError(
                f"retrieval vector {i} has shape {tuple(vector.shape)}; the xRAG projector takes {dim}-d vectors "
                f"(its retriever's dimension)"
            )
        if not bool(torch.isfinite(vector).all()):
            raise ValueError(f"retrieval vector {i} has non-finite values")
        vectors.append(vector)
    return vectors


class RetrievalItems(ProcessorBatchItems[torch.Tensor]):
    """A request's documents: one ``(dim,)`` fp32 vector each, processor items with no passthrough data (see
    module doc); :class:`XragProcessorMixin` puts them in the processor output itself."""

    def __init__(self, data: Sequence[torch.Tensor]) -> None:
        super().__init__(data, RETRIEVAL_MODALITY)


class XragProcessingInfoMixin:
    """Before a family's ProcessingInfo: the ``retrieval`` modality, its parser and its one token per item."""

    def xrag_token_id(self) -> int:
        return xrag_token_id(self.get_hf_config())

    def retrieval_dim(self) -> int:
        return _encoder_dim(projector_dir(self.get_hf_config()))

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {**super().get_supported_mm_limits(), RETRIEVAL_MODALITY: None}

    def get_data_parser(self) -> MultiModalDataParser:
        """The family's own parser plus the ``retrieval`` subparser: the instance's class becomes a subclass of
        its own with the subparser, so no family's constructor arguments are restated here."""
        parser = super().get_data_parser()
        parser.__class__ = _with_retrieval(type(parser))
        parser.retrieval_dim = self.retrieval_dim()
        return parser

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int] | None:
        stock = super().get_mm_max_tokens_per_item(seq_len, mm_counts)
        # None: vLLM counts every modality's placeholders in the dummy inputs, one per document.
        return None if stock is None else {**stock, RETRIEVAL_MODALITY: 1}


class _RetrievalSubparser:
    """Before a family's data parser class: the ``retrieval`` modality, checked against the projector's input
    dimension (``retrieval_dim``, set on the instance)."""

    retrieval_dim: int

    def _get_subparsers(self):
        return {**super()._get_subparsers(), RETRIEVAL_MODALITY: self._parse_retrieval_data}

    def _parse_retrieval_data(self, data: object) -> RetrievalItems | None:
        if data is None:
            return None
        vectors = retrieval_vectors(data, self.retrieval_dim)
        return RetrievalItems(vectors) if vectors else None


@cache
def _with_retrieval(parser_cls: type[MultiModalDataParser]) -> type[MultiModalDataParser]:
    return type(f"Xrag{parser_cls.__name__}", (_RetrievalSubparser, parser_cls), {"__module__": __name__})


class XragDummyInputsMixin:
    """Before a family's dummy-inputs builder: one ``<xrag>`` and one zero vector per profiled document."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return super().get_dummy_text(mm_counts) + XRAG_TOKEN * mm_counts.get(RETRIEVAL_MODALITY, 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions):
        data = dict(super().get_dummy_mm_data(seq_len, mm_counts, mm_options))
        count = mm_counts.get(RETRIEVAL_MODALITY, 0)
        if count > 0:
            data[RETRIEVAL_MODALITY] = np.zeros((count, self.info.retrieval_dim()), dtype=np.float32)
        return data


class XragProcessorMixin:
    """Before a family's multimodal processor: the vectors bypass the HF processor and each keeps its token."""

    def _apply_hf_processor_main(self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]) -> BatchFeature:
        """The family's own processing of the images and videos (HF never sees the documents: some families
        call the HF processor directly, with a dummy text counting every item); the vectors join its output
        as one ``(n, dim)`` tensor."""
        documents = mm_items.get(RETRIEVAL_MODALITY)
        visual = MultiModalDataItems({m: items for m, items in mm_items.items() if m != RETRIEVAL_MODALITY})
        outputs = super()._apply_hf_processor_main(visual, hf_kwargs)
        if documents:
            outputs[RETRIEVAL_FIELD] = torch.stack(list(documents.get_all()))
        return outputs

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields[RETRIEVAL_FIELD] = MultiModalFieldConfig.batched(RETRIEVAL_MODALITY)
        return fields

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        token = self.info.xrag_token_id()
        # One token per document: the placeholder stays as it is, vLLM scatters the projection over it.
        updates.append(PromptReplacement(modality=RETRIEVAL_MODALITY, target=[token], replacement=[token]))
        return updates


def xrag_processing(info_cls: type, processor_cls: type, dummy_inputs_cls: type):
    """Register a family's processor with the three mixins above as the processor of the decorated model."""
    mixed = [
        type(f"Xrag{base.__name__}", (mixin, base), {"__module__": __name__})
        for mixin, base in (
            (XragProcessingInfoMixin, info_cls),
            (XragProcessorMixin, processor_cls),
            (XragDummyInputsMixin, dummy_inputs_cls),
        )
    ]
    info, processor, dummy_inputs = mixed
    return MULTIMODAL_REGISTRY.register_processor(processor, info=info, dummy_inputs=dummy_inputs)


class XragModelMixin:
    """Before a family's AIM model class: the projector, loaded from its own file, and ``embed_multimodal``
    for the ``retrieval`` group."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality == RETRIEVAL_MODALITY:
            return XRAG_TOKEN
        return super().get_placeholder_str(modality, i)

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        text = self.config.get_text_config()
        self.xrag_projector_dir = projector_dir(self.config)
        card = read_card(self.xrag_projector_dir)
        if (card.llm.hidden_size, card.llm.vocab_size) != (text.hidden_size, text.vocab_size):
            raise ProjectorMismatchError(
                f"the xRAG projector in {self.xrag_projector_dir} was trained for {card.llm} (hidden size "
                f"{card.llm.hidden_size}, vocabulary {card.llm.vocab_size}), this model has hidden size "
                f"{text.hidden_size} and vocabulary {text.vocab_size}"
            )
        token_id = xrag_token_id(self.config)
        # In the vocabulary, so vLLM embeds it as text (and overwrites the row): no out-of-vocabulary masking.
        if not 0 <= token_id < text.vocab_size:
            raise ValueError(f"{TOKEN_INDEX_KEY}={token_id} is outside the vocabulary ({text.vocab_size} rows)")

        # A second _mark_tower_model call replaces the tower names: keep the vision tower's.
        vision_towers = list(self._tower_model_names)
        with self._mark_tower_model(vllm_config, RETRIEVAL_MODALITY):
            # Skipped (a placeholder layer) when limit_mm_per_prompt["retrieval"] is 0.
            self.xrag_projector = XragProjector(card.encoder_dim, text.hidden_size).to(
                dtype=vllm_config.model_config.dtype
            )
        self._tower_model_names = [*vision_towers, *self._tower_model_names]

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]):
        """On M-RoPE models (Qwen2.5-VL, LLaVA with ``aim_positions: spread``): each ``<xrag>`` is a text token,
        one position on all three axes after what precedes it, so the family's positions are computed
        without the documents (Qwen's own code refuses a modality it does not know)."""
        visual = [feature for feature in mm_features if feature.modality != RETRIEVAL_MODALITY]
        return super().get_mrope_input_positions(input_tokens, visual)

    def embed_multimodal(self, **kwargs: object):
        vectors = kwargs.pop(RETRIEVAL_FIELD, None)
        if vectors is None:
            return super().embed_multimodal(**kwargs)
        if any(value is not None for value in kwargs.values()):
            # vLLM 0.32 batches one modality per call; mixed items would leave their prompt order unknown.
            raise ValueError(f"embed_multimodal got documents and images together ({sorted(kwargs)})")
        return self._project(vectors)

    def _project(self, vectors: object) -> torch.Tensor:
        """``(n, encoder_dim)`` vectors -> ``(n, 1, hidden)``: one embedding per document."""
        if isinstance(vectors, (list, tuple)):
            vectors = torch.stack([torch.as_tensor(v).reshape(-1) for v in vectors])
        assert isinstance(vectors, torch.Tensor)
        if vectors.ndim != 2:
            raise ValueError(f"expected (n, encoder_dim) retrieval vectors, got shape {tuple(vectors.shape)}")
        weight = self.xrag_projector.linear_1.weight
        return self.xrag_projector(vectors.to(device=weight.device, dtype=weight.dtype)).unsqueeze(1)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The checkpoint's weights, then the projector's from its own file."""
        from safetensors.torch import load_file

        loaded = set(super().load_weights(weights))
        if isinstance(self.xrag_projector, StageMissingLayer):
            return loaded  # retrieval disabled in this deployment
        state = load_file(str(Path(self.xrag_projector_dir) / WEIGHTS_FILE))
        self.xrag_projector.load_state_dict(state)  # strict; casts to the model dtype and device
        loaded.update(f"xrag_projector.{name}" for name, _ in self.xrag_projector.named_parameters())
        return loaded


@xrag_processing(AimLlavaProcessingInfo, AimLlavaMultiModalProcessor, LlavaDummyInputsBuilder)
class XragLlava(XragModelMixin, AimLlava):
    """AimLlava whose ``retrieval`` items are projected to one input embedding each by the xRAG projector."""


@xrag_processing(AimQwen2_5_VLProcessingInfo, AimQwen2_5_VLMultiModalProcessor, Qwen2_5_VLDummyInputsBuilder)
class XragQwen2_5_VL(XragModelMixin, AimQwen2_5_VL):
    """AimQwen2_5_VL (M-RoPE) whose ``retrieval`` items are projected to one input embedding each."""


@xrag_processing(
    AimLlavaOnevisionProcessingInfo, AimLlavaOnevisionMultiModalProcessor, LlavaOnevisionDummyInputsBuilder
)
class XragLlavaOnevision(XragModelMixin, AimLlavaOnevision):
    """AimLlavaOnevision whose ``retrieval`` items are projected to one input embedding each."""
