"""Print the per-device memory of a training run's step before renting hardware:

    python -m distill_sbs.memory_plan --gin_file=runs/train.gin \\
        --gin_file=models/t5_1_1_xxl.gin --gin.MIXTURE_OR_TASK_NAME="'cqa_dss'" \\
        --gin.MODEL_DIR="'/unused'" --gin.BATCH_SIZE=64 --gin.NUM_PARTITIONS=8 \\
        --gin.FULLY_SHARDED=True --devices=32 --capacity_gib=32

takes the same gin files and bindings as `distill_sbs.train` (the model, BATCH_SIZE,
TASK_FEATURE_LENGTHS, NUM_MICROBATCHES, PACK, OPTIMIZER, the mesh macros) and prints the bytes per
device of parameters, optimizer state, batch and the compiled train step's temporaries (XLA's
memory analysis; see distill_sbs/memory.py). `--devices=N` plans on N simulated CPU devices (any
mesh on any machine; the temporaries are then the CPU compiler's, an approximation of a GPU's or
TPU's); without it the plan uses the devices jax sees. `--capacity_gib` (repeatable) says whether
the step fits. `--json_out` writes the figures. Nothing is allocated and MODEL_DIR is not touched.
"""

from __future__ import annotations

import dataclasses
import json

from absl import flags

from distill_sbs import cli, storage

_DEVICES = flags.DEFINE_integer("devices", None, "plan on this many simulated CPU devices")
_CAPACITY = flags.DEFINE_multi_float("capacity_gib", [], "device memory to compare with (GiB)")
_JSON_OUT = flags.DEFINE_string("json_out", None, "also write the plan as JSON here")


def _plan() -> None:
    import gin
    import jax

    if _DEVICES.value:  # before anything asks for the devices
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", _DEVICES.value)
    from distill_sbs import memory, optimizers, partitioning, training
    from distill_sbs.models import EncoderDecoderModel
    from distill_sbs.network import T5Config
    from distill_sbs.trainer import Trainer

    train = gin.get_bindings("train")
    partitioner = partitioning.create_partitioner()
    if train["batch_size"] % partitioner.data_size:
        raise SystemExit(
            f"error: BATCH_SIZE={train['batch_size']} must be divisible by the data-parallel "
            f"size {partitioner.data_size}"
        )
    objectives = training.objectives_of(train["mixture_or_task_name"])
    optimizer, _ = optimizers.create_optimizer(total_steps=train.get("train_steps"))
    trainer = Trainer(
        EncoderDecoderModel(T5Config(), None),  # the vocabulary file is not needed for a plan
        optimizer,
        partitioner,
        [w for _, w in objectives],
        num_microbatches=train.get("num_microbatches", 1),
    )
    lengths = train.get("task_feature_lengths", {"inputs": 512, "targets": 256})
    p = memory.plan(trainer, train["batch_size"], lengths, train.get("pack", True))
    print(memory.format_plan(p, _CAPACITY.value))
    if _JSON_OUT.value:
        with storage.Path(_JSON_OUT.value).open("w") as f:
            json.dump({**dataclasses.asdict(p), "total": p.total}, f, indent=2)


def main() -> None:
    cli.run(_plan)


if __name__ == "__main__":
    main()
