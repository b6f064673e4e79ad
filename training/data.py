"""Tasks -> model inputs, exactly as the serving path builds them (chat template, ``<image>`` expanded to
one placeholder per visual token, CLIP-normalised pixels), so a trained checkpoint is served unchanged."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mmrag.serving.retrieval.config import TextRagConfig
from mmrag.training.tasks import Task
from mmrag.training.tasks.chat import template_messages

__all__ = [
    "Batch",
    "EncodedTask",
    "collate",
    "encode_answer",
    "encode_prompt",
    "encode_task",
    "encode_turn",
    "pixel_values",
]

# CLIPImageProcessor's defaults (the processor the checkpoint ships); the tests compare against it.
_CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
_CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
IGNORE = -100


def pixel_values(images: Sequence[np.ndarray]) -> torch.Tensor | None:
    """``(n, 3, H, W)`` float32, as CLIPImageProcessor gives for images already at the model's size."""
    if not images:
        return None
    scaled = (np.stack(images).astype(np.float32) / 255.0 - _CLIP_MEAN) / _CLIP_STD
    return torch.from_numpy(scaled).permute(0, 3, 1, 2).contiguous()


def encode_prompt(
    task: Task, tokenizer, tokens_per_image: int, with_documents: bool = True, layout: TextRagConfig | None = None
) -> list[int]:
    """Prompt ids with each ``<image>`` repeated ``tokens_per_image`` times (LlavaProcessor's expansion);
    ``layout``: how documents are rendered (None: text RAG's default)."""
    text = tokenizer.apply_chat_template(
        template_messages(task, with_documents, layout), tokenize=False, add_generation_prompt=True
    )
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ids: list[int] = []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        ids.extend([token] * tokens_per_image if token == image_id else [token])
    return ids


@dataclass
class EncodedTask:
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None


def encode_task(
    task: Task,
    tokenizer,
    tokens_per_image: int,
    follow_ups: Sequence[tuple[str, str]] = (),
    *,
    prompt_loss: bool = False,
    layout: TextRagConfig | None = None,
) -> EncodedTask:
    """Prompt + answer + eos, then each follow-up as a later user turn and its answer + eos.

    The labels are the answers and their eos; with ``prompt_loss`` every other text token too (never the image
    placeholders), as next-token prediction over the whole chat. The first turn is exactly the serving prompt;
    later turns are rendered by the chat template one message at a time.
    """
    ids = encode_prompt(task, tokenizer, tokens_per_image, layout=layout)
    image_id = tokenizer.convert_tokens_to_ids("<image>")

    def unanswered(span: list[int]) -> list[int]:
        return [t if prompt_loss and t != image_id else IGNORE for t in span]

    labels = unanswered(ids)
    for turn, (question, answer) in enumerate([(task.question, task.answer), *follow_ups]):
        if turn:
            asked = encode_turn(tokenizer, question)
            ids, labels = ids + asked, labels + unanswered(asked)
        target = encode_answer(tokenizer, answer)
        ids, labels = ids + target, labels + target
    return EncodedTask(ids, labels, pixel_values(task.images))


def encode_answer(tokenizer, answer: str) -> list[int]:
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def encode_turn(tokenizer, question: str) -> list[int]:
    """A later user turn after an answer's eos, as the chat template renders it, up to the generation prompt."""
    text = "\n" + tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None

    def to(self, device: torch.device | str) -> Batch:
        pixels = None if self.pixel_values is None else self.pixel_values.to(device, non_blocking=True)
        move = [t.to(device, non_blocking=True) for t in (self.input_ids, self.attention_mask, self.labels)]
        return Batch(*move, pixels)


def collate(items: Sequence[EncodedTask], pad_id: int) -> Batch:
    """Right-padded; pixel values concatenated in item order (the order LLaVA scatters them in)."""
    width = max(len(item.input_ids) for item in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(item.input_ids), torch.tensor(item.labels), 1
    pixels = [item.pixel_values for item in items if item.pixel_values is not None]
    return Batch(ids, mask, labels, torch.cat(pixels) if pixels else None)
