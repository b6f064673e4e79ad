"""The task generator: deterministic, held-out split disjoint by content, answers consistent with inputs."""

from __future__ import annotations

import numpy as np
import pytest

from mmrag.training.tasks import FAMILIES, IMAGE_FAMILIES, document_source, make_task, split_of
from mmrag.training.tasks.chat import context_text, openai_messages


@pytest.mark.parametrize("family", FAMILIES)
def test_same_arguments_same_task(family):
    a, b = make_task(family, 7, seed=3), make_task(family, 7, seed=3)
    assert (a.parts, a.answer, a.documents, a.signature) == (b.parts, b.answer, b.documents, b.signature)
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images, strict=True))
    others = [make_task(family, i, seed=3).signature for i in range(8, 20)]
    assert len(set(others)) > 1  # the index matters


@pytest.mark.parametrize("family", FAMILIES)
def test_heldout_split_is_disjoint_from_training(family):
    train = {make_task(family, i).signature for i in range(400)}
    heldout = {make_task(family, i, split="heldout").signature for i in range(100)}
    assert not train & heldout
    assert all(split_of(s) == "train" for s in train) and all(split_of(s) == "heldout" for s in heldout)


def test_answers_follow_the_inputs():
    for i in range(50):
        needle = make_task("needle", i, max_images=6)
        assert 1 <= int(needle.answer) <= len(needle.images) >= 2
        count = make_task("count", i, max_images=6)
        assert 0 <= int(count.answer) <= len(count.images)
        assert make_task("compare", i).answer in ("yes", "no")
        knowledge = make_task("knowledge", i, max_documents=3)
        assert 1 <= len(knowledge.documents) <= 3
        name = knowledge.question.rsplit(" of ", 1)[1].rstrip("?")
        assert (
            name in knowledge.documents[knowledge.relevant]
            and knowledge.answer in knowledge.documents[knowledge.relevant]
        )
    # A colour question's answer is the colour drawn: the image's most saturated pixels are near it.
    from mmrag.training.tasks.render import COLOURS

    for i in range(20):
        task = make_task("colour", i, max_images=4)
        k = int(task.question.rsplit(" ", 1)[1].rstrip("?")) - 1
        pixels = task.images[k].reshape(-1, 3).astype(int)
        brightest = pixels[np.argmax(pixels.max(1) - pixels.min(1))]
        nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - brightest).sum())
        assert nearest == task.answer


def test_images_are_placed_after_their_marker():
    task = make_task("needle", 2, max_images=5)
    assert task.parts[: 2 * len(task.images)] == tuple(
        x for i in range(len(task.images)) for x in (f"Image {i + 1}:", i)
    )
    assert all(img.shape == (32, 32, 3) and img.dtype == np.uint8 for img in task.images)


def test_openai_messages_carry_images_and_documents():
    task = make_task("knowledge", 1, max_documents=3)
    system, user = openai_messages(task)
    assert system["role"] == "system" and system["content"] == context_text(task.documents, task.sources)
    assert all(f"(source: {source})" in system["content"] for source in task.sources)
    assert user["content"][-1]["text"] == task.question
    image_task = make_task("colour", 1, max_images=3)
    parts = openai_messages(image_task)[0]["content"]
    urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    assert len(urls) == len(image_task.images) and all(u.startswith("data:image/png;base64,") for u in urls)
    assert set(IMAGE_FAMILIES) < set(FAMILIES)


def test_document_sources_are_a_function_of_the_text_and_varied():
    tasks = [make_task("knowledge", i, max_documents=3) for i in range(200)]
    assert all(t.sources == tuple(document_source(d) for d in t.documents) for t in tasks)
    sources = [s for t in tasks for s in t.sources]
    # The server shows the ingested path, whatever it is: short ids, absolute and relative paths, URLs.
    kinds = {
        "absolute": sum(s.startswith("/") for s in sources),
        "url": sum(s.startswith("https://") for s in sources),
        "relative": sum(not s.startswith(("/", "https://")) for s in sources),
    }
    assert min(kinds.values()) >= len(sources) // 10, kinds
    assert len(set(sources)) > 0.9 * len(sources)
    assert not any("//" in s.removeprefix("https://") for s in sources)
