"""Train a student, T5X style:

    python -m distill_sbs.train --gin_file=quickstart.gin
    python -m distill_sbs.train --gin_file=paper/cqa/dss_t5_1_1_base.gin \\
        --gin.MODEL_DIR="'/tmp/run'" --gin.PRETRAINED_DIR="'/ckpt/t5-v1_1-base'"

gin files by path or relative to the project's gin/ directory; `--gin.KEY=VALUE` binds a macro
or parameter. Runs `distill_sbs.trainer.train` (or `trainer.compare` when `compare.runs` is bound,
as in the quickstart). Rerunning with the same MODEL_DIR resumes from its latest checkpoint.
"""

from __future__ import annotations

from distill_sbs import launch_utils


def main() -> None:
    from distill_sbs import compare, training

    launch_utils.run(lambda: compare.compare() if compare.compare_bound() else training.train())


if __name__ == "__main__":
    main()
