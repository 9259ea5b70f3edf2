"""Prompt strategies for teacher annotation: one object per strategy holds its prompts, its
optional second stage and how its outputs are read (`make_strategy` picks it once per teacher).

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

from distill_sbs.data.records import Record
from distill_sbs.generation import GenerationParams
from distill_sbs.parsing import (
    cut_next_exemplar,
    normalize_choice_answer,
    parse_chain_of_thought,
)
from distill_sbs.teachers.exemplars import Exemplar

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


Reading = tuple[str, str | None, str]  # (rationale, label or None, raw output to keep)


class Strategy:
    """How a teacher is prompted for one record and how its outputs become a sample."""

    name: str
    # Decoding of the second stage (which gets `answer_prompt`); None: one stage only.
    answer_params: GenerationParams | None = None

    def unusable(self, record: Record) -> str | None:
        """Why `record` cannot be prompted (it is then listed as failed), or None."""
        return None

    def prompt(self, record: Record) -> str:
        raise NotImplementedError

    def answer_prompt(self, record: Record, reasoning: str) -> str:
        raise NotImplementedError(f"{self.name} has no second stage")

    def read(self, record: Record, text: str, answer_text: str | None) -> Reading:
        """What one sample's output (and second-stage output) says."""
        raise NotImplementedError


class FewShot(Strategy):
    name = "few_shot"

    def __init__(self, exemplars: Sequence[Exemplar]):
        self.exemplars = list(exemplars)

    def prompt(self, record: Record) -> str:
        return few_shot_prompt(self.exemplars, record.input)

    def read(self, record: Record, text: str, answer_text: str | None) -> Reading:
        parsed = parse_chain_of_thought(text)
        return parsed.rationale, normalize_choice_answer(parsed.answer, record.choices), text


class ZeroShot(Strategy):
    name = "zero_shot"

    def __init__(self, answer_max_tokens: int):
        # The answer is one short greedy line.
        self.answer_params = GenerationParams(answer_max_tokens, 0.0, 1.0, ("\n",))

    def prompt(self, record: Record) -> str:
        return zero_shot_reasoning_prompt(record.input)

    def answer_prompt(self, record: Record, reasoning: str) -> str:
        return zero_shot_answer_prompt(record.input, reasoning, record.choices)

    def read(self, record: Record, text: str, answer_text: str | None) -> Reading:
        assert answer_text is not None  # the pipeline reads a sample once both stages finished
        raw = f"{text}\n{ANSWER_EXTRACTION}{answer_text}"
        return clean_rationale(text), extract_answer(answer_text, record.choices), raw


class AnswerGiven(Strategy):
    """Rationalisation: `pool` holds (id, exemplar) in-context candidates (see choose_demos)."""

    name = "answer_given"

    def __init__(self, pool: Sequence[tuple[str, Exemplar]], k_shot: int):
        self.pool, self.k_shot = list(pool), k_shot

    def unusable(self, record: Record) -> str | None:
        return "answer_given needs a gold label" if record.label is None else None

    def prompt(self, record: Record) -> str:
        demos = choose_demos(self.pool, self.k_shot, record.id)
        return answer_given_prompt(demos, record.input, record.label)

    def read(self, record: Record, text: str, answer_text: str | None) -> Reading:
        return clean_rationale(text), record.label, text


def answer_given_pool(
    records: Sequence[Record], exemplars: Sequence[Exemplar]
) -> list[tuple[str, Exemplar]]:
    """In-context examples for rationalisation: dataset records with a gold label and a parsed
    rationale from any teacher, plus the exemplar set (ids "exemplar-<i>")."""
    pool: list[tuple[str, Exemplar]] = []
    for r in records:
        if r.label is None:
            continue
        for samples in r.teachers.values():
            s = next((s for s in samples if s.parsed), None)
            if s is not None:
                pool.append((r.id, Exemplar(r.input, s.rationale, r.label)))
                break
    pool += [(f"exemplar-{i}", e) for i, e in enumerate(exemplars)]
    return pool


STRATEGIES = (FewShot.name, ZeroShot.name, AnswerGiven.name)


def make_strategy(
    name: str,
    exemplars: Sequence[Exemplar] | None,
    records: Sequence[Record],
    *,
    k_shot: int = 4,
    answer_max_tokens: int = 32,
) -> Strategy:
    """The strategy called `name`; `exemplars` None when the teacher has no exemplar set."""
    if name == FewShot.name:
        if exemplars is None:
            raise ValueError("few_shot needs exemplars (a set or a file)")
        return FewShot(exemplars)
    if name == ZeroShot.name:
        return ZeroShot(answer_max_tokens)
    if name == AnswerGiven.name:
        return AnswerGiven(answer_given_pool(records, exemplars or []), k_shot)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
