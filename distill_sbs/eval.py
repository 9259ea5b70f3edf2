"""Evaluate a checkpoint on a task's split, T5X style:

    python -m distill_sbs.eval --gin_file=runs/eval.gin --gin.CHECKPOINT_PATH="'/tmp/run'" \\
        --gin.MIXTURE_OR_TASK_NAME="'arith_dss'"

CHECKPOINT_PATH is a native checkpoint, a MODEL_DIR (latest step), a step directory or a Hugging
Face T5 folder. Prints the metrics; with OUTPUT_DIR set, writes metrics.json and one
predictions JSONL per evaluated task there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import gin
from distill_sbs import launch_utils

if __name__ == "__main__":
    # Run the copy registered as distill_sbs.eval, so gin sees one `evaluate` configurable.
    from distill_sbs.eval import main as _main

    _main()
    raise SystemExit(0)


@gin.configurable
def evaluate(
    checkpoint_path: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    split: str = "test",
    batch_size: int = 32,
    max_decode_length: int | None = None,
    num_examples: int | None = None,
    output_dir: str | None = None,
) -> dict[str, float]:
    import distill_sbs
    from distill_sbs.evaluation import evaluate_tasks

    model, params = distill_sbs.load(checkpoint_path)
    metrics, outputs = evaluate_tasks(
        model,
        params,
        mixture_or_task_name,
        split=split,
        task_feature_lengths=task_feature_lengths,
        batch_size=batch_size,
        max_decode_length=max_decode_length,
        num_examples=num_examples,
    )
    if not metrics:
        raise SystemExit(f"{mixture_or_task_name}: no task with metrics has split {split!r}")
    for k, v in sorted(metrics.items()):
        print(f"{k}: {v:.4f}")
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "metrics.json"), "w") as f:
            json.dump({"checkpoint": checkpoint_path, "split": split, **metrics}, f, indent=2)
        for task, rows in outputs.items():
            with open(os.path.join(output_dir, f"{task}.{split}.jsonl"), "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
    return metrics


def main() -> None:
    launch_utils.run(lambda: evaluate())
