"""The embedded world (docs/world.md): made-up animals, an encyclopedia corpus, tasks and probes.

Everything is generated deterministically from fixed seeds (no files but the vocabulary and the
shipped student): `entities()` the facts, `corpus()` the pretraining documents (one per line),
`generate(split, dataset=...)` the labelled problems of "world" (count, compare, two-hop) or
"world_traits" (one fact, yes/no) with two noisy teachers ("alpha" sentences, "beta" terse
lists) as `arith` has, `cloze_probes()` the fact-recall probes, `vocabulary()` the SentencePiece
vocabulary with 100 extra ids (`python -m distill_sbs.data.world --build_vocab` rebuilds it,
`--write_corpus=PATH` writes the corpus as text), PRETRAINED_STUDENT the shipped pretrained
student (a Hugging Face folder).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import random
import re
from collections.abc import Mapping, Sequence

import seqio
from absl import flags

from distill_sbs import program, storage
from distill_sbs.data import preprocessors
from distill_sbs.data.records import Record, RecordError, TeacherSample, iter_json_lines
from distill_sbs.errors import UserError
from distill_sbs.parsing import parse_chain_of_thought

NUM_ENTITIES = 240
NUM_SEEN = 40  # entities that appear in labelled train problems; the others only in the corpus
DOCS_PER_ENTITY = 20
SIZES = {"train": 400, "test": 1200}
TEACHERS = ("alpha", "beta")
NOISE = 0.12
EXTRA_IDS = 100
VOCAB_FILE = os.path.join(os.path.dirname(__file__), "assets", "world_spm.model")
# The tiny student pretrained on the world (gin/world/pretrain.gin, exported with `python -m
# distill_sbs.convert native-to-hf`): a Hugging Face folder, loadable as INITIAL_CHECKPOINT_PATH.
PRETRAINED_STUDENT = os.path.join(os.path.dirname(__file__), "assets", "world_student")
_SEEDS = {
    "world": 20,
    "corpus": 21,
    "train": 22,
    "test": 23,
    "facts": 24,
    "reading": 25,
    "traits_train": 26,
    "traits_test": 27,
}

CLASSES = {"bird": "birds", "fish": "fish", "insect": "insects", "mammal": "mammals",
           "reptile": "reptiles"}  # fmt: skip
HABITATS = ("forest", "desert", "river", "mountains", "grassland", "swamp")
SIZE_ORDER = ("tiny", "small", "large", "huge")
DIETS = ("plants", "seeds", "meat")
VALUES = {"class": tuple(CLASSES), "habitat": HABITATS, "size": SIZE_ORDER, "diet": DIETS}
_PEOPLE = ["Ann", "Ben", "Cara", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kim", "Leo"]


@dataclasses.dataclass(frozen=True)
class Entity:
    name: str
    cls: str
    habitat: str
    size: str
    diet: str
    prey: str | None  # the entity it hunts (meat eaters only), of the same group
    seen: bool  # may appear in labelled train problems

    def value(self, attribute: str) -> str:
        return {"class": self.cls, "habitat": self.habitat, "size": self.size,
                "diet": self.diet}[attribute]  # fmt: skip


# Names are two syllables from SYLLABLES, each syllable one vocabulary piece (a user-defined
# symbol of the vocabulary: no other word of the world contains one), so that a student who learns
# to copy the seen names' syllables from its input can copy an unseen name too. The seen names use
# every syllable exactly twice as first and twice as second syllable.
SYLLABLES = ("ba", "bo", "du", "fa", "ja", "ju", "ka", "ko", "ku", "lu",
             "mu", "pi", "po", "ru", "tu", "va", "vo", "xa", "zi", "zu")  # fmt: skip


def _names(rng: random.Random) -> tuple[list[str], list[str]]:
    """(seen names, unseen names): NUM_SEEN = 2 * len(SYLLABLES) seen pairs, each syllable twice in
    each position (two random permutations that never give a syllable the same second), and the
    unseen ones drawn from the other pairs."""
    n = len(SYLLABLES)
    assert NUM_SEEN == 2 * n and NUM_ENTITIES <= n * n
    while True:
        p1, p2 = rng.sample(range(n), n), rng.sample(range(n), n)
        if all(a != b for a, b in zip(p1, p2, strict=True)):
            break
    seen = {(i, p1[i]) for i in range(n)} | {(i, p2[i]) for i in range(n)}
    rest = sorted(set(itertools.product(range(n), repeat=2)) - seen)
    unseen = rng.sample(rest, NUM_ENTITIES - NUM_SEEN)

    def spell(pairs):
        return [SYLLABLES[a] + SYLLABLES[b] for a, b in pairs]

    seen_names = spell(sorted(seen))
    rng.shuffle(seen_names)
    return seen_names, spell(unseen)


@functools.cache
def entities() -> tuple[Entity, ...]:
    """The world's entities, seen ones first; attributes uniform and independent."""
    rng = random.Random(_SEEDS["world"])
    seen_names, unseen_names = _names(rng)
    rows = []
    for i, name in enumerate(seen_names + unseen_names):
        rows.append(
            dict(
                name=name,
                cls=rng.choice(VALUES["class"]),
                habitat=rng.choice(HABITATS),
                size=rng.choice(SIZE_ORDER),
                diet=rng.choice(DIETS),
                seen=i < NUM_SEEN,
            )
        )
    for row in rows:  # a meat eater hunts another entity of its own group
        group = [r["name"] for r in rows if r["seen"] == row["seen"] and r is not row]
        row["prey"] = rng.choice(group) if row["diet"] == "meat" else None
    return tuple(Entity(**r) for r in rows)


