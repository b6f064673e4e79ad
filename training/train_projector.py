"""``mmrag train-projector``: train an xRAG projector for one (encoder, LLM) pair; both stay frozen.

The two stages of xRAG (Cheng et al. 2024, https://arxiv.org/abs/2405.13792), on the knowledge family's documents:

1. **Paraphrase pretraining**: the prompt holds one document as a single ``<xrag>`` token and asks for it
   back; the target is the document's text (NLL only). The projector learns to put what the encoder kept
   of a document where the LLM reads it.
2. **Context-aware instruction tuning with self-distillation**: knowledge questions over 1-3 documents,
   each one ``<xrag>`` token, answered by the student; the teacher is the same frozen LLM reading the
   documents as text RAG puts them. Loss = NLL of the answers + ``kl_weight`` * KL(teacher || student) on
   the answer tokens (the student's and the teacher's answers are the same tokens, so positions pair up).

Prompts are built exactly as the server builds them (:func:`~mmrag.training.tasks.chat.context_text` with
``<xrag>`` in place of each document's text), so the projector is served in the form it was trained in.
The documents of a pool of training tasks are encoded once (the encoder is the slow part on a CPU); every
step draws from the pool with a generator seeded by the step, so a resumed run sees the batches an
uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mmrag.serving.retrieval.config import TextRagConfig
from mmrag.serving.xrag.projector import (
    XRAG_TOKEN,
    ProjectorCard,
    XragProjector,
    add_placeholder_token,
    llm_identity,
    save_projector,
)
from mmrag.training.data import Batch, EncodedTask, collate, encode_task
from mmrag.training.tasks import Task, document_source, make_task
from mmrag.training.tasks.english import attribute_questions, distractors, make_question
from mmrag.training.tasks.families import Split
from mmrag.training.train_tiny import exact_match

logger = logging.getLogger(__name__)

__all__ = [
    "LEAN_LAYOUT",
    "PRESETS",
    "ProjectorTrainConfig",
    "XragData",
    "english_task",
    "evaluate_xrag",
    "shipped_projector_dir",
    "train_projector",
    "xrag_view",
]

PARAPHRASE_QUESTION = "Repeat document 1."


@dataclass(frozen=True)
class ProjectorTrainConfig:
    seed: int = 0
    paraphrase_steps: int = 400
    instruct_steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50
    kl_weight: float = 2.0  # xRAG's published weight (NLL 1.0 + KL 2.0)
    pool_tasks: int = 3000  # training tasks whose documents are encoded once
    english_tasks: int = 0  # English questions about invented documents (train split) added to the pool
    max_documents: int = 3
    follow_ups: int = 2
    lean: bool = False  # the lean layout (LEAN_LAYOUT: one token per document) instead of text RAG's
    eval_tasks: int = 128
    eval_every: int = 500
    checkpoint_every: int = 250
    # Also evaluate the untrained projector (step 0): the baseline the held-out losses are read against.
    eval_untrained: bool = False

    @property
    def steps(self) -> int:
        return self.paraphrase_steps + self.instruct_steps

    @property
    def layout(self) -> dict[str, str]:
        """The text RAG fields the student's documents are rendered with (empty: text RAG's own)."""
        return dict(LEAN_LAYOUT) if self.lean else {}


# Each document is its <xrag> token alone, after a short instruction: about one prompt token per document
# (text RAG's layout adds a "[n] (source: ...)" line of ~34 tokens). Citations are the response's
# retrieval.documents, so the instruction no longer asks for [n].
LEAN_LAYOUT = {"instruction": "Answer the question using the documents below.", "document_template": "{text}"}

# `mmrag train-projector --model NAME`: the settings each registered model is trained with. smol's are sized
# for the shared 2-core CPU and a 45-minute slot: a step of 8 sequences through the frozen 135M model
# (backward to the projector only) took 7 s on one idle thread, and a step of 4 took 30 s with the machine
# loaded (load 6-7), where the tiny model's takes milliseconds; training.json records the run. Far too few
# steps for xRAG (the paper trains on millions of documents): a GPU run (--device cuda) can afford more.
PRESETS: dict[str, ProjectorTrainConfig] = {
    "tiny-mllm": ProjectorTrainConfig(),
    "smol": ProjectorTrainConfig(
        paraphrase_steps=16,
        instruct_steps=40,
        batch_size=4,
        lr=3e-3,
        warmup_steps=3,
        kl_weight=0.5,  # the targets are the short gold answers; the teacher would start a sentence
        pool_tasks=300,
        english_tasks=300,
        follow_ups=1,
        lean=True,
        eval_tasks=12,
        eval_every=10_000,  # at the end only: an evaluation through the 135M model costs minutes here
        checkpoint_every=5,
    ),
}
# The tiny Qwen-family checkpoints (random weights, 128-d, 320-row vocabulary): their LM knows nothing, so
# exact match is ~0 in every mode, text RAG included. What training can show is that the projector lowers
# the held-out losses (paraphrase NLL, instruction NLL and KL to the same LM reading the text) against the
# untrained projector, i.e. the plumbing learns; nothing about answer quality. A step of 16 byte-level
# sequences took 1-4 s on the shared 2-core machine (load 2), so 500 steps are about 15 minutes.
_TINY_FAMILY_PRESET = ProjectorTrainConfig(
    paraphrase_steps=150,
    instruct_steps=350,
    batch_size=16,
    lr=3e-3,
    warmup_steps=20,
    pool_tasks=800,
    eval_tasks=64,
    eval_every=250,
    checkpoint_every=50,
    eval_untrained=True,
)
PRESETS["tiny-qwen2.5-vl"] = _TINY_FAMILY_PRESET
PRESETS["tiny-llava-onevision"] = _TINY_FAMILY_PRESET
# Where `mmrag train-projector --model NAME` writes by default (the registered models with a shipped projector).
SHIPPED_PROJECTORS = ("tiny-mllm", "smol", "tiny-qwen2.5-vl", "tiny-llava-onevision")


def shipped_projector_dir(model: str) -> Path | None:
    """Where the projector of a registered model is shipped (``serving/data/<model>-xrag-minilm``)."""
    from mmrag.serving.models.trained import TRAINED_MODEL_DIR

    return TRAINED_MODEL_DIR.parent / f"{model}-xrag-minilm" if model in SHIPPED_PROJECTORS else None


def xrag_view(task: Task) -> Task:
    """The task as an xRAG prompt: each document's text replaced by the one placeholder token."""
    return dataclasses.replace(task, documents=(XRAG_TOKEN,) * len(task.documents))


