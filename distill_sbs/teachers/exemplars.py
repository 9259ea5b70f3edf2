"""Few-shot chain-of-thought exemplars for the built-in datasets, and user exemplar files.

Inputs follow each dataset's input format (distill_sbs.data.dss / arith), so that a prompt's
exemplars look like the question that follows them. Answers are written as the data layer's
labels are (a choice's text for cqa, an equation for svamp, an NLI class for esnli/anli1, a number
for arith). A user file is JSONL, one {"input": ..., "rationale": ..., "answer": ...} per line.
"""

from __future__ import annotations

import dataclasses

from distill_sbs import storage


@dataclasses.dataclass(frozen=True)
class Exemplar:
    input: str
    rationale: str
    answer: str


def _cqa(question: str, choices: list[str], rationale: str, answer: str) -> Exemplar:
    lines = [f"({chr(ord('a') + i)}) {c}" for i, c in enumerate(choices)]
    return Exemplar(f"{question}\nAnswer Choices:\n" + "\n".join(lines), rationale, answer)


def _nli(premise: str, hypothesis: str, rationale: str, answer: str) -> Exemplar:
    return Exemplar(f"premise: {premise} hypothesis: {hypothesis}", rationale, answer)


_NLI = [
    _nli(
        "A woman in a red coat is walking a dog through the snow.",
        "A woman is outside in winter weather.",
        "Walking through snow means being outside where it is cold and snowy.",
        "entailment",
    ),
    _nli(
        "Two boys kick a ball on a dirt field.",
        "The boys are on the same soccer team.",
        "Kicking a ball together does not tell us whether they belong to one team.",
        "neutral",
    ),
    _nli(
        "A chef is slicing onions in a busy kitchen.",
        "The chef is asleep at home.",
        "Someone slicing onions in a kitchen is awake and working, not asleep at home.",
        "contradiction",
    ),
    _nli(
        "An old man sits on a bench reading a newspaper.",
        "A man is reading.",
        "An old man reading a newspaper is a man who is reading.",
        "entailment",
    ),
]

BUILTIN: dict[str, list[Exemplar]] = {
    "cqa": [
        _cqa(
            "Where would you keep milk so that it stays cold?",
            ["cupboard", "refrigerator", "oven", "garden", "shelf"],
            "Milk stays cold only in a place that is cooled. A refrigerator cools the food "
            "kept inside it.",
            "refrigerator",
        ),
        _cqa(
            "What do people usually do when they feel tired at night?",
            ["run", "sing", "sleep", "cook", "shop"],
            "Being tired at night is the body asking for rest, and people rest at night by "
            "sleeping.",
            "sleep",
        ),
        _cqa(
            "A person who wants to learn about the past might visit a what?",
            ["museum", "airport", "gym", "bakery", "parking lot"],
            "Museums display old objects and explain history, which is learning about the past.",
            "museum",
        ),
        _cqa(
            "What is a common reason to use an umbrella?",
            ["rain", "hunger", "music", "darkness", "boredom"],
            "An umbrella keeps water off a person, and water falls from the sky as rain.",
            "rain",
        ),
    ],
    "svamp": [
        Exemplar(
            "Tom had 12 marbles. He gave 5 marbles to his sister.\nHow many marbles does Tom "
            "have now?",
            "Tom started with 12 marbles and gave away 5, so we subtract 5 from 12.",
            "( 12.0 - 5.0 )",
        ),
        Exemplar(
            "A baker puts 6 muffins in each box. She fills 4 boxes.\nHow many muffins did she "
            "put in boxes?",
            "Each of the 4 boxes holds 6 muffins, so we multiply 6 by 4.",
            "( 6.0 * 4.0 )",
        ),
        Exemplar(
            "There are 30 students who will sit in equal groups of 5.\nHow many groups are there?",
            "Splitting 30 students into groups of 5 means dividing 30 by 5.",
            "( 30.0 / 5.0 )",
        ),
        Exemplar(
            "Lily read 8 pages on Monday and 11 pages on Tuesday.\nHow many pages did she read "
            "in total?",
            "The total is the pages of both days added together, 8 plus 11.",
            "( 8.0 + 11.0 )",
        ),
    ],
    "esnli": _NLI,
    "anli1": _NLI,
    "arith": [
        Exemplar(
            "Ann saw a heron, a trout and an owl. How many birds did Ann see?",
            "The heron and the owl are birds. The trout is a fish. So 2 of them are birds.",
            "2",
        ),
        Exemplar(
            "Leo saw a bee, a wolf and a carp. How many mammals did Leo see?",
            "The wolf is a mammal. The bee is an insect. The carp is a fish. So 1 of them is a "
            "mammal.",
            "1",
        ),
        Exemplar(
            "Kim saw a moth, a swan and a goat. How many fish did Kim see?",
            "The swan is a bird. The moth is an insect. The goat is a mammal. So 0 of them are "
            "fish.",
            "0",
        ),
    ],
}


def load_exemplars(path: str) -> list[Exemplar]:
    """Reads a JSONL exemplar file; a bad line raises ValueError naming file:line and field."""
    from distill_sbs.data.records import iter_json_lines

    out = []
    for d, where in iter_json_lines(path, "an exemplar"):
        for field in ("input", "rationale", "answer"):
            if not isinstance(d.get(field), str) or not d[field].strip():
                raise ValueError(f"{where}: field {field!r} must be a non-empty string")
        out.append(Exemplar(d["input"], d["rationale"], d["answer"]))
    if not out:
        raise ValueError(f"{path}: no exemplars")
    return out


def get_exemplars(name_or_path: str) -> list[Exemplar]:
    """Built-in exemplars of a dataset (cqa, svamp, esnli, anli1, arith) or a JSONL file's."""
    if name_or_path in BUILTIN:
        return list(BUILTIN[name_or_path])
    if storage.exists(name_or_path):
        return load_exemplars(name_or_path)
    raise ValueError(
        f"exemplars {name_or_path!r}: neither a built-in set ({sorted(BUILTIN)}) nor a file"
    )
