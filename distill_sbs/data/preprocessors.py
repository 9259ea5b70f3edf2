"""Records -> text examples of one objective (plain Python, so every rule is testable without tf).

An example is {"id", "inputs", "targets", "objective_id", "choices"} with text inputs/targets;
"choices" is the newline-joined answer choices ("" when none), kept for the multiple-choice metric.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from absl import logging

from distill_sbs.data.records import Record, TeacherSample

LABEL_PREFIX = "[label] "
RATIONALE_PREFIX = "[rationale] "
COT_ANSWER = "So the answer is"  # Fine-tune-CoT target: "<rationale> So the answer is <label>."

Example = dict


def teacher_prefix(teacher: str) -> str:
    return f"[rationale:{teacher}] "


def subsample(records: Sequence[Record], fraction: float, seed: int) -> list[Record]:
    """The first ceil(fraction * n) records of a seeded permutation, in their original order.

    Nested by construction: for one seed, the 12.5% set is a subset of the 25% set.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train fraction {fraction} not in (0, 1]")
    if fraction == 1.0:
        return list(records)
    order = np.random.default_rng(seed).permutation(len(records))
    keep = np.sort(order[: math.ceil(fraction * len(records))])
    return [records[i] for i in keep]


def _example(record: Record, inputs: str, targets: str, objective_id: int) -> Example:
    return {
        "id": record.id,
        "inputs": inputs,
        "targets": targets,
        "objective_id": objective_id,
        "choices": "\n".join(record.choices or []),
    }


def _first_parsed(record: Record, teacher: str) -> TeacherSample | None:
    for sample in record.teachers.get(teacher, []):
        if sample.parsed:
            return sample
    return None


def label_examples(
    records: Sequence[Record],
    *,
    objective_id: int,
    prefix: str = "",
    teacher: str | None = None,
    where: str = "",
) -> list[Example]:
    """Input -> label; the gold label, or `teacher`'s label (its first parsed sample) if given.

    Records without the label asked for cannot make an example; their count is logged.
    """
    out, missing = [], 0
    for r in records:
        if teacher is None:
            label = r.label
        else:
            sample = _first_parsed(r, teacher)
            label = sample.label if sample is not None else None
        if label is None or not label.strip():
            missing += 1
            continue
        out.append(_example(r, prefix + r.input, label, objective_id))
    if missing:
        what = "gold label" if teacher is None else f"parsed label of teacher {teacher!r}"
        logging.warning(
            "%s: %d of %d records have no %s; skipped", where, missing, len(records), what
        )
    return out


def rationale_examples(
    records: Sequence[Record],
    *,
    teacher: str,
    objective_id: int,
    prefix: str,
    where: str = "",
) -> list[Example]:
    """Input -> the teacher's rationale (its first parsed sample, as in DSS)."""
    out, missing = [], 0
    for r in records:
        sample = _first_parsed(r, teacher)
        if sample is None:
            missing += 1
            continue
        out.append(_example(r, prefix + r.input, sample.rationale, objective_id))
    if missing:
        logging.warning(
            "%s: %d of %d records have no parsed rationale of teacher %r; skipped",
            where,
            missing,
            len(records),
            teacher,
        )
    return out


def cot_target(rationale: str, label: str) -> str:
    return f"{rationale} {COT_ANSWER} {label}."


def cot_examples(
    records: Sequence[Record],
    *,
    teachers: Sequence[str],
    objective_id: int,
    filter_correct: bool,
    match: Callable[[str | None, str, list[str] | None], bool],
    where: str = "",
) -> tuple[list[Example], dict[str, int]]:
    """Fine-tune-CoT: one "rationale So the answer is label." example per parsed teacher sample.

    With filter_correct, samples whose label does not match the gold label by the dataset's metric
    (or whose record has no gold label) are dropped; the counts are returned and logged.
    """
    out: list[Example] = []
    counts = {"samples": 0, "unparsed": 0, "wrong": 0, "no_gold": 0, "kept": 0}
    for r in records:
        for teacher in teachers:
            for sample in r.teachers.get(teacher, []):
                counts["samples"] += 1
                if not sample.parsed or sample.label is None:
                    counts["unparsed"] += 1
                    continue
                if filter_correct:
                    if r.label is None:
                        counts["no_gold"] += 1
                        continue
                    if not match(sample.label, r.label, r.choices):
                        counts["wrong"] += 1
                        continue
                counts["kept"] += 1
                out.append(
                    _example(r, r.input, cot_target(sample.rationale, sample.label), objective_id)
                )
    dropped = counts["samples"] - counts["kept"]
    if dropped:  # at WARNING, which the CLI shows: the user sees what the filter removed
        logging.warning(
            "%s: kept %d of %d teacher samples (unparsed %d, wrong answer %d, no gold label %d)",
            where,
            counts["kept"],
            counts["samples"],
            counts["unparsed"],
            counts["wrong"],
            counts["no_gold"],
        )
    return out, counts


def gold_label_examples(
    records: Sequence[Record], *, objective_id: int, prefix: str = "", where: str = ""
) -> list[Example]:
    """Evaluation examples: input -> gold label (what every method is scored on)."""
    return label_examples(records, objective_id=objective_id, prefix=prefix, where=where)