def paraphrase_task(document: str) -> Task:
    sources = (document_source(document),)  # as the instruction stage and the server show it, not kb/1
    return Task(
        "knowledge", "train", (PARAPHRASE_QUESTION,), document, documents=(document,), relevant=0, sources=sources
    )


@dataclass
class XragData:
    """Tokenizer, placeholder id and document vectors: what turns tasks into student/teacher batches.

    ``layout``: how the student's documents are rendered (the projector card's; None: text RAG's). The
    teacher always reads text RAG's layout, as the server's text mode shows documents.
    """

    tokenizer: object
    xrag_id: int
    vectors: dict[str, np.ndarray]  # document text -> encoder vector
    device: str = "cpu"
    layout: TextRagConfig | None = None

    def batch(self, items: Sequence[EncodedTask]) -> Batch:
        """Right-padded, on the training device."""
        batch = collate(items, self.tokenizer.pad_token_id)
        return Batch(
            batch.input_ids.to(self.device), batch.attention_mask.to(self.device), batch.labels.to(self.device), None
        )

    def stack(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(arrays)).float().to(self.device)

    def student(self, task: Task, follow_ups: Sequence[tuple[str, str]] = ()) -> tuple[EncodedTask, np.ndarray]:
        encoded = encode_task(xrag_view(task), self.tokenizer, 1, follow_ups, layout=self.layout)
        return encoded, np.stack([self.vectors[d] for d in task.documents])

    def teacher(self, task: Task, follow_ups: Sequence[tuple[str, str]] = ()) -> EncodedTask:
        return encode_task(task, self.tokenizer, 1, follow_ups)


def student_embeddings(llm, batch: Batch, vectors: torch.Tensor, projector: XragProjector, xrag_id: int):
    """The batch's input embeddings with each ``<xrag>`` row (row-major order) set to its projected vector."""
    embeds = llm.get_input_embeddings()(batch.input_ids)
    mask = batch.input_ids == xrag_id
    if int(mask.sum()) != len(vectors):
        raise ValueError(f"{int(mask.sum())} {XRAG_TOKEN} tokens for {len(vectors)} document vectors")
    projected = projector(vectors).to(embeds.dtype)
    return embeds.masked_scatter(mask[..., None], projected)


