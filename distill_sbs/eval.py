"""Evaluate a checkpoint on a task's split, T5X style:

    python -m distill_sbs.eval --gin_file=runs/eval.gin --gin.CHECKPOINT_PATH="'/tmp/run'" \
        --gin.MIXTURE_OR_TASK_NAME="'arith_dss'"

CHECKPOINT_PATH is a native checkpoint, a MODEL_DIR (latest step), a step directory or a Hugging
Face T5 folder. Prints the metrics; with OUTPUT_DIR set, writes metrics.json and one
predictions JSONL per evaluated task there. The work is `distill_sbs.evaluation.evaluate`.
"""

from __future__ import annotations

from distill_sbs import cli, evaluation


def main() -> None:
    cli.run(lambda: evaluation.evaluate())


if __name__ == "__main__":
    main()