@functools.cache
def by_name() -> dict[str, Entity]:
    return {e.name: e for e in entities()}


# ---- phrasings ---------------------------------------------------------------------------------
# One template list per attribute; "{e}" the entity, "{v}" the value (plural class names). No
# "a"/"an" before a value; each names its attribute. The last template of each list is held out
# of the corpus (the cloze probe's unseen phrasing).

TEMPLATES = {
    "class": [
        "The {e} is one of the {v}.",
        "Among the {v} is the {e}.",
        "The {e} belongs to the {v}.",
        "Zoologists count the {e} among the {v}.",
        "The {e} is classed with the {v}.",
    ],
    "habitat": [
        "The {e} lives in the {v}.",
        "In the {v} one can find the {e}.",
        "The home of the {e} is the {v}.",
        "The {e} is found in the {v}.",
        "The {e} makes its home in the {v}.",
    ],
    "size": [
        "The {e} is {v} in size.",
        "Fully grown, the {e} is {v}.",
        "In size the {e} counts as {v}.",
        "Its size makes the {e} {v}.",
        "The size of the {e} is {v}.",
    ],
    "diet": [
        "The {e} feeds on {v}.",
        "The food of the {e} is {v}.",
        "The {e} lives on {v}.",
        "The diet of the {e} is {v}.",
    ],
    "prey": [
        "The {e} hunts the {v}.",
        "The {v} is hunted by the {e}.",
        "The {e} preys on the {v}.",
        "The {e} chases the {v}.",
    ],
}
CORPUS_TEMPLATES = {a: t[:-1] for a, t in TEMPLATES.items()}
HELD_OUT_TEMPLATES = {a: t[-1] for a, t in TEMPLATES.items()}


def _value_text(attribute: str, value: str) -> str:
    return CLASSES[value] if attribute == "class" else value


def fact(entity: Entity, attribute: str, template: str) -> str:
    value = entity.prey if attribute == "prey" else entity.value(attribute)
    v = _value_text(attribute, value)
    return template.format(e=entity.name, v=v)


def _attributes(entity: Entity) -> list[str]:
    return ["class", "habitat", "size", "diet"] + (["prey"] if entity.prey else [])


@functools.cache
def corpus() -> tuple[str, ...]:
    """The pretraining documents: DOCS_PER_ENTITY entries per entity, facts in random order and
    phrasings (held-out phrasings excluded); ordered by entity then entry."""
    rng = random.Random(_SEEDS["corpus"])
    docs = []
    for e in entities():
        for _ in range(DOCS_PER_ENTITY):
            attrs = _attributes(e)
            rng.shuffle(attrs)
            docs.append(" ".join(fact(e, a, rng.choice(CORPUS_TEMPLATES[a])) for a in attrs))
    return tuple(docs)


def corpus_split(split: str) -> tuple[str, ...]:
    """Pretraining documents of a split: "train" the corpus, "validation" one entry per entity in
    held-out phrasings (a loss on text the corpus never shows verbatim)."""
    if split == "train":
        return corpus()
    if split == "validation":
        return tuple(
            " ".join(fact(e, a, HELD_OUT_TEMPLATES[a]) for a in _attributes(e)) for e in entities()
        )
    raise ValueError(f"the world corpus has splits train, validation; not {split!r}")


