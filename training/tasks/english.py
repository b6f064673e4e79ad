"""Short English documents about invented things, each with questions whose exact answer is in the document.

A language model cannot know the answers without reading the document (invented names, years, numbers), which
is what a text RAG vs no retrieval vs xRAG comparison needs, and the varied phrasings make it training text for
an xRAG projector. Every document is a pure function of ``(seed, split, index)``; the split is defined on the
entity's name (hashed with :func:`split_of`, buckets 0-9 held out), so a held-out entity never appears as the
subject of a training document, however many are drawn.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field

from mmrag.training.tasks.families import Split, split_of

__all__ = [
    "KINDS",
    "EnglishDoc",
    "EnglishQuestion",
    "attribute_questions",
    "contains_answer",
    "distractors",
    "invented_name",
    "make_document",
    "make_question",
    "questions",
    "signature_of",
]


@dataclass(frozen=True)
class EnglishDoc:
    """One document; ``facts`` maps each attribute to its answer exactly as the text writes it."""

    title: str
    text: str
    facts: dict[str, str]
    signature: str
    split: Split
    kind: str


@dataclass(frozen=True)
class EnglishQuestion:
    """One question about ``doc``; ``aliases`` are other answers that count as right (a surname, ``4,310``)."""

    question: str
    answer: str
    doc: EnglishDoc
    attribute: str
    aliases: tuple[str, ...] = field(default=())


# -- invented values -----------------------------------------------------------------------------

_ONSETS = ("b", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z")
_ONSETS += ("br", "ch", "dr", "gr", "kl", "sh", "st", "th", "tr")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("l", "m", "n", "r", "s")
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_COLOURS = ("amber", "crimson", "teal", "ivory", "violet", "olive", "silver", "indigo", "copper", "scarlet")


def invented_name(rng: random.Random, syllables: int | None = None) -> str:
    """A capitalised made-up word such as ``Velmora``: millions of them, so names rarely repeat."""
    return "".join(_syllable(rng) for _ in range(syllables or rng.choice((2, 3, 3)))).capitalize()


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + (rng.choice(_CODAS) if rng.random() < 0.35 else "")


def _person(rng: random.Random) -> str:
    return f"{invented_name(rng, 2)} {invented_name(rng)}"


def _year(rng: random.Random) -> str:
    return str(rng.randint(1500, 1999))


def _between(low: int, high: int) -> Callable[[random.Random], str]:
    return lambda rng: str(rng.randint(low, high))


def _branded(*nouns: str) -> Callable[[random.Random], str]:
    """An invented name and a common noun (``Tarvin clocks``): the noun alone is guessable, the name is not."""
    return lambda rng: f"{invented_name(rng)} {rng.choice(nouns)}"


def _one_of(options: tuple[str, ...]) -> Callable[[random.Random], str]:
    return lambda rng: rng.choice(options)


def _surname(answer: str) -> tuple[str, ...]:
    return (answer.split()[-1],)


def _brand(answer: str) -> tuple[str, ...]:
    return (answer.split()[0],)


def _grouped(answer: str) -> tuple[str, ...]:
    return (f"{int(answer):,}",) if int(answer) >= 1000 else ()


def _none(answer: str) -> tuple[str, ...]:
    return ()


# -- kinds ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Attribute:
    draw: Callable[[random.Random], str]
    questions: tuple[str, ...]  # templates over the title, name and facts
    aliases: Callable[[str], tuple[str, ...]] = _none


@dataclass(frozen=True)
class _Kind:
    titles: tuple[str, ...]  # templates over {name} and an invented {first} name; {subject} is the title mid-sentence
    texts: tuple[str, ...]  # phrasings of the same facts, for variety in training
    attributes: dict[str, _Attribute]


KINDS: dict[str, _Kind] = {
    "town": _Kind(
        ("{name}",),
        (
            "{name} is a small town on the banks of the {river} river. It was founded in {year} by {founder}. "
            "Today about {population} people live there.",
            "Founded by {founder} in {year}, {name} lies where the {river} river bends. "
            "The town has a population of {population}.",
            "{founder} founded the town of {name} in {year}. The {river} river runs through its centre, "
            "and {population} people call it home.",
        ),
        {
            "founder": _Attribute(
                _person, ("Who founded the town of {name}?", "Who was the founder of {name}?"), _surname
            ),
            "year": _Attribute(_year, ("In what year was {name} founded?", "When was the town of {name} founded?")),
            "river": _Attribute(invented_name, ("Which river flows through {name}?", "On what river does {name} lie?")),
            "population": _Attribute(_between(200, 90000), ("What is the population of {name}?",), _grouped),
        },
    ),
    "inventor": _Kind(
        ("{first} {name}",),
        (
            "{title} was an inventor born in {birthplace}. In {year}, {name} built the first {invention}.",
            "Born in the village of {birthplace}, {title} is remembered as the inventor of the {invention}. "
            "{name} completed it in {year}.",
            "The {invention} was invented in {year} by {title}, who was born in {birthplace}.",
        ),
        {
            "birthplace": _Attribute(invented_name, ("Where was {title} born?", "In which village was {title} born?")),
            "invention": _Attribute(
                _branded("lamp", "loom", "engine", "compass", "telescope", "pump", "press"),
                ("What did {title} invent?", "Which device is {title} known for inventing?"),
                _brand,
            ),
            "year": _Attribute(_year, ("In what year did {title} build the {invention}?",)),
        },
    ),
    "ship": _Kind(
        ("The {name}",),
        (
            "The {name} was a sailing ship commanded by Captain {captain}. It set sail in {year} for the island "
            "of {destination} with a crew of {crew}.",
            "In {year}, Captain {captain} took the {name} to the island of {destination}. "
            "There were {crew} sailors aboard.",
        ),
        {
            "captain": _Attribute(
                _person, ("Who was the captain of the {name}?", "Who commanded the ship {name}?"), _surname
            ),
            "year": _Attribute(_year, ("In what year did the {name} set sail?",)),
            "destination": _Attribute(invented_name, ("To which island did the {name} sail?",)),
            "crew": _Attribute(_between(12, 400), ("How many sailors were aboard the {name}?",)),
        },
    ),
    "festival": _Kind(
        ("The {name} Festival",),
        (
            "The {name} Festival is held every {month} in the town of {place}. It honours the poet {poet} "
            "and was first held in {year}.",
            "Every year in {month}, the town of {place} hosts the {name} Festival. The festival, first held in "
            "{year}, celebrates the life of the poet {poet}.",
        ),
        {
            "place": _Attribute(invented_name, ("In which town is the {name} Festival held?",)),
            "month": _Attribute(_one_of(_MONTHS), ("In what month is the {name} Festival held?",)),
            "poet": _Attribute(_person, ("Which poet does the {name} Festival honour?",), _surname),
            "year": _Attribute(_year, ("When was the {name} Festival first held?",)),
        },
    ),
    "company": _Kind(
        ("The {name} Company",),
        (
            "The {name} Company was founded by {founder} in {year}. It is headquartered in {city} and makes {product}.",
            "{founder} started the {name} Company in {year}. From its headquarters in {city}, "
            "the company makes {product}.",
        ),
        {
            "founder": _Attribute(_person, ("Who founded the {name} Company?",), _surname),
            "year": _Attribute(_year, ("In what year was the {name} Company founded?",)),
            "city": _Attribute(
                invented_name,
                ("Where is the {name} Company headquartered?", "In which city is the {name} Company based?"),
            ),
            "product": _Attribute(
                _branded("clocks", "bicycles", "radios", "typewriters", "lanterns", "pianos"),
                ("What does the {name} Company make?",),
                _brand,
            ),
        },
    ),
    "species": _Kind(
        ("The {name} beetle", "The {name} frog", "The {name} moth", "The {name} finch"),
        (
            "{title} lives only in the {habitat}. It is {colour} and feeds on {food}. "
            "It was first described by {discoverer}.",
            "First described by {discoverer}, {subject} is a small {colour} animal found in the {habitat}. "
            "Its diet consists mostly of {food}.",
        ),
        {
            "habitat": _Attribute(
                _branded("marshes", "hills", "forest", "valley"), ("Where does {subject} live?",), _brand
            ),
            "colour": _Attribute(_one_of(_COLOURS), ("What colour is {subject}?",)),
            "food": _Attribute(_branded("berries", "seeds", "leaves"), ("What does {subject} eat?",), _brand),
            "discoverer": _Attribute(_person, ("Who first described {subject}?",), _surname),
        },
    ),
    "mountain": _Kind(
        ("Mount {name}",),
        (
            "Mount {name} rises to {height} metres in the {region} region. It was first climbed in {year} "
            "by {climber}.",
            "In {year}, {climber} became the first person to reach the top of Mount {name}. The mountain, "
            "{height} metres high, stands in the {region} region.",
        ),
        {
            "height": _Attribute(
                _between(2000, 8800),
                ("How high is Mount {name} in metres?", "What is the height of Mount {name} in metres?"),
                _grouped,
            ),
            "region": _Attribute(invented_name, ("In which region is Mount {name}?",)),
            "year": _Attribute(_year, ("In what year was Mount {name} first climbed?",)),
            "climber": _Attribute(_person, ("Who first climbed Mount {name}?",), _surname),
        },
    ),
    "book": _Kind(
        ("The {name} Letters", "The Last Days of {name}", "A Winter in {name}"),
        (
            "{title} is a novel by {author}, published in {year}. It is set in the town of {setting} and "
            "follows a young clockmaker named {hero}.",
            "{author} wrote {title} in {year}. The story takes place in {setting}, where its hero, {hero}, grows up.",
        ),
        {
            "author": _Attribute(_person, ("Who wrote {title}?", "Who is the author of {title}?"), _surname),
            "year": _Attribute(_year, ("In what year was {title} published?",)),
            "setting": _Attribute(invented_name, ("In which town is {title} set?",)),
            "hero": _Attribute(invented_name, ("What is the name of the main character of {title}?",)),
        },
    ),
}


# -- documents and questions ---------------------------------------------------------------------


def signature_of(name: str) -> str:
    """The split is decided by the subject's name alone, whatever kind of thing it names."""
    return f"english|{name}"


