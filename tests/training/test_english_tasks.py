"""The English document generator: deterministic, answers in the text, held-out entities disjoint by name."""

from __future__ import annotations

import random
import re
from collections import Counter

from mmrag.training.tasks import split_of
from mmrag.training.tasks.english import (
    KINDS,
    EnglishQuestion,
    contains_answer,
    distractors,
    invented_name,
    make_document,
    make_question,
    questions,
    signature_of,
)


def _name(signature: str) -> str:
    return signature.split("|", 1)[1]


def test_same_arguments_same_document_and_question():
    assert make_document(3, "train", 7) == make_document(3, "train", 7)
    assert make_question(3, "heldout", 7) == make_question(3, "heldout", 7)
    assert questions(1, "train", 5) == questions(1, "train", 5)
    others = {make_document(3, "train", i).text for i in range(50)}
    assert len(others) >= 48  # the index matters
    assert make_document(4, "train", 7) != make_document(3, "train", 7)  # so does the seed


def test_every_answer_is_verbatim_in_its_document():
    for split in ("train", "heldout"):
        for q in questions(0, split, 300):
            assert all(answer in q.doc.text for answer in q.doc.facts.values()), q.doc.text
            assert q.doc.facts[q.attribute] == q.answer
            assert set(q.doc.facts) == set(KINDS[q.doc.kind].attributes)
            assert _name(q.doc.signature) in q.question  # the question names its subject
            assert not contains_answer(q.question, q)  # but does not give the answer away
            assert q.doc.split == split == split_of(q.doc.signature)
            assert q.answer.count(" ") <= 2 and "{" not in q.question + q.doc.text + q.doc.title


def test_heldout_entities_never_appear_in_training():
    train = {_name(make_document(0, "train", i).signature) for i in range(2000)}
    heldout = {_name(make_document(0, "heldout", i).signature) for i in range(2000)}
    assert not train & heldout
    assert len(train) > 1900 and len(heldout) > 1900  # few repeats


def test_heldout_share_is_about_a_tenth():
    rng = random.Random(0)
    share = sum(split_of(signature_of(invented_name(rng))) == "heldout" for _ in range(5000)) / 5000
    assert 0.08 < share < 0.12


def test_contains_answer():
    doc = make_document(0, "train", 0)
    q = EnglishQuestion("When?", "1872", doc, "year")
    assert contains_answer("It was founded in 1872.", q)
    assert contains_answer("1872", q) and contains_answer("  (1872) ", q)
    assert not contains_answer("It was founded in 18725.", q)
    assert not contains_answer("It was founded in 1873.", q)
    person = EnglishQuestion("Who?", "Ilsa Vemora", doc, "founder", ("Vemora",))
    assert contains_answer("The founder was ilsa   VEMORA!", person)
    assert contains_answer("Mr. Vemora, I think.", person)  # an alias
    assert not contains_answer("Ilsa Vemorath", person) and not contains_answer("Ilsa", person)
    number = make_question(0, "train", 0)
    assert contains_answer(f"The answer is {number.answer}.", number)


def test_distractors_are_other_entities_of_the_same_split():
    for split in ("train", "heldout"):
        for q in questions(2, split, 20):
            docs = distractors(q, 4, seed=5)
            names = [_name(d.signature) for d in docs]
            assert len(docs) == 4 and len(set(names)) == 4 and _name(q.doc.signature) not in names
            assert all(d.split == split == split_of(d.signature) for d in docs)
            assert distractors(q, 4, seed=5) == docs


def test_variety_of_kinds_phrasings_and_questions():
    docs = [make_document(0, "train", i) for i in range(200)]
    assert len(Counter(d.kind for d in docs)) >= 6
    skeletons: dict[str, set[str]] = {}
    for d in docs:
        skeleton = d.text.replace(d.title, "{title}")
        for attribute, answer in d.facts.items():
            skeleton = re.sub(rf"\b{re.escape(answer)}\b", "{" + attribute + "}", skeleton)
        skeletons.setdefault(d.kind, set()).add(
            re.sub(r"\b" + re.escape(_name(d.signature)) + r"\b", "{name}", skeleton)
        )
    assert all(len(s) >= 2 for s in skeletons.values()), skeletons
    asked: dict[tuple[str, str], set[str]] = {}
    for q in questions(0, "train", 300):
        asked.setdefault((q.doc.kind, q.attribute), set()).add(
            q.question.replace(q.doc.title, "{title}").replace(_name(q.doc.signature), "{name}")
        )
    assert sum(len(phrasings) >= 2 for phrasings in asked.values()) >= 5  # several attributes asked two ways