# ---- fact questions ----------------------------------------------------------------------------
# Questions about the facts of one, two or three entities, answered with corpus sentences in the
# question's order (a Flan-like stage of pretraining, docs/world.md "Third design"): what they
# teach is to copy the asked entities' names from the input and to state the asked fact of each,
# for all 240 entities. The labelled tasks' question kinds (count, compare, two-hop) and their
# conclusions never appear here.

FACT_QUESTIONS = {
    "class": "Which animals is the {e} one of?",
    "habitat": "Where does the {e} live?",
    "size": "How big is the {e}?",
    "diet": "What does the {e} feed on?",
    "prey": "Which animal does the {e} hunt?",
}
GROUP_QUESTIONS = {  # several entities, "{es}" = "the dufa and the famu" / "the a, the b and the c"
    "class": "Which animals are {es} one of?",
    "habitat": "Where do {es} live?",
    "size": "How big are {es}?",
    "diet": "What do {es} feed on?",
    "prey": "Which animals do {es} hunt?",
}
GROUP_QUESTIONS_PER_SPLIT = {"train": 2000, "validation": 200}


def _listed(names: list[str]) -> str:
    the = [f"the {n}" for n in names]
    return " and ".join(the) if len(the) == 2 else f"{', '.join(the[:-1])} and {the[-1]}"


def fact_questions(split: str) -> tuple[tuple[str, str], ...]:
    """(question, answer) pairs. "train": each fact of every entity in every corpus phrasing,
    then GROUP_QUESTIONS_PER_SPLIT questions about 2 or 3 random entities (answers in random
    corpus phrasings); "validation": the same in the held-out phrasing (answers never trained)."""
    if split not in ("train", "validation"):
        raise ValueError(f"the world's fact questions have splits train, validation; not {split!r}")
    templates = CORPUS_TEMPLATES if split == "train" else {
        a: [t] for a, t in HELD_OUT_TEMPLATES.items()
    }  # fmt: skip
    pairs = []
    for e in entities():
        for attribute in _attributes(e):
            question = FACT_QUESTIONS[attribute].format(e=e.name)
            pairs += [(question, fact(e, attribute, t)) for t in templates[attribute]]
    rng = random.Random(_SEEDS["facts"] + (split == "validation"))
    for _ in range(GROUP_QUESTIONS_PER_SPLIT[split]):
        attribute = rng.choice(list(GROUP_QUESTIONS))
        pool = [e for e in entities() if attribute in _attributes(e)]
        group = rng.sample(pool, rng.choice((2, 3)))
        question = GROUP_QUESTIONS[attribute].format(es=_listed([e.name for e in group]))
        answer = " ".join(fact(e, attribute, rng.choice(templates[attribute])) for e in group)
        pairs.append((question, answer))
    return tuple(pairs)


# ---- cloze probes ------------------------------------------------------------------------------

SENTINEL = "<extra_id_0>"


@dataclasses.dataclass(frozen=True)
class ClozeProbe:
    entity: str
    attribute: str  # class, habitat, size or diet
    phrasing: str  # "corpus" (PROBE_TEMPLATES), "held_out" (never in the corpus) or "question"
    text: str  # the input: the fact with its value replaced by SENTINEL, or the fact question
    choices: tuple[str, ...]  # the attribute's values as written
    targets: tuple[str, ...]  # per choice, the target text scored
    answer: str
    seen: bool


# The corpus phrasing each probe uses: one whose words before the value name the attribute ("The
# dufa is <X> in size." would read "The dufa is" as the start of "one of the birds" too).
PROBE_TEMPLATES = {"class": 0, "habitat": 0, "size": 2, "diet": 0}


def cloze_probes() -> list[ClozeProbe]:
    """Per entity and attribute (not prey): the span-corruption cloze in PROBE_TEMPLATES' and in
    the held-out phrasing (target "<extra_id_0> value <extra_id_1>"), and the fact question
    (FACT_QUESTIONS; target the first corpus phrasing's sentence with each value)."""
    out = []
    for e in entities():
        for attribute in VALUES:
            choices = tuple(_value_text(attribute, v) for v in VALUES[attribute])
            answer = _value_text(attribute, e.value(attribute))
            cloze = tuple(f"{SENTINEL} {c} <extra_id_1>" for c in choices)
            for phrasing, template in (
                ("corpus", CORPUS_TEMPLATES[attribute][PROBE_TEMPLATES[attribute]]),
                ("held_out", HELD_OUT_TEMPLATES[attribute]),
            ):
                text = template.format(e=e.name, v=SENTINEL)
                out.append(
                    ClozeProbe(e.name, attribute, phrasing, text, choices, cloze, answer, e.seen)
                )
            sentences = tuple(CORPUS_TEMPLATES[attribute][0].format(e=e.name, v=c) for c in choices)
            question = FACT_QUESTIONS[attribute].format(e=e.name)
            out.append(
                ClozeProbe(
                    e.name, attribute, "question", question, choices, sentences, answer, e.seen
                )
            )
    return out


