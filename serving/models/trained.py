"""The project's trained small MLLM (``mmrag train-tiny``), shipped in the repository.

Its weights are committed (2.3 MB in bf16) so tests and benchmarks never retrain; ``mmrag train-tiny``
reproduces them (same seed, same machine type: identical training curve; see the model's training.json).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["TRAINED_MODEL_DIR", "TRAINED_PROJECTOR_DIR", "trained_model_path", "trained_projector_path"]

TRAINED_MODEL_DIR = Path(__file__).resolve().parent.parent / "data" / "tiny-mllm"
# Its xRAG projector for the bundled MiniLM encoder (``mmrag train-projector``).
TRAINED_PROJECTOR_DIR = TRAINED_MODEL_DIR.parent / "tiny-mllm-xrag-minilm"


def trained_model_path() -> Path:
    if not (TRAINED_MODEL_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(f"no trained model at {TRAINED_MODEL_DIR}; run `mmrag train-tiny`")
    return TRAINED_MODEL_DIR


def trained_projector_path() -> Path:
    if not (TRAINED_PROJECTOR_DIR / "projector.safetensors").is_file():
        raise FileNotFoundError(f"no xRAG projector at {TRAINED_PROJECTOR_DIR}; run `mmrag train-projector`")
    return TRAINED_PROJECTOR_DIR


def locate_trained_model(seed: int = 0) -> Path:
    """Registry entry ``tiny-mllm`` (shipped, nothing to prepare)."""
    return trained_model_path()
