"""Teacher parse rates and accuracies of registered datasets.

DISTILL_SBS_DATA_DIR=../shared/data/dss python -m distill_sbs.data.report --datasets=cqa,svamp
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from absl import flags

from distill_sbs import metrics, program
from distill_sbs.data import registry
from distill_sbs.errors import UserError


@dataclasses.dataclass(frozen=True)
class TeacherReport:
    dataset: str
    split: str
    teacher: str
    records: int
    samples: int
    parsed: int  # samples with a rationale and a label
    correct: int  # parsed samples whose label matches gold by the dataset's metric
    labeled: int  # records with a gold label
    labeled_samples: int  # samples of those records

    @property
    def parse_rate(self) -> float:
        return self.parsed / self.samples if self.samples else 0.0

    @property
    def accuracy(self) -> float:
        """Correct samples over all samples of labeled records (a failure counts as wrong)."""
        return self.correct / self.labeled_samples if self.labeled_samples else 0.0


def teacher_reports(dataset: str, split: str) -> list[TeacherReport]:
    """One report per teacher of a dataset split (the full split, not subsampled)."""
    spec = registry.get_dataset_spec(dataset)
    match = metrics.METRICS[spec.metric].match
    records = registry.load_records(dataset, split)
    out = []
    for teacher in spec.teachers:
        samples = parsed = correct = labeled_samples = 0
        for r in records:
            for s in r.teachers.get(teacher, []):
                samples += 1
                ok = s.parsed and s.label is not None
                parsed += ok
                if r.label is not None:
                    labeled_samples += 1
                    correct += ok and match(s.label, r.label, r.choices)
        labeled = sum(r.label is not None for r in records)
        out.append(
            TeacherReport(
                dataset,
                split,
                teacher,
                len(records),
                samples,
                parsed,
                correct,
                labeled,
                labeled_samples,
            )
        )
    return out


def format_reports(reports: Sequence[TeacherReport]) -> str:
    lines = ["dataset  split       teacher  records  samples  parsed            accuracy"]
    for r in reports:
        lines.append(
            f"{r.dataset:<8} {r.split:<11} {r.teacher:<8} {r.records:>7}  {r.samples:>7}  "
            f"{r.parsed:>6} ({100 * r.parse_rate:6.2f}%)  {100 * r.accuracy:6.2f}%"
        )
    return "\n".join(lines)


def define_flags() -> None:
    """The program's flag (defined by program.run, never at import)."""
    flags.DEFINE_list("datasets", ["cqa", "svamp"], "Registered dataset names.")


def main() -> None:
    import distill_sbs.tasks  # noqa: F401  registers the built-in datasets

    reports = []
    for name in flags.FLAGS.datasets:
        try:
            spec = registry.get_dataset_spec(name)
        except KeyError as e:
            raise UserError(f"--datasets: {program.one_line(e)}") from e
        for split in spec.splits:
            reports += teacher_reports(name, split)
    print(format_reports(reports))


if __name__ == "__main__":
    program.run(main, define_flags)