def _name_of(doc: EnglishDoc) -> str:
    return doc.signature.split("|", 1)[1]


def _names(name: str, title: str) -> dict[str, str]:
    """Template fields for the subject: ``The Kavo moth`` starts a sentence, ``the Kavo moth`` goes inside one."""
    return {"name": name, "title": title, "subject": "the" + title[3:] if title.startswith("The ") else title}


def _draw_document(rng: random.Random, split: Split, avoid: frozenset[str] = frozenset()) -> EnglishDoc:
    while (name := invented_name(rng)) in avoid or split_of(signature_of(name)) != split:
        pass
    kind_name = rng.choice(list(KINDS))
    kind = KINDS[kind_name]
    facts = {attribute: spec.draw(rng) for attribute, spec in kind.attributes.items()}
    title = rng.choice(kind.titles).format(name=name, first=invented_name(rng, 2))
    text = rng.choice(kind.texts).format(**_names(name, title), **facts)
    return EnglishDoc(title, text, facts, signature_of(name), split, kind_name)


def make_document(seed: int, split: Split, index: int) -> EnglishDoc:
    """The ``index``-th document of ``split``; same arguments, same document."""
    return _draw_document(random.Random(f"{seed}:english:{split}:{index}"), split)


def make_question(seed: int, split: Split, index: int) -> EnglishQuestion:
    """One attribute question about :func:`make_document`'s document for the same arguments."""
    doc = make_document(seed, split, index)
    rng = random.Random(f"{seed}:english-question:{split}:{index}")
    attribute = rng.choice(list(doc.facts))
    spec = KINDS[doc.kind].attributes[attribute]
    question = rng.choice(spec.questions).format(**_names(_name_of(doc), doc.title), **doc.facts)
    answer = doc.facts[attribute]
    return EnglishQuestion(question, answer, doc, attribute, spec.aliases(answer))


