"""The training methods (finetune, distill, dss, ...): the one table that defines each of them.

"Method" here is what a student trains on; the decoding method of generation is another thing
(`GenerationParams.method`, gin DECODE_METHOD). A `TrainingMethod` lists its objectives in
objective-id order, each with a name, an input prefix, a target (what its examples hold: gold
label, teacher label, teacher rationale, chain of thought) and a loss weight read from gin's
DatasetOptions when a run asks for it; a method of one objective is a SeqIO task, one of several a
mixture of one task per objective.

Everything else reads TRAINING_METHODS: data/registry.py registers `<dataset>_<method>` for every
entry (`register_training_method` adds one from outside), `get_objectives` takes the weights,
paper.py takes its grid (`in_paper`), and the methods tables of README.md and docs/data.md are
`markdown_table()` (tests/test_data_methods.py compares them).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence

from distill_sbs.data import options, preprocessors
from distill_sbs.data.records import Record

Match = Callable[[str | None, str, list[str] | None], bool]  # a metric's match (metrics.Metric)


@dataclasses.dataclass(frozen=True)
class BuildContext:
    """What a target builder gets besides the records: one objective of one method on one split."""

    objective_id: int
    prefix: str
    teacher: (
        str  # the objective's teacher: its own (per-teacher objectives), else the dataset's first
    )
    train: bool  # the train split; evaluation splits always hold gold labels
    match: Match  # the dataset metric's match, for Fine-tune-CoT's filter
    where: str  # "<dataset>_<method>[<objective>]/<split>", named in logged counts


Builder = Callable[[Sequence[Record], BuildContext], list[preprocessors.Example]]


@dataclasses.dataclass(frozen=True)
class Target:
    """What an objective's examples hold, how they are built, how the docs name it."""

    text: str
    build: Builder
    scored: bool = False  # evaluated with the dataset's metric (each method has exactly one)
    chain_of_thought: bool = False  # a prediction "<rationale> So the answer is <x>." scores by <x>


def _gold_label(records: Sequence[Record], ctx: BuildContext) -> list[preprocessors.Example]:
    return preprocessors.label_examples(
        records, objective_id=ctx.objective_id, prefix=ctx.prefix, where=ctx.where
    )


def _teacher_label(records: Sequence[Record], ctx: BuildContext) -> list[preprocessors.Example]:
    return preprocessors.label_examples(
        records,
        objective_id=ctx.objective_id,
        prefix=ctx.prefix,
        teacher=ctx.teacher if ctx.train else None,
        where=ctx.where,
    )


def _rationale(records: Sequence[Record], ctx: BuildContext) -> list[preprocessors.Example]:
    return preprocessors.rationale_examples(
        records,
        teacher=ctx.teacher,
        objective_id=ctx.objective_id,
        prefix=ctx.prefix,
        where=ctx.where,
    )


def _chain_of_thought(records: Sequence[Record], ctx: BuildContext) -> list[preprocessors.Example]:
    if not ctx.train:  # evaluation compares the generated answer with the gold label
        return preprocessors.gold_label_examples(
            records, objective_id=ctx.objective_id, prefix=ctx.prefix, where=ctx.where
        )
    examples, _ = preprocessors.cot_examples(
        records,
        teachers=[ctx.teacher],
        objective_id=ctx.objective_id,
        filter_correct=options.get_options().cot_filter_correct,
        match=ctx.match,
        where=ctx.where,
    )
    return [{**e, "inputs": ctx.prefix + e["inputs"]} for e in examples]


GOLD_LABEL = Target("gold label", _gold_label, scored=True)
TEACHER_LABEL = Target("teacher label", _teacher_label, scored=True)
RATIONALE = Target("teacher rationale", _rationale)
CHAIN_OF_THOUGHT = Target(
    f"`<rationale> {preprocessors.COT_ANSWER} <label>.` per teacher sample "
    "(by default only those with the right answer)",
    _chain_of_thought,
    scored=True,
    chain_of_thought=True,
)


@dataclasses.dataclass(frozen=True)
class Weight:
    """An objective's loss weight, read from gin (DatasetOptions) when a run asks, not at
    registration; `text` names the DatasetOptions fields it reads, for the docs."""

    text: str
    value: Callable[[options.DatasetOptions, str], float]  # (options, the objective's teacher)


ONE = Weight("1", lambda opts, teacher: 1.0)
DSS_ALPHA = Weight("`dss_alpha`", lambda opts, teacher: opts.dss_alpha)
DSS_RATIONALE = Weight("1 − `dss_alpha`", lambda opts, teacher: 1.0 - opts.dss_alpha)
LABEL_WEIGHT = Weight("`label_weight`", lambda opts, teacher: opts.label_weight)
TEACHER_WEIGHT = Weight(
    "`teacher_weights[<t>]`, else `teacher_weight`",
    lambda opts, teacher: float((opts.teacher_weights or {}).get(teacher, opts.teacher_weight)),
)


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
    """One objective of a method. With `per_teacher` it stands for one objective per teacher of
    the dataset, "{teacher}" in its name and prefix replaced by the teacher's name; `teacher` is
    set once bound to a dataset (`TrainingMethod.bind`)."""

    name: str
    prefix: str
    target: Target
    weight: Weight = ONE
    per_teacher: bool = False
    teacher: str | None = None


_NAME = re.compile(r"\w+")


