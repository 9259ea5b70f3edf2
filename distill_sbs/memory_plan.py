"""Memory plan of a training run: the bytes each device holds, known before any is allocated,
and `python -m distill_sbs.memory_plan`, which prints it for a gin config before renting hardware:

    python -m distill_sbs.memory_plan --gin_file=runs/train.gin \\
        --gin_file=models/t5_1_1_xxl.gin --gin.MIXTURE_OR_TASK_NAME="'cqa_dss'" \\
        --gin.MODEL_DIR="'/unused'" --gin.BATCH_SIZE=64 --gin.NUM_PARTITIONS=8 \\
        --gin.FULLY_SHARDED=True --devices=32 --capacity_gib=32

It takes the same gin files and bindings as `distill_sbs.train` (the model, BATCH_SIZE,
TASK_FEATURE_LENGTHS, NUM_MICROBATCHES, PACK, OPTIMIZER, the mesh macros). `--devices=N` plans on N
simulated CPU devices (any mesh on any machine); without it the plan uses the devices jax sees.
`--capacity_gib` (repeatable) says whether the step fits. `--json_out` writes the figures. Nothing
is allocated and MODEL_DIR is not touched. The network's memory settings are gin bindings like
the rest: `--gin.remat_policy.policy="'full'"`, `--gin.attention_impl.impl="'cudnn'"` (GPU; on
XLA's CPU compiler `xla` plans the same bytes as the default einsum: docs/benchmarks.md).

- parameters and optimizer state: each leaf's shard shape (from the Trainer's shardings on the
  mesh) times its item size, summed per device; exact for any backend.
- the train step: `jax.jit(...).lower(abstract inputs).compile()` and XLA's memory analysis of
  the per-device program: its temporaries (activations kept for the backward pass, gradients,
  the optimizer's intermediates), its arguments (state + batch) and outputs. The state is
  donated, so the outputs reuse the arguments' buffers (XLA's alias bytes). Temporaries depend on
  the backend's compiler: a plan made on CPU devices (`--devices`) approximates a GPU's or TPU's.

Nothing is initialised: inputs are `jax.ShapeDtypeStruct`s, so a T5 XXL plan runs on a laptop.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from distill_sbs.errors import UserError
from distill_sbs.partitioning import Partitioner
from distill_sbs.trainer import Trainer

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of one train step (the largest device where shards differ)."""

    mesh: dict[str, int]
    platform: str
    params: int
    opt_state: int
    batch: int
    temporaries: int  # XLA: buffers live only inside the step
    arguments: int  # XLA: state + batch as the step receives them
    outputs: int  # XLA: new state + metrics
    aliased: int  # XLA: output bytes that reuse donated argument buffers

    @property
    def total(self) -> int:
        """Peak estimate: arguments, temporaries, and the outputs that are not aliased."""
        return self.arguments + self.temporaries + max(self.outputs - self.aliased, 0)


def per_device_bytes(tree: Any) -> int:
    """Bytes of the largest per-device share of a tree of ShapeDtypeStructs with shardings."""
    by_device: dict[int, int] = {}
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        nbytes = math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
        for device in leaf.sharding.device_set:
            by_device[device.id] = by_device.get(device.id, 0) + nbytes
    return max(by_device.values(), default=0)


def abstract_batch(
    batch_size: int, lengths: Mapping[str, int], pack: bool, partitioner: Partitioner
) -> dict[str, jax.ShapeDtypeStruct]:
    """The feature converter's batch (docs/architecture.md, Batches) as abstract int32 arrays."""
    sharding = partitioner.batch_sharding()
    encoder = ["encoder_input_tokens"] + (["encoder_segment_ids", "encoder_positions"] * pack)
    decoder = [
        "decoder_target_tokens",
        "decoder_input_tokens",
        "decoder_loss_weights",
        "decoder_objective_ids",
    ] + (["decoder_segment_ids", "decoder_positions"] * pack)
    shapes = {k: (batch_size, lengths["inputs"]) for k in encoder}
    shapes.update({k: (batch_size, lengths["targets"]) for k in decoder})
    return {k: jax.ShapeDtypeStruct(s, jnp.int32, sharding=sharding) for k, s in shapes.items()}


