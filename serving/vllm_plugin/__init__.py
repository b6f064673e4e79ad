"""mmrag's vLLM plugin: model classes registered through the ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` in every process it starts (frontend, engine core, workers), so it must be
idempotent and cheap: it registers class *paths*, imported only when a checkpoint asks for them. A
deployment selects a class with ``hf_overrides={"architectures": [...]}``
(:func:`mmrag.serving.engine.args.engine_kwargs` does this from ``compression``); stock
architectures stay untouched, so stock vLLM remains available in the same environment.

Registered (pinned to vLLM 0.32):

- ``AimLlavaForConditionalGeneration`` -> :class:`mmrag.serving.vllm_plugin.model.AimLlava`: LLaVA
  (CLIP/SigLIP towers) with AIM stage (a), the bipartite visual-token merge, at a keep ratio set per
  deployment (``hf_overrides["aim_keep_ratio"]``) and per request (``mm_processor_kwargs``).
- ``AimQwen2_5_VLForConditionalGeneration`` -> :class:`mmrag.serving.vllm_plugin.qwen_vl.AimQwen2_5_VL`:
  Qwen2.5-VL with the same merge per image and per video frame, its M-RoPE positions laid out by
  ``hf_overrides["aim_positions"]`` (``contiguous`` or ``spread``).
- ``AimLlavaOnevisionForConditionalGeneration`` ->
  :class:`mmrag.serving.vllm_plugin.onevision.AimLlavaOnevision`: LLaVA-OneVision with the same merge per
  image (base view, anyres tiles and their newlines as one sequence), positions consecutive.
- ``XragLlavaForConditionalGeneration`` -> :class:`mmrag.serving.vllm_plugin.xrag.XragLlava`,
  ``XragQwen2_5_VLForConditionalGeneration`` -> :class:`mmrag.serving.vllm_plugin.xrag.XragQwen2_5_VL` and
  ``XragLlavaOnevisionForConditionalGeneration`` -> :class:`mmrag.serving.vllm_plugin.xrag.XragLlavaOnevision`:
  each family's AIM model plus xRAG's ``retrieval`` modality (one ``<xrag>`` token per retrieved document,
  embedded as ``projector(vector)`` inside the model; on Qwen2.5-VL a text token for M-RoPE), from one set of
  mixins (:class:`mmrag.serving.vllm_plugin.xrag.XragModelMixin` and its processor-side three), configured by
  ``hf_overrides["xrag_projector"]`` (a projector directory) and ``hf_overrides["xrag_token_index"]``.
  :data:`XRAG_ARCHITECTURES` maps a checkpoint's architecture to its xRAG class.

KV compaction (LOOK-M and the other KV methods) is not a model class but a scheduler and a worker
(:mod:`mmrag.serving.vllm_plugin.kv`), which vLLM takes by qualified name; they serve any class above.
"""

from __future__ import annotations

__all__ = [
    "AIM_ARCHITECTURE",
    "AIM_ONEVISION_ARCHITECTURE",
    "AIM_QWEN_ARCHITECTURE",
    "MODELS",
    "XRAG_ARCHITECTURE",
    "XRAG_ARCHITECTURES",
    "XRAG_ONEVISION_ARCHITECTURE",
    "XRAG_QWEN_ARCHITECTURE",
    "register",
]

AIM_ARCHITECTURE = "AimLlavaForConditionalGeneration"
AIM_QWEN_ARCHITECTURE = "AimQwen2_5_VLForConditionalGeneration"
AIM_ONEVISION_ARCHITECTURE = "AimLlavaOnevisionForConditionalGeneration"
XRAG_ARCHITECTURE = "XragLlavaForConditionalGeneration"
XRAG_QWEN_ARCHITECTURE = "XragQwen2_5_VLForConditionalGeneration"
XRAG_ONEVISION_ARCHITECTURE = "XragLlavaOnevisionForConditionalGeneration"
# A checkpoint's (stock) architecture -> the plugin's xRAG architecture serving it.
XRAG_ARCHITECTURES = {
    "LlavaForConditionalGeneration": XRAG_ARCHITECTURE,
    "Qwen2_5_VLForConditionalGeneration": XRAG_QWEN_ARCHITECTURE,
    "LlavaOnevisionForConditionalGeneration": XRAG_ONEVISION_ARCHITECTURE,
}
# Architecture name -> "module:Class", imported lazily by vLLM's model registry.
MODELS = {
    AIM_ARCHITECTURE: "mmrag.serving.vllm_plugin.model:AimLlava",
    XRAG_ARCHITECTURE: "mmrag.serving.vllm_plugin.xrag:XragLlava",
    XRAG_QWEN_ARCHITECTURE: "mmrag.serving.vllm_plugin.xrag:XragQwen2_5_VL",
    XRAG_ONEVISION_ARCHITECTURE: "mmrag.serving.vllm_plugin.xrag:XragLlavaOnevision",
    AIM_QWEN_ARCHITECTURE: "mmrag.serving.vllm_plugin.qwen_vl:AimQwen2_5_VL",
    AIM_ONEVISION_ARCHITECTURE: "mmrag.serving.vllm_plugin.onevision:AimLlavaOnevision",
}


def register() -> None:
    """Entry point of ``vllm.general_plugins``; safe to call any number of times in any process."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for architecture, path in MODELS.items():
        if architecture not in supported:
            ModelRegistry.register_model(architecture, path)
