"""The reference engine: transformers + eager attention, with AIM and the KV methods applied exactly.

The oracle for the vLLM path: with no method enabled it equals plain transformers; with methods on, the
vLLM integration is measured against it.
"""

from mmrag.kernels.reference.cache import LayerKV, ReferenceCache
from mmrag.kernels.reference.engine import GenerationOutput, PrefillOutput, ReferenceEngine, ReferenceMethods

__all__ = ["GenerationOutput", "LayerKV", "PrefillOutput", "ReferenceCache", "ReferenceEngine", "ReferenceMethods"]
