"""The xRAG projector: retrieval vector -> one LLM input embedding, and its card.

A projector is trained for one (encoder, LLM) pair and is meaningless with any other: the card saved beside
the weights names both, and :func:`load_projector` refuses a mismatch with a message naming what differs.
On disk a projector is a directory with ``projector.safetensors`` (``linear_1``/``linear_2`` weights and
biases) and ``projector.json`` (the card). The vLLM plugin loads the same files inside the model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmrag.serving.retrieval.config import TextRagConfig

__all__ = [
    "CARD_FILE",
    "WEIGHTS_FILE",
    "XRAG_TOKEN",
    "LlmIdentity",
    "ProjectorCard",
    "ProjectorMismatchError",
    "XragProjector",
    "add_placeholder_token",
    "llm_identity",
    "load_projector",
    "read_card",
    "save_projector",
]

XRAG_TOKEN = "<xrag>"
WEIGHTS_FILE = "projector.safetensors"
CARD_FILE = "projector.json"
MODEL_MANIFEST = "mmrag_model.json"  # a prepared model's manifest (serving.models.registry.MANIFEST)


class ProjectorMismatchError(ValueError):
    """The projector was trained for another encoder or LLM."""


@dataclass(frozen=True)
class LlmIdentity:
    """What a projector must match in the LLM: its checkpoint name and embedding geometry."""

    name: str
    hidden_size: int
    vocab_size: int


@dataclass(frozen=True)
class ProjectorCard:
    """What a projector was trained for and how: the encoder, the LLM, and the prompt layout.

    ``layout``: the text RAG fields (``instruction``, ``document_template``) the xRAG documents were rendered
    with in training, which serving must use too; empty: text RAG's own (what the tiny model's projector was
    trained in, a ``[n] (source: ...)`` line per document). A lean layout drops the source line, so that a
    document costs about one token; its citations travel in the response's ``retrieval.documents``.
    """

    encoder: str
    encoder_dim: int
    llm: LlmIdentity
    training: dict[str, Any] = field(default_factory=dict)
    layout: dict[str, str] = field(default_factory=dict)

    def prompt_layout(self, text_rag: TextRagConfig) -> TextRagConfig:
        """``text_rag`` with the fields this projector was trained with (budgets and placement kept)."""
        return text_rag.model_copy(update=self.layout) if self.layout else text_rag

    def check(self, encoder: str | None = None, encoder_dim: int | None = None, llm: LlmIdentity | None = None):
        """Raise :class:`ProjectorMismatchError` if the given encoder or LLM is not the one trained for."""
        if encoder is not None and (encoder, encoder_dim) != (self.encoder, self.encoder_dim):
            raise ProjectorMismatchError(
                f"the xRAG projector was trained on {self.encoder} ({self.encoder_dim}-d) vectors, "
                f"the retriever gives {encoder} ({encoder_dim}-d)"
            )
        if llm is not None and llm != self.llm:
            raise ProjectorMismatchError(f"the xRAG projector was trained for the LLM {self.llm}, not {llm}")


def llm_identity(model_path: str | Path) -> LlmIdentity:
    """The identity of a checkpoint directory (its name and its text model's hidden and vocab sizes).

    The name is the registered model's for a prepared one (its manifest's: ``smol``), since its cache
    directory's name carries a digest that changes with the recipe; else the directory's name.
    """
    path = Path(model_path).resolve()
    config = json.loads((path / "config.json").read_text())
    text = config.get("text_config", config)
    manifest = path / MODEL_MANIFEST
    name = json.loads(manifest.read_text())["name"] if manifest.is_file() else path.name
    return LlmIdentity(name, int(text["hidden_size"]), int(text["vocab_size"]))


class XragProjector(nn.Module):
    """xRAG's ``mlp2x_gelu``: Linear(retriever dim -> hidden), GELU, Linear(hidden -> hidden)."""

    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(n, in_dim)`` -> ``(n, hidden_size)``, in the projector's dtype."""
        return self.linear_2(self.act(self.linear_1(vectors.to(self.linear_1.weight.dtype))))


def save_projector(projector: XragProjector, card: ProjectorCard, directory: str | Path) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in projector.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / CARD_FILE).write_text(json.dumps(asdict(card), indent=2) + "\n")
    return directory


def read_card(directory: str | Path) -> ProjectorCard:
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not an xRAG projector (no {CARD_FILE})")
    raw = json.loads(path.read_text())
    return ProjectorCard(
        raw["encoder"],
        int(raw["encoder_dim"]),
        LlmIdentity(**raw["llm"]),
        raw.get("training", {}),
        raw.get("layout", {}),
    )


def load_projector(
    directory: str | Path,
    *,
    encoder: str | None = None,
    encoder_dim: int | None = None,
    llm: LlmIdentity | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[XragProjector, ProjectorCard]:
    """The projector in ``directory``, checked against the encoder and LLM it will serve (when given)."""
    from safetensors.torch import load_file

    card = read_card(directory)
    card.check(encoder, encoder_dim, llm)
    projector = XragProjector(card.encoder_dim, card.llm.hidden_size)
    projector.load_state_dict(load_file(str(Path(directory) / WEIGHTS_FILE)))
    return projector.to(dtype).eval(), card


def add_placeholder_token(model_path: str | Path) -> int:
    """Give the checkpoint's tokenizer the special token :data:`XRAG_TOKEN` (idempotent); its id.

    The id is the tokenizer's next free one, which must be a row of the model's embedding table (a spare
    row of a padded vocabulary: vLLM rejects ids outside it); that row is never read, vLLM scatters the
    projected vector over it. Text the tokenizer encoded before is encoded the same after.
    """
    from tokenizers import AddedToken, Tokenizer

    path = Path(model_path) / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path))
    existing = tokenizer.token_to_id(XRAG_TOKEN)
    if existing is not None:
        return existing
    vocab_size = llm_identity(model_path).vocab_size
    token_id = tokenizer.get_vocab_size(with_added_tokens=True)
    if token_id >= vocab_size:
        raise ValueError(
            f"{model_path}: no spare embedding row for {XRAG_TOKEN} (tokenizer has {token_id} tokens, the model's "
            f"vocabulary {vocab_size})"
        )
    tokenizer.add_special_tokens([AddedToken(XRAG_TOKEN, special=True, normalized=False)])
    tokenizer.save(str(path))
    return tokenizer.token_to_id(XRAG_TOKEN)