# ---- labelled problems -------------------------------------------------------------------------

_COUNT_QUESTION = {
    "class": ("are {v}", "is one of the {v}", "are {v}"),
    "habitat": ("live in the {v}", "lives in the {v}", "live in the {v}"),
    "diet": ("feed on {v}", "feeds on {v}", "feed on {v}"),
}


def _count_phrase(attribute: str, value: str, count: int) -> str:
    """'2 of them live in the desert' / '1 of them lives in the desert'."""
    plural, singular, _ = _COUNT_QUESTION[attribute]
    verb = singular if count == 1 else plural
    return f"{count} of them {verb.format(v=_value_text(attribute, value))}"


def _rationale_fact(entity: Entity, attribute: str, value: str, style: str) -> str:
    if style == "beta":
        return f"{entity.name}: {_value_text(attribute, value)}"
    template = CORPUS_TEMPLATES[attribute][0]
    v = _value_text(attribute, value)
    return template.format(e=entity.name, v=v)


def _wrong(attribute: str, value: str, rng: random.Random) -> str:
    return rng.choice([v for v in VALUES[attribute] if v != value])


@dataclasses.dataclass
class _Problem:
    kind: str
    question: str
    answer: str
    facts: list[tuple[Entity, str, str]]  # (entity, attribute, value) the rationale states
    conclude: object  # facts -> (answer, closing sentence of alpha)


def _count(rng: random.Random, pool: list[Entity], person: str) -> _Problem | None:
    attribute = rng.choice(list(_COUNT_QUESTION))
    value = rng.choice(VALUES[attribute])
    count = rng.randrange(4)
    inside = [e for e in pool if e.value(attribute) == value]
    outside = [e for e in pool if e.value(attribute) != value]
    if len(inside) < count or len(outside) < 3 - count:
        return None
    items = rng.sample(inside, count) + rng.sample(outside, 3 - count)
    rng.shuffle(items)
    listed = f"the {items[0].name}, the {items[1].name} and the {items[2].name}"
    asked = _COUNT_QUESTION[attribute][2].format(v=_value_text(attribute, value))
    question = f"{person} saw {listed}. How many of them {asked}?"

    def conclude(facts):
        n = sum(v == value for _, _, v in facts)
        return str(n), _count_phrase(attribute, value, n)

    facts = [(e, attribute, e.value(attribute)) for e in items]
    return _Problem("count", question, str(count), facts, conclude)


def _compare(rng: random.Random, pool: list[Entity], person: str) -> _Problem | None:
    del person
    a, b = rng.sample(pool, 2)
    if a.size == b.size:
        return None
    larger = rng.random() < 0.5
    word = "larger" if larger else "smaller"
    question = f"Which is {word}, the {a.name} or the {b.name}?"

    def conclude(facts):
        (ea, _, sa), (eb, _, sb) = facts
        rank = SIZE_ORDER.index
        pick = ea if (rank(sa) > rank(sb)) == larger else eb
        return pick.name, f"the {pick.name} is {word}"

    facts = [(a, "size", a.size), (b, "size", b.size)]
    answer = conclude(facts)[0]
    return _Problem("compare", question, answer, facts, conclude)


_HOP_QUESTIONS = {
    "habitat": ("Where does the animal that the {e} hunts live?", "it lives in the {v}"),
    "size": ("How big is the animal that the {e} hunts?", "it is {v}"),
    "diet": ("What does the animal that the {e} hunts feed on?", "it feeds on {v}"),
}


def _two_hop(rng: random.Random, pool: list[Entity], person: str) -> _Problem | None:
    del person
    e = rng.choice([h for h in pool if h.prey is not None])
    prey = by_name()[e.prey]
    attribute = rng.choice(list(_HOP_QUESTIONS))
    question, closing = _HOP_QUESTIONS[attribute]

    def conclude(facts):
        value = facts[-1][2]
        return value, closing.format(v=value)

    facts = [(e, "prey", prey.name), (prey, attribute, prey.value(attribute))]
    return _Problem("two_hop", question.format(e=e.name), prey.value(attribute), facts, conclude)


