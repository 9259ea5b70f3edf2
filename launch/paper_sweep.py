"""Prints (or runs, with --run) the commands of the Distilling Step-by-Step paper grid:
dataset x method x model x train fraction, each in its own MODEL_DIR.

    python launch/paper_sweep.py --root gs://bucket/dss --pretrained /ckpt --data /data/dss \\
        --datasets=cqa,svamp --models t5_1_1_base --fractions 0.125,1.0

The grid's tables live in distill_sbs/paper.py; each command composes paper/base.gin, the
dataset's gin file and a model size (see there). To reproduce tables and figures (checkpoints
selected on validation, the test split scored, results.csv/md and plots collected), use
`python -m distill_sbs.sweep` (docs/reproduction.md).
"""

from __future__ import annotations

import itertools
import shlex
import subprocess
import sys
from collections.abc import Sequence

from absl import app, flags

from distill_sbs import paper

FLAGS = flags.FLAGS
flags.DEFINE_string("root", None, "Parent of the MODEL_DIRs (local or gs://).", required=True)
flags.DEFINE_string(
    "pretrained", None, "Folder holding the t5-v1_1-<size>/ HF folders.", required=True
)
flags.DEFINE_string("data", None, "The DSS release directory.", required=True)
flags.DEFINE_list("datasets", list(paper.DATASETS), "Comma-separated datasets.")
flags.DEFINE_list("methods", list(paper.METHODS), "Comma-separated methods.")
flags.DEFINE_list("models", list(paper.MODELS), "Comma-separated student sizes.")
flags.DEFINE_list("fractions", [str(f) for f in paper.FRACTIONS], "Training-set fractions.")
flags.DEFINE_boolean("run", False, "Run the commands one after another.")

for _name, _known in (
    ("datasets", paper.DATASETS),
    ("methods", paper.METHODS),
    ("models", paper.MODELS),
):
    flags.register_validator(
        _name,
        lambda values, known=_known: set(values) <= set(known),
        f"--{_name}: each must be one of {', '.join(_known)}",
    )


def _fractions(values: Sequence[str]) -> list[float]:
    try:
        fractions = [float(v) for v in values]
    except ValueError:
        raise app.UsageError(f"--fractions: expected numbers, got {','.join(values)}") from None
    if not all(0 < f <= 1 for f in fractions):
        raise app.UsageError(f"--fractions: each must be in (0, 1], got {','.join(values)}")
    return fractions


def commands(
    root: str,
    pretrained: str,
    data: str,
    datasets: Sequence[str],
    methods: Sequence[str],
    models: Sequence[str],
    fractions: Sequence[float],
) -> list[list[str]]:
    """One `python -m distill_sbs.train` argv per cell of the grid."""
    out = []
    for dataset, method, model, fraction in itertools.product(datasets, methods, models, fractions):
        run = f"{dataset}_{method}_{model}_f{fraction}"
        out.append(
            [
                sys.executable,
                "-m",
                "distill_sbs.train",
                *paper.run_flags(dataset, method, model),
                f"--gin.MODEL_DIR='{root}/{run}'",
                f"--gin.PRETRAINED_DIR='{pretrained}/{paper.MODELS[model].hf_dir}'",
                f"--gin.DATA_DIR='{data}'",
                f"--gin.TRAIN_FRACTION={fraction}",
            ]
        )
    return out


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    grid = commands(
        FLAGS.root,
        FLAGS.pretrained,
        FLAGS.data,
        FLAGS.datasets,
        FLAGS.methods,
        FLAGS.models,
        _fractions(FLAGS.fractions),
    )
    for cmd in grid:
        print(shlex.join(cmd), flush=True)
        if FLAGS.run:
            subprocess.run(cmd, check=True)


if __name__ == "__main__":
    app.run(main)