@dataclasses.dataclass(frozen=True)
class TrainingMethod:
    """One training method: registered as `<dataset>_<name>` for every dataset."""

    name: str
    description: str  # one line, for the docs
    objectives: tuple[ObjectiveSpec, ...]  # in objective-id order
    mixture: bool  # a SeqIO mixture of one task per objective; else one task of one objective
    in_paper: bool = False  # in the Distilling Step-by-Step paper's grid (paper.METHODS)

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"method name {self.name!r} must be letters, digits or '_'")
        where = f"method {self.name!r}"
        if not self.objectives:
            raise ValueError(f"{where} has no objectives")
        if not self.mixture and (len(self.objectives) != 1 or self.objectives[0].per_teacher):
            raise ValueError(
                f"{where} is a task, which has exactly one objective; use mixture=True"
            )
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"{where} has repeated objective names {names}")
        for o in self.objectives:
            if o.per_teacher and "{teacher}" not in o.name:
                raise ValueError(f"{where}: per-teacher objective {o.name!r} needs '{{teacher}}'")
        scored = [o.name for o in self.objectives if o.target.scored]
        if len(scored) != 1 or any(o.per_teacher and o.target.scored for o in self.objectives):
            raise ValueError(
                f"{where} needs exactly one scored objective (a label or chain-of-thought target, "
                f"not per teacher); it has {scored or 'none'}"
            )

    def bind(self, teachers: Sequence[str]) -> list[ObjectiveSpec]:
        """The objectives on a dataset with these teachers, in objective-id order, each with its
        teacher (per-teacher objectives expanded; the others use the first teacher)."""
        out = []
        for o in self.objectives:
            if not o.per_teacher:
                out.append(dataclasses.replace(o, teacher=teachers[0]))
                continue
            for t in teachers:
                out.append(
                    dataclasses.replace(
                        o,
                        name=o.name.format(teacher=t),
                        prefix=o.prefix.format(teacher=t),
                        per_teacher=False,
                        teacher=t,
                    )
                )
        return out


_TEACHER_PREFIX = preprocessors.teacher_prefix("{teacher}")  # "[rationale:{teacher}] "

# The table. Registration order is this order; adding a method is one entry here, or
# distill_sbs.data.register_training_method(TrainingMethod(...)) from outside the package.
TRAINING_METHODS: dict[str, TrainingMethod] = {
    m.name: m
    for m in (
        TrainingMethod(
            "finetune",
            "standard fine-tuning on gold labels",
            (ObjectiveSpec("label", "", GOLD_LABEL),),
            mixture=False,
            in_paper=True,
        ),
        TrainingMethod(
            "distill",
            "standard distillation on the teacher LLM's labels",
            (ObjectiveSpec("label", "", TEACHER_LABEL),),
            mixture=False,
            in_paper=True,
        ),
        TrainingMethod(
            "dss",
            "Distilling Step-by-Step, gold labels + LLM rationales",
            (
                ObjectiveSpec("label", preprocessors.LABEL_PREFIX, GOLD_LABEL, DSS_ALPHA),
                ObjectiveSpec(
                    "rationale", preprocessors.RATIONALE_PREFIX, RATIONALE, DSS_RATIONALE
                ),
            ),
            mixture=True,
            in_paper=True,
        ),
        TrainingMethod(
            "dss_llm",
            "Distilling Step-by-Step, LLM labels + LLM rationales",
            (
                ObjectiveSpec("label", preprocessors.LABEL_PREFIX, TEACHER_LABEL, DSS_ALPHA),
                ObjectiveSpec(
                    "rationale", preprocessors.RATIONALE_PREFIX, RATIONALE, DSS_RATIONALE
                ),
            ),
            mixture=True,
            in_paper=True,
        ),
        TrainingMethod(
            "cot",
            "Fine-tune-CoT, the LLM's rationale and answer as one target",
            (ObjectiveSpec("cot", "", CHAIN_OF_THOUGHT),),
            mixture=False,
        ),
        TrainingMethod(
            "multiteacher",
            "TinyLLM, gold labels + every teacher's rationales",
            (
                ObjectiveSpec("label", preprocessors.LABEL_PREFIX, GOLD_LABEL, LABEL_WEIGHT),
                ObjectiveSpec(
                    "rationale:{teacher}",
                    _TEACHER_PREFIX,
                    RATIONALE,
                    TEACHER_WEIGHT,
                    per_teacher=True,
                ),
            ),
            mixture=True,
        ),
    )
}


def get_training_method(name: str) -> TrainingMethod:
    if name not in TRAINING_METHODS:
        raise KeyError(f"unknown training method {name!r}; known: {', '.join(TRAINING_METHODS)}")
    return TRAINING_METHODS[name]


def _objective_cell(o: ObjectiveSpec) -> str:
    name, prefix = o.name.format(teacher="<t>"), o.prefix.format(teacher="<t>")
    each = " (each teacher `<t>`)" if o.per_teacher else ""
    shown = f"`{prefix}`" if prefix else "no prefix"
    return f"`{name}`{each}: {shown} → {o.target.text}, weight {o.weight.text}"


def markdown_table(methods: Iterable[TrainingMethod] | None = None) -> str:
    """The methods table of README.md and docs/data.md (one row per method, objectives in id
    order; weights name their DatasetOptions fields)."""
    rows = [
        "| registered name | kind | method | objectives in id order: input prefix → target, "
        "loss weight |",
        "|---|---|---|---|",
    ]
    for m in TRAINING_METHODS.values() if methods is None else methods:
        kind = "mixture" if m.mixture else "task"
        cells = "; ".join(_objective_cell(o) for o in m.objectives)
        rows.append(f"| `<name>_{m.name}` | {kind} | {m.description} | {cells} |")
    return "\n".join(rows) + "\n"
