"""The reference engine: transformers + eager attention, with AIM and LOOK-M applied exactly.

The oracle for the vLLM path: with no method enabled it equals plain transformers; with methods on, the
vLLM integration is measured against it.
"""

from mmrag.serving.reference.cache import LayerKV, ReferenceCache
from mmrag.serving.reference.engine import GenerationOutput, PrefillOutput, ReferenceEngine, ReferenceMethods
from mmrag.serving.reference.methods import AIMMerge, AIMPrune, LookM

__all__ = [
    "AIMMerge",
    "AIMPrune",
    "GenerationOutput",
    "LayerKV",
    "LookM",
    "PrefillOutput",
    "ReferenceCache",
    "ReferenceEngine",
    "ReferenceMethods",
]
