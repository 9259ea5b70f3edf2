"""Text rules shared by data, metrics and teachers: chain-of-thought outputs into a rationale and
an answer, and answers into choices. It imports nothing from the project, so every layer can use it.

Few-shot prompted models such as PaLM write the rationale, then "So the answer is (c) x." or
"The answer is (84 / 2).", and then often go on to write the next few-shot exemplar
("\\n\\nQ: ...", "\\nQuestion: ...", "Premise: ..."), which must be cut off before parsing.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

# Where a model starts writing the next exemplar: a new line that opens a question/premise.
_NEXT_EXEMPLAR = re.compile(r"\n\s*(?:Q|Question|Premise|Input|Context)\s*:")
# The answer marker; the last one in the (cut) text wins so that "the answer is" inside a
# rationale sentence is not mistaken for the final answer when a later marker exists.
_ANSWER_MARKER = re.compile(r"(?:[Ss]o,? )?[Tt]he (?:final )?answer is:?|\bAnswer:")
_CHOICE_PREFIX = re.compile(r"^\(?([a-zA-Z])\)\s*")
_WS = re.compile(r"\s+")


@dataclasses.dataclass(frozen=True)
class ParsedOutput:
    rationale: str  # the text before the answer marker, stripped ("" if none)
    answer: str | None  # None when no answer could be found (a parse failure)
    raw: str  # the output as given


def cut_next_exemplar(text: str) -> str:
    """The output up to the next few-shot exemplar the model went on to write."""
    m = _NEXT_EXEMPLAR.search(text)
    return text[: m.start()] if m else text


def parse_chain_of_thought(text: str) -> ParsedOutput:
    """Splits an LLM output into (rationale, answer); answer None when no answer is found."""
    body = cut_next_exemplar(text).strip()
    markers = list(_ANSWER_MARKER.finditer(body))
    if not markers:
        return ParsedOutput(rationale=body, answer=None, raw=text)
    m = markers[-1]
    rationale = body[: m.start()].strip()
    answer = body[m.end() :].strip()
    # The answer ends at the end of its line; a trailing period closes the sentence.
    answer = answer.split("\n", 1)[0].strip()
    if answer.endswith("."):
        answer = answer[:-1].rstrip()
    return ParsedOutput(rationale=rationale, answer=answer or None, raw=text)


def _norm(s: str) -> str:
    return _WS.sub(" ", s.strip().strip(".").strip()).lower()


def normalize_choice_answer(answer: str | None, choices: Sequence[str] | None) -> str | None:
    """Maps "(c) train station", "(c)", "c" or "Train station." to the choice "train station".

    The choice text wins over the letter when both are given and disagree with each other
    (the text is what the model reasoned about). With no choices, or no match, returns the
    answer with any "(x) " prefix removed; None stays None.
    """
    if answer is None:
        return None
    text = answer.strip()
    letter = None
    m = _CHOICE_PREFIX.match(text)
    if m:
        letter = m.group(1).lower()
        text = text[m.end() :]
    elif len(text) == 1 and text.isalpha():
        letter, text = text.lower(), ""
    if not choices:
        return text.strip().rstrip(".").strip() if m else answer.strip()
    normalized = [_norm(c) for c in choices]
    key = _norm(text)
    if key:
        if key in normalized:
            return choices[normalized.index(key)]
    if letter is not None:
        index = ord(letter) - ord("a")
        if 0 <= index < len(choices):
            return choices[index]
    return text.strip().rstrip(".").strip() if text.strip() else answer.strip()