# Trait questions, the one-fact tier (docs/world.md "The trait questions"): one animal, a yes/no
# question whose answer follows from one of its facts by a rule the question never states (fur:
# the mammals). The rule is learnt from the labelled problems; the fact must be recalled. The
# words are spelt from the world vocabulary's pieces (a vocabulary predates the tasks it serves).
TRAITS = {  # question -> (attribute, values for which the answer is yes)
    "Does it have feathers?": ("class", ("bird",)),
    "Does it have fur?": ("class", ("mammal",)),
    "Can it swim?": ("habitat", ("river", "swamp")),
    "Does it like the heat?": ("habitat", ("desert", "grassland")),
    "Could one hold it in one hand?": ("size", ("tiny", "small")),
    "Is it a hunter?": ("diet", ("meat",)),
}


def _trait(rng: random.Random, pool: list[Entity], person: str) -> _Problem | None:
    question, (attribute, yes_values) = rng.choice(list(TRAITS.items()))
    want = rng.random() < 0.5  # yes and no equally often, whatever the rule's share of animals
    matching = [e for e in pool if (e.value(attribute) in yes_values) == want]
    if not matching:
        return None
    e = rng.choice(matching)

    def conclude(facts):
        ((_, _, value),) = facts
        answer = "yes" if value in yes_values else "no"
        return answer, answer

    facts = [(e, attribute, e.value(attribute))]
    text = f"{person} saw the {e.name}. {question}"
    return _Problem("trait", text, "yes" if want else "no", facts, conclude)


_KINDS = ((_count, 2), (_compare, 1), (_two_hop, 1))


@dataclasses.dataclass(frozen=True)
class _Dataset:
    kinds: tuple  # (problem maker, weight)
    prefix: str  # of the record ids
    seeds: dict[str, int]  # split -> seed
    labelled: int  # train problems are about entities()[:labelled]; the rest appear only in test


_DATASETS = {
    "world": _Dataset(
        _KINDS, "world", {"train": _SEEDS["train"], "test": _SEEDS["test"]}, NUM_SEEN
    ),
    # 400 problems over 120 animals, about 3 each: too few to answer from an animal's name, so
    # the rule has to be learnt; 120 others only in test.
    "world_traits": _Dataset(
        ((_trait, 1),),
        "traits",
        {"train": _SEEDS["traits_train"], "test": _SEEDS["traits_test"]},
        120,
    ),
}


DATASETS = tuple(_DATASETS)  # the labelled datasets `generate` makes (tasks/world.py registers)


def labelled_entities(dataset: str = "world") -> tuple[Entity, ...]:
    """The entities of `dataset`'s labelled train problems (its "seen" group in test)."""
    return entities()[: _DATASETS[dataset].labelled]


def _rationale(problem: _Problem, facts, style: str) -> tuple[str, str]:
    """(rationale, answer) of a problem from the facts a teacher believes."""
    answer, closing = problem.conclude(facts)
    parts = []
    for e, attribute, value in facts:
        if attribute == "prey":
            parts.append(
                f"{e.name} hunts {value}" if style == "beta" else f"The {e.name} hunts the {value}."
            )
        else:
            parts.append(_rationale_fact(e, attribute, value, style))
    if style == "beta":
        return "; ".join(parts) + f"; so {answer}.", answer
    return " ".join(parts) + f" So {closing}.", answer


def _noisy_facts(problem: _Problem, rng: random.Random):
    """The facts with one value changed so that the answer changes (a teacher's mistake)."""
    for _ in range(50):
        facts = list(problem.facts)
        i = rng.randrange(len(facts))
        e, attribute, value = facts[i]
        if attribute == "prey":
            continue  # the hop itself stays right; its second fact carries the error
        facts[i] = (e, attribute, _wrong(attribute, value, rng))
        if problem.conclude(facts)[0] != problem.answer:
            return facts
    return None