def _logits(llm, batch: Batch, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    if inputs_embeds is None:
        return llm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return llm(inputs_embeds=inputs_embeds, attention_mask=batch.attention_mask).logits


def _answer_logits(llm, batch: Batch, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """``(T, V)``: the logits that predict each answer token, row-major.

    The LM head runs on those positions only: with a 49k vocabulary (SmolLM2) it is a fifth of the model,
    and the prompt positions' logits are never used.
    """
    decoder = llm.get_decoder()
    inputs = {"input_ids": batch.input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    hidden = decoder(**inputs, attention_mask=batch.attention_mask).last_hidden_state
    return llm.lm_head(hidden[:, :-1][batch.labels[:, 1:] != -100]).float()


def _answer_targets(labels: torch.Tensor) -> torch.Tensor:
    return labels[:, 1:][labels[:, 1:] != -100]


def _lr_at(config: ProjectorTrainConfig, step: int) -> float:
    """Warmup then cosine, restarted at the instruction stage (a new objective)."""
    stage_start, stage_steps = (
        (0, config.paraphrase_steps)
        if step < config.paraphrase_steps
        else (
            config.paraphrase_steps,
            config.instruct_steps,
        )
    )
    local = step - stage_start
    if local < config.warmup_steps:
        return config.lr * (local + 1) / config.warmup_steps
    progress = (local - config.warmup_steps) / max(1, stage_steps - config.warmup_steps)
    return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _pool(config: ProjectorTrainConfig) -> list[Task]:
    knowledge = [
        make_task("knowledge", i, split="train", seed=config.seed, max_documents=config.max_documents)
        for i in range(config.pool_tasks)
    ]
    return knowledge + [english_task(config.seed, i, config.max_documents) for i in range(config.english_tasks)]


def english_task(seed: int, index: int, max_documents: int, split: Split = "train") -> Task:
    """An English question about an invented document (:mod:`~mmrag.training.tasks.english`) as a task: its
    document among 0 to ``max_documents - 1`` others of the same split (half the time alone), the relevant
    one anywhere, and the document's other attributes as follow-ups."""
    question = make_question(seed, split, index)
    rng = random.Random(f"{seed}:xrag-english:{split}:{index}")
    others = distractors(question, rng.choice([0, 0, *range(max_documents)]), seed) if max_documents > 1 else []
    documents = [question.doc.text, *(d.text for d in others)]
    rng.shuffle(documents)
    follow_ups = [
        (q.question, q.answer) for q in attribute_questions(question.doc, seed) if q.answer != question.answer
    ]
    return Task(
        "english",
        split,
        (question.question,),
        question.answer,
        documents=tuple(documents),
        relevant=documents.index(question.doc.text),
        sources=tuple(document_source(d) for d in documents),
        signature=question.doc.signature,
        follow_ups=tuple(follow_ups),
    )


def encode_documents(encoder, documents: Sequence[str], progress: bool) -> dict[str, np.ndarray]:
    """Document text -> vector, as ingestion stores it (document prefix, the encoder's normalisation)."""
    from tqdm import tqdm

    unique = list(dict.fromkeys(documents))
    vectors: dict[str, np.ndarray] = {}
    step = 256
    for start in tqdm(range(0, len(unique), step), disable=not progress, desc="encode documents"):
        chunk = unique[start : start + step]
        vectors.update(zip(chunk, encoder.encode(chunk), strict=True))
    return vectors


def _paraphrase_loss(llm, projector, data: XragData, tasks: list[Task]) -> torch.Tensor:
    documents = [task.documents[task.relevant or 0] for task in tasks]
    pairs = [data.student(paraphrase_task(d)) for d in documents]
    batch = data.batch([p[0] for p in pairs])
    embeds = student_embeddings(llm, batch, data.stack([p[1] for p in pairs]), projector, data.xrag_id)
    logits = _answer_logits(llm, batch, embeds)
    return torch.nn.functional.cross_entropy(logits, _answer_targets(batch.labels))


def _instruct_terms(
    llm, projector, data: XragData, tasks: list[Task], follow_ups: list[list[tuple[str, str]]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's answer NLL and its KL from the teacher (the same LLM reading the documents as text)."""
    pairs = [data.student(t, f) for t, f in zip(tasks, follow_ups, strict=True)]
    student = data.batch([p[0] for p in pairs])
    teacher = data.batch([data.teacher(t, f) for t, f in zip(tasks, follow_ups, strict=True)])
    embeds = student_embeddings(llm, student, data.stack([p[1] for p in pairs]), projector, data.xrag_id)
    student_logits = _answer_logits(llm, student, embeds)
    with torch.no_grad():
        teacher_logits = _answer_logits(llm, teacher)
    nll = torch.nn.functional.cross_entropy(student_logits, _answer_targets(student.labels))
    kl = torch.nn.functional.kl_div(
        student_logits.log_softmax(-1), teacher_logits.log_softmax(-1), log_target=True, reduction="batchmean"
    )
    return nll, kl


@torch.no_grad()
def heldout_losses(llm, projector, data: XragData, tasks: Sequence[Task], batch_size: int = 16) -> dict[str, float]:
    """The training objectives on held-out tasks (no follow-ups), averaged over batches: ``paraphrase_nll``
    (each task's relevant document back from its one token), ``instruct_nll`` and ``instruct_kl``."""
    sums = {"paraphrase_nll": 0.0, "instruct_nll": 0.0, "instruct_kl": 0.0}
    batches = 0
    for start in range(0, len(tasks), batch_size):
        group = list(tasks[start : start + batch_size])
        nll, kl = _instruct_terms(llm, projector, data, group, [[] for _ in group])
        sums["paraphrase_nll"] += float(_paraphrase_loss(llm, projector, data, group))
        sums["instruct_nll"] += float(nll)
        sums["instruct_kl"] += float(kl)
        batches += 1
    return {key: value / max(1, batches) for key, value in sums.items()}


def _step_tasks(config: ProjectorTrainConfig, pool: list[Task], step: int):
    rng = random.Random(f"{config.seed}:xrag:{step}")
    tasks = [pool[rng.randrange(len(pool))] for _ in range(config.batch_size)]
    follow_ups = [rng.sample(t.follow_ups, min(config.follow_ups, len(t.follow_ups))) for t in tasks]
    return tasks, follow_ups


@torch.no_grad()
def evaluate_xrag(llm, projector, data: XragData, tasks: Sequence[Task], batch_size: int = 8) -> dict[str, float]:
    """Exact match (teacher-forced, all answer tokens argmax) with no documents, as text, and as xRAG.

    Keys ``none``/``text``/``xrag`` for knowledge tasks, ``english_<mode>`` for English ones (whose gold
    answer is a bare name or number where a chat model starts a sentence: lower than what the bench's
    "reply contains the answer" measures, but the same for every mode).
    """
    hits: dict[str, int] = {}
    counts: dict[str, int] = {}
    for start in range(0, len(tasks), batch_size):
        group = list(tasks[start : start + batch_size])
        prefixes = ["" if t.family == "knowledge" else f"{t.family}_" for t in group]
        bare = data.batch([data.teacher(dataclasses.replace(t, documents=())) for t in group])
        text = data.batch([data.teacher(t) for t in group])
        pairs = [data.student(t) for t in group]
        student = data.batch([p[0] for p in pairs])
        embeds = student_embeddings(llm, student, data.stack([p[1] for p in pairs]), projector, data.xrag_id)
        rows = {
            "none": exact_match(_logits(llm, bare), bare.labels),
            "text": exact_match(_logits(llm, text), text.labels),
            "xrag": exact_match(_logits(llm, student, embeds), student.labels),
        }
        for mode, right in rows.items():
            for prefix, hit in zip(prefixes, right.tolist(), strict=True):
                hits[prefix + mode] = hits.get(prefix + mode, 0) + int(hit)
                counts[prefix + mode] = counts.get(prefix + mode, 0) + 1
    return {key: hits[key] / counts[key] for key in hits}


def _evaluation(llm, projector, data: XragData, tasks: Sequence[Task], step: int, stage: str, loss) -> dict:
    """One history entry: held-out exact match per mode and held-out losses (:func:`heldout_losses`)."""
    projector.eval()
    return {
        "step": step,
        "stage": stage,
        "loss": loss,
        "heldout": evaluate_xrag(llm, projector, data, tasks),
        "heldout_loss": heldout_losses(llm, projector, data, tasks),
    }


def heldout_tasks(config: ProjectorTrainConfig) -> list[Task]:
    """Held-out knowledge tasks, and as many held-out English ones when the pool has English."""
    tasks = [
        make_task("knowledge", i, split="heldout", seed=config.seed, max_documents=config.max_documents)
        for i in range(config.eval_tasks)
    ]
    if config.english_tasks:
        tasks += [english_task(config.seed, i, config.max_documents, "heldout") for i in range(config.eval_tasks)]
    return tasks


def load_frozen_llm(model_path: str | Path):
    """The LLM in fp32, every parameter frozen (gradients flow through it to the projector only)."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    llm = AutoModelForImageTextToText.from_pretrained(str(model_path), dtype=torch.float32).eval()
    for parameter in llm.parameters():
        parameter.requires_grad_(False)
    return llm, AutoTokenizer.from_pretrained(str(model_path))


def train_projector(
    out: str | Path,
    model_path: str | Path,
    encoder,
    config: ProjectorTrainConfig,
    *,
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    device: str = "cpu",
    threads: int | None = None,
) -> dict | None:
    """Train, evaluate on held-out knowledge tasks, write the projector to ``out``; returns the summary.

    Adds the ``<xrag>`` token to the checkpoint's tokenizer first (idempotent; see
    :func:`~mmrag.serving.xrag.projector.add_placeholder_token`). ``stop_after``: leave after that step
    with a resumable checkpoint (returns ``None``).
    """
    from tqdm import tqdm

    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    state_path = out / "train_state.pt"
    xrag_id = add_placeholder_token(model_path)
    llm, tokenizer = load_frozen_llm(model_path)
    llm.to(device)
    torch.manual_seed(config.seed)
    pool, evaluation = _pool(config), heldout_tasks(config)
    documents = [d for t in [*pool, *evaluation] for d in t.documents]
    layout = TextRagConfig().model_copy(update=config.layout) if config.layout else None
    data = XragData(tokenizer, xrag_id, encode_documents(encoder, documents, progress), device, layout)
    identity = llm_identity(model_path)
    projector = XragProjector(encoder.dim, identity.hidden_size).to(device)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=config.lr, weight_decay=0.0)
    start, history, elapsed = 0, [], 0.0
    if resume and state_path.is_file():
        state = torch.load(state_path, weights_only=False, map_location=device)
        projector.load_state_dict(state["projector"])
        optimizer.load_state_dict(state["optimizer"])
        start, history, elapsed = state["step"], state["history"], state["elapsed_s"]
        logger.info("resumed from %s at step %d", state_path, start)
    out.mkdir(parents=True, exist_ok=True)
    if config.eval_untrained and start == 0:
        history.append(_evaluation(llm, projector, data, evaluation, 0, "untrained", None))
    began = time.perf_counter() - elapsed
    running = None
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not progress, desc="xrag")
    for step in bar:
        projector.train()
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(config, step)
        tasks, follow_ups = _step_tasks(config, pool, step)
        stage = "paraphrase" if step < config.paraphrase_steps else "instruct"
        if stage == "paraphrase":
            loss = _paraphrase_loss(llm, projector, data, tasks)
        else:
            nll, kl = _instruct_terms(llm, projector, data, tasks, follow_ups)
            loss = nll + config.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(projector.parameters(), 1.0)
        optimizer.step()
        running = (
            loss.item() if running is None or step == config.paraphrase_steps else 0.95 * running + 0.05 * loss.item()
        )
        bar.set_postfix(stage=stage, loss=f"{running:.3f}")
        done = step + 1
        if done % 10 == 0:
            logger.info(
                "step %d/%d (%s): loss %.3f, %.0f s", done, config.steps, stage, running, time.perf_counter() - began
            )
        if done % config.eval_every == 0 or done == config.steps:
            history.append(_evaluation(llm, projector, data, evaluation, done, stage, running))
            bar.write(f"step {done} ({stage}): loss {running:.3f} heldout {history[-1]}")
        if (done % config.checkpoint_every == 0 or done == stop_after) and done < config.steps:
            state = {
                "projector": projector.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": done,
                "history": history,
                "elapsed_s": time.perf_counter() - began,
            }
            torch.save(state, state_path)
            if done == stop_after:
                bar.close()
                return None
    summary = {
        "config": asdict(config),
        "train_seconds": time.perf_counter() - began,
        "history": history,
        "heldout": history[-1]["heldout"] if history else None,
    }
    if config.eval_untrained:
        summary["heldout_loss"] = {"untrained": history[0]["heldout_loss"], "trained": history[-1]["heldout_loss"]}
    card = ProjectorCard(encoder.name, encoder.dim, identity, training=summary, layout=config.layout)
    save_projector(projector.eval().cpu(), card, out)
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    state_path.unlink(missing_ok=True)
    return summary
