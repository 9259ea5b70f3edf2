"""Prompt strategies for teacher annotation.

- few_shot: chain-of-thought exemplars ("Q: ... A: <rationale> So the answer is <answer>."),
  then the question; the output is parsed by distill_sbs.parsing.
- zero_shot: two stages (Kojima et al. 2022): "Q: ... A: Let's think step by step." gives the
  reasoning; the same text plus the reasoning plus "Therefore, the answer is" gives the answer.
- answer_given: rationalisation (TinyLLM): k in-context examples drawn from the same dataset, each
  with its correct answer and an explanation, then the question with its gold answer; the teacher
  writes only the explanation.

Diverse reasoning (N samples at a temperature) and the correctness filter are per-teacher options
of the pipeline, applicable to every strategy.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from distill_sbs.parsing import (
    cut_next_exemplar,
    normalize_choice_answer,
    parse_chain_of_thought,
)
from distill_sbs.teachers.exemplars import Exemplar

STRATEGIES = ("few_shot", "zero_shot", "answer_given")
ANSWER_PHRASE = "So the answer is"
ZERO_SHOT_TRIGGER = "Let's think step by step."
ANSWER_EXTRACTION = "Therefore, the answer is"
ANSWER_GIVEN_INSTRUCTION = (
    "For each question the correct answer is given. Explain step by step why it is correct."
)


def format_exemplar(e: Exemplar) -> str:
    return f"Q: {e.input}\nA: {e.rationale} {ANSWER_PHRASE} {e.answer}."


def few_shot_prompt(exemplars: Sequence[Exemplar], question: str) -> str:
    parts = [format_exemplar(e) for e in exemplars]
    parts.append(f"Q: {question}\nA:")
    return "\n\n".join(parts)


def zero_shot_reasoning_prompt(question: str) -> str:
    return f"Q: {question}\nA: {ZERO_SHOT_TRIGGER}"


def zero_shot_answer_prompt(question: str, reasoning: str, choices: Sequence[str] | None) -> str:
    trigger = ANSWER_EXTRACTION
    if choices:  # as Kojima et al. do for multiple choice
        last = chr(ord("A") + len(choices) - 1)
        trigger = f"Therefore, among A through {last}, the answer is"
    return f"{zero_shot_reasoning_prompt(question)} {reasoning.strip()}\n{trigger}"


def answer_given_prompt(demos: Sequence[Exemplar], question: str, gold: str) -> str:
    parts = [ANSWER_GIVEN_INSTRUCTION]
    for d in demos:
        parts.append(f"Q: {d.input}\nCorrect answer: {d.answer}\nExplanation: {d.rationale}")
    parts.append(f"Q: {question}\nCorrect answer: {gold}\nExplanation:")
    return "\n\n".join(parts)


def choose_demos(
    pool: Sequence[tuple[str, Exemplar]], k: int, example_id: str, seed: int = 0
) -> list[Exemplar]:
    """k in-context examples from `pool` ((id, exemplar) pairs), never the example itself.

    The choice depends only on the example id and seed, so a restarted run builds the same
    prompts (and hits its cache).
    """
    candidates = [e for pid, e in pool if pid != example_id]
    rng = random.Random(f"{seed}:{example_id}")
    return rng.sample(candidates, min(k, len(candidates)))


def clean_rationale(text: str) -> str:
    """The explanation part of a free-form output: cut at the next exemplar and answer phrase."""
    parsed = parse_chain_of_thought(text)
    body = parsed.rationale if parsed.answer is not None else cut_next_exemplar(text)
    return body.split("\n\n", 1)[0].strip()


_LEADING = re.compile(r"^[\s:]+")


def extract_answer(text: str, choices: Sequence[str] | None) -> str | None:
    """The answer in the continuation of "Therefore, the answer is": its first line, no period."""
    line = _LEADING.sub("", cut_next_exemplar(text)).split("\n", 1)[0].strip()
    if line.endswith("."):
        line = line[:-1].rstrip()
    if not line:
        return None
    if choices:
        # "(B) train station" or "B" with upper-case letters as the trigger names them.
        m = re.match(r"^\(?([A-Z])\)(.*)$", line)
        if m:
            line = f"({m.group(1).lower()}){m.group(2)}"
        elif len(line) == 1 and line.isupper():
            line = line.lower()
    return normalize_choice_answer(line, choices)