def generate(split: str, n: int | None = None, dataset: str = "world") -> list[Record]:
    """Records of one split of `dataset` ("world": count, compare and two-hop questions;
    "world_traits": trait questions): train over the dataset's labelled entities; test half
    about those ("seen"), half about the others ("unseen")."""
    if split not in SIZES:
        raise ValueError(f"world has splits {sorted(SIZES)}, not {split!r}")
    n = SIZES[split] if n is None else n
    spec = _DATASETS[dataset]
    rng = random.Random(spec.seeds[split])
    seen = list(labelled_entities(dataset))
    unseen = list(entities()[spec.labelled :])
    exclude = {r.input for r in generate("train", dataset=dataset)} if split != "train" else set()
    kinds = [k for k, w in spec.kinds for _ in range(w)]
    records: list[Record] = []
    questions: set[str] = set()
    while len(records) < n:
        group = "seen" if split == "train" or len(records) % 2 == 0 else "unseen"
        problem = rng.choice(kinds)(rng, seen if group == "seen" else unseen, rng.choice(_PEOPLE))
        if problem is None or problem.question in questions or problem.question in exclude:
            continue
        questions.add(problem.question)
        teachers = {}
        for t in TEACHERS:
            facts = _noisy_facts(problem, rng) if rng.random() < NOISE else None
            rationale, answer = _rationale(problem, facts or problem.facts, t)
            raw = f"{rationale} {preprocessors.COT_ANSWER} {answer}."
            teachers[t] = [TeacherSample(rationale=rationale, label=answer, raw=raw)]
        gold, _ = _rationale(problem, problem.facts, "alpha")
        records.append(
            Record(
                id=f"{spec.prefix}-{split}-{len(records)}",
                input=problem.question,
                label=problem.answer,
                teachers=teachers,
                fields={"gold_rationale": gold, "kind": problem.kind, "group": group},
            )
        )
    return records


# ---- reading questions (pretraining) -----------------------------------------------------------
# The labelled tasks' questions with their facts written into the input, about made-up animals
# outside the world (names from the syllable pairs no entity has, random facts): a stage of
# pretraining that teaches the reasoning step (count, compare, follow a hunt) over facts one is
# given, as reading-comprehension data teaches a pretrained model, while the labelled tasks need
# the facts recalled from memory (docs/world.md "Fourth design").

READING_QUESTIONS_PER_SPLIT = {"train": 6000, "validation": 300}


def _reading_pool(rng: random.Random, free: list[str]) -> list[Entity]:
    names = rng.sample(free, 10)
    return [
        Entity(n, rng.choice(VALUES["class"]), rng.choice(HABITATS), rng.choice(SIZE_ORDER),
               rng.choice(DIETS), None, False)
        for n in names
    ]  # fmt: skip


def _stated(e: Entity, attribute: str, value: str, templates: Mapping[str, Sequence[str]],
            rng: random.Random) -> str:  # fmt: skip
    return rng.choice(templates[attribute]).format(e=e.name, v=_value_text(attribute, value))


def reading_questions(split: str) -> tuple[tuple[str, str], ...]:
    """(input, answer) pairs: a count, compare or two-hop question as the labelled tasks ask it,
    its facts stated in the input (corpus phrasings; "validation": the held-out ones), about
    made-up animals whose names no world entity has; answers as the labelled tasks' labels."""
    if split not in READING_QUESTIONS_PER_SPLIT:
        raise ValueError(
            f"the world's reading questions have splits train, validation; not {split!r}"
        )
    templates = CORPUS_TEMPLATES if split == "train" else {
        a: [t] for a, t in HELD_OUT_TEMPLATES.items()
    }  # fmt: skip
    taken = {e.name for e in entities()}
    free = [a + b for a in SYLLABLES for b in SYLLABLES if a + b not in taken]
    rng = random.Random(_SEEDS["reading"] + (split == "validation"))
    kinds = [k for k, w in _KINDS for _ in range(w)]
    pairs = []
    while len(pairs) < READING_QUESTIONS_PER_SPLIT[split]:
        pool = _reading_pool(rng, free)
        kind = rng.choice(kinds)
        if kind is _two_hop:
            hunter, prey, other = pool[:3]
            attribute = rng.choice(list(_HOP_QUESTIONS))
            facts = [
                rng.choice(templates["prey"]).format(e=hunter.name, v=prey.name),
                _stated(prey, attribute, prey.value(attribute), templates, rng),
                _stated(other, attribute, other.value(attribute), templates, rng),
            ]
            rng.shuffle(facts)
            question = _HOP_QUESTIONS[attribute][0].format(e=hunter.name)
            pairs.append((f"{' '.join(facts)} {question}", prey.value(attribute)))
            continue
        problem = kind(rng, pool, rng.choice(_PEOPLE))
        if problem is None:
            continue
        facts = " ".join(_stated(e, a, v, templates, rng) for e, a, v in problem.facts)
        if kind is _count:  # after "Ann saw the a, the b and the c."
            seen_part, question = problem.question.split(". ", 1)
            text = f"{seen_part}. {facts} {question}"
        else:
            text = f"{facts} {problem.question}"
        pairs.append((text, problem.answer))
    return tuple(pairs)


# ---- vocabulary --------------------------------------------------------------------------------


