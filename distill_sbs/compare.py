"""Train several students with the same settings and print their accuracies side by side:

    python -m distill_sbs.compare --gin_file=quickstart.gin

Each student of `compare.runs` ({name: mixture}) trains in MODEL_DIR/<name> with the `train`
settings of the gin files (see distill_sbs.train); the table lists every student's eval metrics
and, with `compare.baseline_dataset`, the majority-answer baseline. The work is
`distill_sbs.comparison.compare`.
"""

from __future__ import annotations

from distill_sbs import cli, comparison


def main() -> None:
    cli.run(lambda: comparison.compare())


if __name__ == "__main__":
    main()
