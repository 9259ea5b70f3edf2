"""Train a student, T5X style:

    python -m distill_sbs.train --gin_file=runs/train.gin --gin_file=models/t5_1_1_small.gin \
        --gin.MODEL_DIR="'/tmp/run'" --gin.MIXTURE_OR_TASK_NAME="'arith_dss'"
    python -m distill_sbs.train --gin_file=paper/base.gin --gin_file=paper/cqa.gin \
        --gin_file=models/t5_1_1_base.gin --gin.METHOD="'dss'" \
        --gin.MODEL_DIR="'/tmp/run'" --gin.PRETRAINED_DIR="'/ckpt/t5-v1_1-base'"

gin files by path or relative to the package's gin/ directory; `--gin.KEY=VALUE` binds a macro
or parameter. Rerunning with the same MODEL_DIR resumes from its latest checkpoint. The loop is
`distill_sbs.training.train`; several students side by side (the quickstart) are
`python -m distill_sbs.compare`.
"""

from __future__ import annotations

from distill_sbs import cli, training


def _train() -> None:
    if cli.is_bound("compare.runs"):  # a config of several students, e.g. quickstart.gin
        raise SystemExit(
            "this gin config trains several students (compare.runs): run it with "
            "python -m distill_sbs.compare"
        )
    training.train()


def main() -> None:
    cli.run(_train)


if __name__ == "__main__":
    main()
