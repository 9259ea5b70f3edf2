"""Write JSONL predictions of a checkpoint, for a task's split or a JSONL file of inputs:

    python -m distill_sbs.infer --gin_file=runs/infer.gin --gin.CHECKPOINT_PATH="'/tmp/run'" \
        --gin.MIXTURE_OR_TASK_NAME="'arith_dss'" --gin.OUTPUT_FILE="'/tmp/preds.jsonl'"
    python -m distill_sbs.infer --gin_file=runs/infer.gin --gin.CHECKPOINT_PATH="'/tmp/run'" \
        --gin.INPUT_FILE="'questions.jsonl'" --gin.RATIONALE=True --gin.OUTPUT_FILE="'/tmp/p.jsonl'"

An input file has one JSON object per line with an "input" string (and optionally "id"); see
`distill_sbs.inference.infer` for the output rows and the prefixes.
"""

from __future__ import annotations

from distill_sbs import cli, inference


def main() -> None:
    cli.run(lambda: inference.infer())


if __name__ == "__main__":
    main()