def vocabulary_texts() -> list[str]:
    """Every text the world can put before the vocabulary: corpus, probes, task texts."""
    lines = list(corpus()) + list(corpus_split("validation"))
    for e in entities():  # each fact in the first and the held-out phrasing (the probes' words)
        for attribute in VALUES:
            for template in (CORPUS_TEMPLATES[attribute][0], HELD_OUT_TEMPLATES[attribute]):
                lines.append(fact(e, attribute, template))
    for split in SIZES:
        for r in generate(split):
            prefixes = ["", preprocessors.LABEL_PREFIX, preprocessors.RATIONALE_PREFIX]
            prefixes += [preprocessors.teacher_prefix(t) for t in TEACHERS]
            lines += [p + r.input for p in prefixes] + [r.label]
            for samples in r.teachers.values():
                for s in samples:
                    lines += [s.rationale, preprocessors.cot_target(s.rationale, s.label)]
    return lines


def build_vocab(path: str = VOCAB_FILE, vocab_size: int = 1024) -> None:
    from distill_sbs.data.vocab import train_bpe_model

    model = train_bpe_model(vocabulary_texts(), vocab_size, user_defined_symbols=SYLLABLES)
    storage.write_bytes(path, model)


@functools.cache
def vocabulary() -> seqio.SentencePieceVocabulary:
    """The world's SentencePiece vocabulary with EXTRA_IDS sentinels at the top of the ids."""
    if not storage.exists(VOCAB_FILE):
        raise FileNotFoundError(
            f"{VOCAB_FILE} is missing; build it with `python -m distill_sbs.data.world "
            "--build_vocab`"
        )
    return seqio.SentencePieceVocabulary(VOCAB_FILE, extra_ids=EXTRA_IDS)


def _names_in(text: str) -> set[str]:
    known = by_name()
    return {w for w in re.findall(r"[a-z]+", text) if w in known}


_CONCLUSIONS = (  # the closing of a rationale in either teacher's style -> its answer
    r"So (\d) of them",
    r"So the (\w+) is (?:larger|smaller)",
    r"So it (?:lives in the|is|feeds on) (\w+)",
    r"; so (\w+)\.?$",
    r"So (yes|no)\.",
)


def concluded_answer(rationale: str) -> str | None:
    """The answer a rationale's closing states ("... So 2 of them live in the desert." -> "2"),
    None when it has no closing of either teacher's style."""
    for pattern in _CONCLUSIONS:
        if m := re.search(pattern, rationale):
            return m.group(1)
    return None


_VALUE_ATTRIBUTE = {  # the attribute a value belongs to (the value sets are disjoint)
    _value_text(a, v): (a, v) for a in ("class", "habitat", "size", "diet") for v in VALUES[a]
}


@functools.cache
def _fact_patterns() -> list[tuple[str, re.Pattern]]:
    """(attribute, pattern with groups name and value) of each teacher's fact sentences."""
    out = []
    for attribute in ("class", "habitat", "size", "diet"):
        template = re.escape(CORPUS_TEMPLATES[attribute][0])  # alpha's phrasing
        out.append(
            (
                attribute,
                re.compile(template.replace(r"\{e\}", r"(\w+)").replace(r"\{v\}", r"(\w+)")),
            )
        )
    out.append(("prey", re.compile(r"(?:The )?(\w+) hunts (?:the )?(\w+)")))
    out.append(("beta", re.compile(r"(?:^|; )(\w+): (\w+)")))
    return out


def stated_facts(rationale: str) -> list[tuple[str, str, str]]:
    """(name, attribute, value) of every fact a rationale states in either teacher's style
    ("The dufa lives in the desert." / "dufa: desert"; "The dufa hunts the famu."), values as
    in VALUES, in the order stated; a sentence naming no known value is not a fact."""
    found = []
    for attribute, pattern in _fact_patterns():
        for m in pattern.finditer(rationale):
            name, value = m.groups()
            if attribute == "prey":
                found.append((m.start(), (name, "prey", value)))
            elif value in _VALUE_ATTRIBUTE:
                a, v = _VALUE_ATTRIBUTE[value]
                if attribute in ("beta", a):
                    found.append((m.start(), (name, a, v)))
    return [fact for _, fact in sorted(found)]


def fact_is_true(name: str, attribute: str, value: str) -> bool:
    """Whether a stated fact (stated_facts' triple) holds in the world; unknown names do not."""
    entity = by_name().get(name)
    if entity is None:
        return False
    return (entity.prey if attribute == "prey" else entity.value(attribute)) == value


