"""Seeded task families: multi-image questions (MileBench / needle-in-a-haystack in spirit) and a
text-only knowledge family (invented entities, read from documents in the prompt, as text RAG puts them).

Every task is a pure function of ``(seed, family, split, index)``. The held-out split is defined on content,
not on the index: a task's *signature* (what it asks about and what the images or documents hold, not the
random pixels) is hashed into 100 buckets and buckets 0-9 are held out, so no held-out question is ever seen
in training, whatever the number of training samples (``tests/unit/test_tasks.py``).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from mmrag.training.tasks.render import COLOURS, SHAPES, ShapeImage, render

__all__ = [
    "FAMILIES",
    "IMAGE_FAMILIES",
    "Split",
    "Task",
    "document_source",
    "make_task",
    "split_of",
]

Split = Literal["train", "heldout"]
HELDOUT_BUCKETS = 10  # of 100


@dataclass(frozen=True)
class Task:
    """One question with its inputs and the exact answer.

    Attributes:
        parts: the user turn in order: text strings and image indexes into ``images``.
        shown: what each image shows (the pixels are drawn from it).
        documents: knowledge family: the documents given as context (``relevant`` answers the question).
        sources: each document's source as retrieval shows it (:func:`document_source`).
        signature: what defines the task for the split (pixels excluded).
        follow_ups: more ``(question, answer)`` pairs about the same inputs, each of them in the same split
            (its own signature checked). Training asks several per prompt as later chat turns: the images
            are read once and supervised many times, which is what makes a CPU-sized training run enough.
    """

    family: str
    split: Split
    parts: tuple[str | int, ...]
    answer: str
    images: tuple[np.ndarray, ...] = ()
    shown: tuple[ShapeImage, ...] = ()
    documents: tuple[str, ...] = ()
    relevant: int | None = None
    sources: tuple[str, ...] = ()
    signature: str = field(default="", repr=False)
    follow_ups: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @property
    def question(self) -> str:
        return str(self.parts[-1])


def split_of(signature: str) -> Split:
    bucket = int.from_bytes(hashlib.blake2b(signature.encode(), digest_size=8).digest(), "big") % 100
    return "heldout" if bucket < HELDOUT_BUCKETS else "train"


# -- multi-image families ------------------------------------------------------------------------


def _random_images(rng: random.Random, n: int) -> list[ShapeImage]:
    return [ShapeImage(rng.choice(list(COLOURS)), rng.choice(SHAPES)) for _ in range(n)]


def _image_parts(n: int, question: str) -> tuple[str | int, ...]:
    """``Image 1:`` before each image gives the model something to bind "Image k" in the question to."""
    parts: list[str | int] = []
    for i in range(n):
        parts += [f"Image {i + 1}:", i]
    return (*parts, question)


def _colour(rng: random.Random, n: int) -> tuple[list[ShapeImage], str, str]:
    images = _random_images(rng, n)
    k = rng.randrange(n)
    return images, f"What colour is the shape in Image {k + 1}?", images[k].colour


def _shape(rng: random.Random, n: int) -> tuple[list[ShapeImage], str, str]:
    images = _random_images(rng, n)
    k = rng.randrange(n)
    return images, f"What shape is in Image {k + 1}?", images[k].shape


def _needle(rng: random.Random, n: int) -> tuple[list[ShapeImage], str, str]:
    """Exactly one image shows the asked (colour, shape); distractors share one attribute when they can."""
    target = ShapeImage(rng.choice(list(COLOURS)), rng.choice(SHAPES))
    images = []
    for _ in range(n - 1):
        while (img := _random_images(rng, 1)[0]) == target:
            pass
        if rng.random() < 0.5:  # a near miss: same colour or same shape
            img = (
                ShapeImage(target.colour, rng.choice([s for s in SHAPES if s != target.shape]))
                if rng.random() < 0.5
                else ShapeImage(rng.choice([c for c in COLOURS if c != target.colour]), target.shape)
            )
        images.append(img)
    k = rng.randrange(n)
    images.insert(k, target)
    return images, f"Which image shows the {target.colour} {target.shape}?", str(k + 1)


def _count(rng: random.Random, n: int) -> tuple[list[ShapeImage], str, str]:
    colour = rng.choice(list(COLOURS))
    hits = rng.randint(0, n)
    images = [
        ShapeImage(colour if i < hits else rng.choice([c for c in COLOURS if c != colour]), rng.choice(SHAPES))
        for i in range(n)
    ]
    rng.shuffle(images)
    return images, f"How many images show a {colour} shape?", str(hits)


def _compare(rng: random.Random, n: int) -> tuple[list[ShapeImage], str, str]:
    images = _random_images(rng, n)
    i, j = sorted(rng.sample(range(n), 2))
    same = rng.random() < 0.5
    colour = images[i].colour if same else rng.choice([c for c in COLOURS if c != images[i].colour])
    images[j] = ShapeImage(colour, images[j].shape)
    return images, f"Do Image {i + 1} and Image {j + 1} show the same colour?", "yes" if same else "no"


ImageFamily = Callable[[random.Random, int], tuple[list[ShapeImage], str, str]]
IMAGE_FAMILIES: dict[str, tuple[ImageFamily, int]] = {  # family -> (builder, fewest images)
    "colour": (_colour, 1),
    "shape": (_shape, 1),
    "needle": (_needle, 2),
    "count": (_count, 1),
    "compare": (_compare, 2),
}


def _image_signature(family: str, question: str, images: list[ShapeImage]) -> str:
    return f"{family}|{question}|" + ",".join(f"{im.colour}-{im.shape}" for im in images)


def _image_follow_ups(images: list[ShapeImage], split: Split) -> tuple[tuple[str, str], ...]:
    """Every question of every family that these images answer, kept if it falls in ``split``."""
    n = len(images)
    asked: list[tuple[str, str, str]] = []
    for k, im in enumerate(images, start=1):
        asked += [
            ("colour", f"What colour is the shape in Image {k}?", im.colour),
            ("shape", f"What shape is in Image {k}?", im.shape),
        ]
        if images.count(im) == 1:
            asked.append(("needle", f"Which image shows the {im.colour} {im.shape}?", str(k)))
    for colour in COLOURS:
        hits = sum(im.colour == colour for im in images)
        asked.append(("count", f"How many images show a {colour} shape?", str(hits)))
    for i in range(n):
        for j in range(i + 1, n):
            same = "yes" if images[i].colour == images[j].colour else "no"
            asked.append(("compare", f"Do Image {i + 1} and Image {j + 1} show the same colour?", same))
    return tuple((q, a) for family, q, a in asked if split_of(_image_signature(family, q, images)) == split)


def _image_task(family: str, rng: random.Random, split: Split, max_images: int, image_size: int) -> Task:
    builder, fewest = IMAGE_FAMILIES[family]
    while True:
        n = rng.randint(fewest, max(fewest, max_images))
        images, question, answer = builder(rng, n)
        signature = _image_signature(family, question, images)
        if split_of(signature) == split:
            pixels = tuple(render(im, rng, image_size) for im in images)
            follow_ups = tuple(qa for qa in _image_follow_ups(images, split) if qa[0] != question)
            parts = _image_parts(n, question)
            return Task(family, split, parts, answer, pixels, tuple(images), signature=signature, follow_ups=follow_ups)


# -- knowledge family ----------------------------------------------------------------------------

_SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ren",
    "tor",
    "vel",
    "sa",
    "qui",
    "dar",
    "nu",
    "bex",
    "ol",
    "fen",
    "zi",
    "mar",
    "tup",
    "gal",
    "ess",
    "ru",
    "win",
]
_KINDS = ["village", "river", "guild", "comet", "festival", "library", "lighthouse", "orchard", "bridge", "choir"]
_PLACES = ["Harrowgate", "Quenby", "Tarn Edda", "Greyfin", "Selvara", "Ambrel", "Corrin", "Kessel", "Aurel", "Marlow"]
_COLOURS = ["amber", "crimson", "teal", "ivory", "violet", "olive", "silver", "indigo"]
ATTRIBUTES = ("colour", "place", "number")


def entity_name(rng: random.Random) -> str:
    return "".join(rng.sample(_SYLLABLES, 3)).capitalize()


def entity_document(name: str, rng: random.Random) -> tuple[str, dict[str, str]]:
    facts = {"colour": rng.choice(_COLOURS), "place": rng.choice(_PLACES), "number": str(rng.randint(10, 99))}
    kind = rng.choice(_KINDS)
    text = (
        f"{name} is a {kind} near {facts['place']}. The colour of {name} is {facts['colour']}. "
        f"The number of {name} is {facts['number']}."
    )
    return text, facts


_DIRECTORIES = ["tmp", "home", "data", "docs", "corpus", "kb", "notes", "srv", "mnt", "shared", "wiki", "archive"]
_EXTENSIONS = [".txt", ".md", ".html", ".pdf", ""]


def document_source(text: str) -> str:
    """A source string for a document, a pure function of its text: a short id, an absolute or relative
    path, or a URL, with random directory names and numbers.

    The server shows whatever the ingested file's path is (pytest's long temporary paths, a user's corpus
    layout), so the model is trained on varied sources: a projector trained behind ``kb/1`` alone lost half
    its exact matches behind absolute paths (README, xRAG).
    """
    rng = random.Random(hashlib.blake2b(text.encode(), digest_size=8).digest())

    def segment() -> str:
        if rng.random() < 0.5:
            return rng.choice(_DIRECTORIES)
        word = "".join(rng.sample(_SYLLABLES, rng.randint(1, 3)))
        return word + (f"-{rng.randint(0, 999)}" if rng.random() < 0.4 else "")

    stem = str(rng.randint(0, 9999)) if rng.random() < 0.5 else segment()
    name = stem + rng.choice(_EXTENSIONS)
    style = rng.random()
    if style < 0.2:
        return f"{segment()}/{rng.randint(0, 99)}"
    if style < 0.6:
        return "/" + "/".join(segment() for _ in range(rng.randint(2, 6))) + "/" + name
    if style < 0.85:
        return "/".join(segment() for _ in range(rng.randint(1, 3))) + "/" + name
    host = f"{segment()}.{rng.choice(['org', 'com', 'net'])}"
    return f"https://{host}/" + "/".join([*(segment() for _ in range(rng.randint(0, 2))), name])


def _knowledge_task(rng: random.Random, split: Split, max_documents: int) -> Task:
    """Documents about invented entities; the question asks one attribute of one of them.

    Entities are held out by name, so a held-out question can only be answered from its document.
    """
    while (name := entity_name(rng)) and split_of(f"knowledge|{name}") != split:
        pass
    attribute = rng.choice(ATTRIBUTES)
    text, facts = entity_document(name, rng)
    documents = [text]
    follow_ups = [(f"What is the {a} of {name}?", facts[a]) for a in ATTRIBUTES if a != attribute]
    wanted = rng.randint(1, max_documents)
    while len(documents) < wanted:
        other = entity_name(rng)
        if other != name:
            other_text, other_facts = entity_document(other, rng)
            documents.append(other_text)
            if split_of(f"knowledge|{other}") == split:
                follow_ups += [(f"What is the {a} of {other}?", other_facts[a]) for a in ATTRIBUTES]
    relevant = rng.randrange(len(documents))
    documents.insert(relevant, documents.pop(0))
    question = f"What is the {attribute} of {name}?"
    return Task(
        "knowledge",
        split,
        (question,),
        facts[attribute],
        documents=tuple(documents),
        relevant=relevant,
        sources=tuple(document_source(d) for d in documents),
        signature=f"knowledge|{name}",
        follow_ups=tuple(follow_ups),
    )


FAMILIES = (*IMAGE_FAMILIES, "knowledge")


def make_task(
    family: str,
    index: int,
    *,
    split: Split = "train",
    seed: int = 0,
    max_images: int = 6,
    max_documents: int = 4,
    image_size: int = 32,
) -> Task:
    """The ``index``-th task of ``family`` in ``split``; same arguments, same task (pixels included)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; known: {', '.join(FAMILIES)}")
    rng = random.Random(f"{seed}:{family}:{split}:{index}")
    if family == "knowledge":
        return _knowledge_task(rng, split, max_documents)
    return _image_task(family, rng, split, max_images, image_size)