def plan(
    trainer: Trainer,
    batch_size: int,
    task_feature_lengths: Mapping[str, int],
    pack: bool = True,
) -> MemoryPlan:
    """Compiles `trainer`'s train step for abstract inputs and reads the per-device bytes."""
    part = trainer.partitioner
    abstract, shardings = trainer.abstract_state()
    batch = abstract_batch(batch_size, task_feature_lengths, pack, part)
    # The function Trainer.train_step compiles, with the same shardings and donation (its jit
    # object is built on first call and cannot be lowered from outside a running step).
    step = jax.jit(
        trainer._step,
        in_shardings=(shardings, part.batch_sharding()),
        out_shardings=(shardings, part.replicated()),
        donate_argnums=(0,),
    )
    with part.activation_context():
        stats = step.lower(abstract, batch).compile().memory_analysis()
    return MemoryPlan(
        mesh=dict(part.mesh.shape),
        platform=part.mesh.devices.flat[0].platform,
        params=per_device_bytes(abstract.params),
        opt_state=per_device_bytes(abstract.opt_state),
        batch=per_device_bytes(batch),
        temporaries=int(stats.temp_size_in_bytes),
        arguments=int(stats.argument_size_in_bytes),
        outputs=int(stats.output_size_in_bytes),
        aliased=int(stats.alias_size_in_bytes),
    )


def format_plan(p: MemoryPlan, capacities_gib: Sequence[float] = ()) -> str:
    """The plan as a small table in GiB, plus whether it fits each device capacity given."""
    mesh = " x ".join(f"{k}={v}" for k, v in p.mesh.items())
    rows = [
        ("parameters", p.params),
        ("optimizer state", p.opt_state),
        ("batch", p.batch),
        ("train step temporaries (XLA)", p.temporaries),
        ("train step outputs not aliased", max(p.outputs - p.aliased, 0)),
        ("total (peak estimate)", p.total),
    ]
    lines = [f"per-device memory of one train step, mesh {mesh} ({p.platform}):"]
    lines += [f"  {name:<32}{b / GIB:10.3f} GiB  ({b:,} bytes)" for name, b in rows]
    for cap in capacities_gib:
        verdict = "fits" if p.total <= cap * GIB else "does NOT fit"
        lines.append(f"  {verdict} in {cap:g} GiB ({100 * p.total / (cap * GIB):.0f}% of it)")
    return "\n".join(lines)


# ---- the program -------------------------------------------------------------------------------


def _define_flags() -> dict[str, Any]:
    """The program's own flags, defined when it runs (importing the library defines none)."""
    from absl import flags

    return {
        "devices": flags.DEFINE_integer("devices", None, "plan on this many simulated CPU devices"),
        "capacity_gib": flags.DEFINE_multi_float(
            "capacity_gib", [], "device memory to compare with (GiB)"
        ),
        "json_out": flags.DEFINE_string("json_out", None, "also write the plan as JSON here"),
    }


def _plan_gin_config(flag: dict[str, Any]) -> None:
    import json

    import gin

    from distill_sbs import optimizers, partitioning, storage
    from distill_sbs.models import EncoderDecoderModel
    from distill_sbs.network import T5Config
    from distill_sbs.train import objectives_of

    if flag["devices"].value:  # before anything asks for the devices
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", flag["devices"].value)
    train = gin.get_bindings("train")
    partitioner = partitioning.create_partitioner()
    if train["batch_size"] % partitioner.data_size:
        raise UserError(
            f"BATCH_SIZE={train['batch_size']} must be divisible by the data-parallel "
            f"size {partitioner.data_size}"
        )
    objectives = objectives_of(train["mixture_or_task_name"])
    optimizer, _ = optimizers.create_optimizer(total_steps=train.get("train_steps"))
    trainer = Trainer(
        EncoderDecoderModel(T5Config(), None),  # the vocabulary file is not needed for a plan
        optimizer,
        partitioner,
        [w for _, w in objectives],
        num_microbatches=train.get("num_microbatches", 1),
    )
    lengths = train.get("task_feature_lengths", {"inputs": 512, "targets": 256})
    p = plan(trainer, train["batch_size"], lengths, train.get("pack", True))
    print(format_plan(p, flag["capacity_gib"].value))
    if flag["json_out"].value:
        with storage.Path(flag["json_out"].value).open("w") as f:
            json.dump({**dataclasses.asdict(p), "total": p.total}, f, indent=2)


def main() -> None:
    from distill_sbs import cli

    flag = _define_flags()
    cli.run(lambda: _plan_gin_config(flag))


if __name__ == "__main__":
    main()
