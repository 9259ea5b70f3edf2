"""The Distilling Step-by-Step paper's grid (Hsieh et al. 2023): datasets x methods x students.

A paper run composes gin files, T5X style: `paper/base.gin` (the paper's hyperparameters), one file
per dataset (`paper/cqa.gin`: its name and metric), a model size, and the METHOD macro:

    python -m distill_sbs.train --gin_file=paper/base.gin --gin_file=paper/cqa.gin \\
        --gin_file=models/t5_1_1_base.gin --gin.METHOD="'dss'" \\
        --gin.MODEL_DIR="'/runs/cqa_dss'" --gin.PRETRAINED_DIR="'/ckpt/t5-v1_1-base'" \\
        --gin.DATA_DIR="'/data/dss'" --gin.TRAIN_FRACTION=0.125

`mixture_name` and `best_metric` turn DATASET and METHOD into the SeqIO mixture and the metric
that selects the best checkpoint (gin cannot join strings); `run_flags` gives the flags of one
cell of the grid, which launch/paper_sweep.py prints for the whole grid.
"""

from __future__ import annotations

import dataclasses

import gin

from distill_sbs.data.methods import TRAINING_METHODS

# Each dataset has gin/paper/<name>.gin; the mixtures <name>_<method> come from distill_sbs.tasks.
DATASETS = ("cqa", "svamp", "esnli", "anli1")

# The paper's methods: the entries of the method table (data/methods.py) marked in_paper.
METHODS = tuple(name for name, method in TRAINING_METHODS.items() if method.in_paper)


@dataclasses.dataclass(frozen=True)
class Model:
    """A student size: models/<name>.gin, the HF checkpoint the paper starts from, its sharding."""

    hf_checkpoint: str
    num_partitions: int = 1  # devices on the "model" mesh axis
    fully_sharded: bool = False

    @property
    def hf_dir(self) -> str:
        """The checkpoint's folder name (e.g. t5-v1_1-base) under a local or gs:// root."""
        return self.hf_checkpoint.split("/")[-1]


MODELS = {
    "t5_1_1_base": Model("google/t5-v1_1-base"),
    "t5_1_1_large": Model("google/t5-v1_1-large"),
    "t5_1_1_xxl": Model("google/t5-v1_1-xxl", num_partitions=8, fully_sharded=True),
}

# The paper's data-size sweep (fractions of the training split).
FRACTIONS = (0.125, 0.25, 0.5, 1.0)


def _check(kind: str, value: str, known) -> None:
    if value not in known:
        raise ValueError(f"{kind}={value!r} is not one of: {', '.join(known)}")


@gin.configurable(module="paper")
def mixture_name(dataset: str = gin.REQUIRED, method: str = gin.REQUIRED) -> str:
    """The SeqIO mixture of `method` on `dataset`, e.g. cqa_dss.

    Any registered dataset and training method is accepted (the miniature runs the paper's configs
    on the embedded `arith` data, and `cot` too); the paper's own grid is DATASETS x METHODS.
    """
    from distill_sbs import data

    _check("DATASET", dataset, data.registered_datasets())
    _check("METHOD", method, TRAINING_METHODS)
    return f"{dataset}_{method}"


def scored_task(mixture: str) -> str:
    """The task whose metric selects checkpoints: the mixture's one sub-task with metrics (the
    label task of DSS), or the task itself."""
    import seqio

    provider = seqio.get_mixture_or_task(mixture)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    scored = [t.name for t in tasks if t.metric_fns]
    if len(scored) != 1:
        raise ValueError(f"{mixture}: expected one scored task, found {scored or 'none'}")
    return scored[0]


@gin.configurable(module="paper")
def best_metric(
    dataset: str = gin.REQUIRED, method: str = gin.REQUIRED, metric: str = gin.REQUIRED
) -> str:
    """The "<task>/<metric>" key that selects the best checkpoint, e.g. cqa_dss_label/accuracy."""
    return f"{scored_task(mixture_name(dataset, method))}/{metric}"


def run_flags(dataset: str, method: str, model: str) -> list[str]:
    """The gin flags of one paper run (without MODEL_DIR, PRETRAINED_DIR and the data paths)."""
    _check("dataset", dataset, DATASETS)
    _check("method", method, METHODS)
    _check("model", model, MODELS)
    size = MODELS[model]
    flags = [
        "--gin_file=paper/base.gin",
        f"--gin_file=paper/{dataset}.gin",
        f"--gin_file=models/{model}.gin",
        f"--gin.METHOD='{method}'",
    ]
    if size.num_partitions != 1:
        flags.append(f"--gin.NUM_PARTITIONS={size.num_partitions}")
    if size.fully_sharded:
        flags.append("--gin.FULLY_SHARDED=True")
    return flags