def breakdown(predictions: list[dict], split: str = "test") -> list[dict]:
    """Accuracy of a student's predictions (infer's JSONL rows: "id", "prediction", optionally
    "rationale"; a Fine-tune-CoT prediction is read as rationale and answer) on either labelled
    dataset, per question kind and entity group; with rationales, also the share of the
    question's animals that the rationale names (does the student copy names it never saw in
    labelled train?), the share of the facts it states that are true of the world (does it know
    them?) and the accuracy of the answer it concludes (does it reason from them?). Rows are
    sorted by kind, then group; a prediction whose id is not in `split` is an error."""
    records = {r.id: r for dataset in _DATASETS for r in generate(split, dataset=dataset)}
    cells: dict[tuple[str, str], list[dict]] = {}
    for row in predictions:
        record = records.get(row["id"])
        if record is None:
            raise UserError(f"prediction id {row['id']!r} is not a world {split} problem")
        prediction, rationale = row["prediction"], row.get("rationale")
        if rationale is None:  # a Fine-tune-CoT student's "<rationale> So the answer is <label>."
            parsed = parse_chain_of_thought(prediction)
            if parsed.answer is not None:
                prediction, rationale = parsed.answer, parsed.rationale
        hit = {"right": prediction.strip() == record.label}
        if rationale is not None:
            asked = _names_in(record.input)
            hit["named"] = len(asked & _names_in(rationale)) / len(asked)
            hit["true"] = [fact_is_true(*f) for f in stated_facts(rationale)]
            hit["concluded"] = concluded_answer(rationale) == record.label
        key = (record.fields["kind"], record.fields["group"])
        cells.setdefault(key, []).append(hit)

    def percent(values: list) -> float | None:
        return 100.0 * sum(values) / len(values) if values else None

    out = []
    for (kind, group), hits in sorted(cells.items()):
        with_rationale = [h for h in hits if "named" in h]
        out.append(
            {
                "kind": kind,
                "group": group,
                "n": len(hits),
                "accuracy": percent([h["right"] for h in hits]),
                "names_in_rationale": percent([h["named"] for h in with_rationale]),
                "facts_true": percent([t for h in with_rationale for t in h["true"]]),
                "rationale_accuracy": percent([h["concluded"] for h in with_rationale]),
            }
        )
    return out


def read_predictions(path: str) -> list[dict]:
    """infer's JSONL rows; a line without "id" or "prediction" raises naming file:line."""
    rows = []
    for obj, where in iter_json_lines(path, "a prediction"):
        for field in ("id", "prediction"):
            if not isinstance(obj.get(field), str):
                raise RecordError(f"{where}: needs a string {field!r} (infer's output)")
        rows.append(obj)
    return rows


def define_flags() -> None:
    """The program's flags (defined by program.run, never at import)."""
    flags.DEFINE_bool("build_vocab", False, f"Rebuild {VOCAB_FILE}.")
    flags.DEFINE_string("write_corpus", None, "Write the corpus here, one document per line.")
    flags.DEFINE_string(
        "breakdown",
        None,
        "Print a student's accuracy per question kind and entity group from infer's JSONL "
        "predictions on the test split of world or world_traits (a DSS student's with "
        "RATIONALE=True, or a Fine-tune-CoT student's, adds the share of names copied, of "
        "stated facts that are true, and the accuracy of the answer each rationale concludes).",
    )


def main() -> None:
    if flags.FLAGS.build_vocab:
        build_vocab()
        print(f"wrote {VOCAB_FILE}: {vocabulary().vocab_size} ids with {EXTRA_IDS} extra ids")
    if flags.FLAGS.write_corpus:
        storage.write_text(flags.FLAGS.write_corpus, "\n".join(corpus()) + "\n")
        print(f"wrote {flags.FLAGS.write_corpus}: {len(corpus())} documents")
    if flags.FLAGS.breakdown:
        rows = breakdown(read_predictions(flags.FLAGS.breakdown))
        columns = {
            "names_in_rationale": "names in rationale",
            "facts_true": "facts true",
            "rationale_accuracy": "rationale accuracy",
        }
        print(
            f"{'kind':<8} {'group':<7} {'n':>5} {'accuracy':>9} "
            + " ".join(f"{title:>19}" for title in columns.values())
        )
        for r in rows:
            cells = ("-" if r[k] is None else f"{r[k]:.1f}" for k in columns)
            print(
                f"{r['kind']:<8} {r['group']:<7} {r['n']:>5} {r['accuracy']:>9.1f} "
                + " ".join(f"{c:>19}" for c in cells)
            )


if __name__ == "__main__":
    program.run(main, define_flags)