def attribute_questions(doc: EnglishDoc, seed: int) -> list[EnglishQuestion]:
    """One question per attribute of ``doc`` (a phrasing drawn per attribute): follow-ups for training."""
    rng = random.Random(f"{seed}:english-attributes:{doc.signature}")
    spec = KINDS[doc.kind].attributes
    return [
        EnglishQuestion(
            rng.choice(spec[a].questions).format(**_names(_name_of(doc), doc.title), **doc.facts),
            answer,
            doc,
            a,
            spec[a].aliases(answer),
        )
        for a, answer in doc.facts.items()
    ]


def questions(seed: int, split: Split, count: int) -> list[EnglishQuestion]:
    return [make_question(seed, split, index) for index in range(count)]


def distractors(question: EnglishQuestion, count: int, seed: int) -> list[EnglishDoc]:
    """``count`` documents about other entities of the question's split, for multi-document prompts."""
    rng = random.Random(f"{seed}:english-distractors:{question.doc.signature}:{question.question}")
    taken = {_name_of(question.doc)}
    docs = []
    for _ in range(count):
        docs.append(_draw_document(rng, question.doc.split, frozenset(taken)))
        taken.add(_name_of(docs[-1]))
    return docs


def _normalise(text: str) -> str:
    return " ".join(text.split()).strip(string.punctuation + " ").lower()


def contains_answer(output: str, question: EnglishQuestion) -> bool:
    """Whether ``output`` contains the answer or an alias as whole words (case, spacing and the punctuation
    around it ignored): ``1872`` counts in "In 1872." but not in "18725", ``Ilsa`` not in "Ilsabet"."""
    said = " ".join(output.split()).lower()
    for answer in (question.answer, *question.aliases):
        wanted = _normalise(answer)
        if wanted and re.search(rf"(?<!\w){re.escape(wanted)}(?!\w)", said):
            return True
    return False
