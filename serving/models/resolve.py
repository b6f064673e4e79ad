"""Which checkpoint a server runs: a configured path, or the tiny LLaVA generated into the cache."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from mmrag.serving.config import ModelConfig
from mmrag.serving.paths import cache_dir

logger = logging.getLogger(__name__)


def resolve_model_path(model: ModelConfig) -> str:
    """A local checkpoint directory for ``model``, generating the tiny model on first use."""
    if model.path is not None:
        path = Path(model.path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.path {str(path)!r} is not a checkpoint directory (no config.json)")
        return str(path)
    return str(ensure_tiny_model(model.tiny_seed))


def ensure_tiny_model(seed: int) -> Path:
    """Generate once per cache; concurrent callers (replicas on one node) each write a private temp dir
    and rename it into place, so nobody ever loads a half-written checkpoint."""
    from mmrag.serving.models.tiny import TinyLlavaSpec, make_tiny_llava

    target = cache_dir() / "models" / f"tiny-llava-seed{seed}"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    make_tiny_llava(staging, TinyLlavaSpec(seed=seed))
    try:
        os.rename(staging, target)
        logger.info("generated the tiny model at %s", target)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
    return target
