"""Device mesh, logical-axis rules and shardings (T5X style), and multi-host setup.

Parameters carry *logical* axis names (`EncoderDecoderModel.params_logical_axes()`); the rules below
map them onto the two mesh axes `data` and `model`. Everything sharded in the trainer goes through
`Partitioner`, so scaling from one CPU to a TPU pod only changes the mesh sizes and the rules.

Optimizer state gets its axes the way MaxText does it: parameters boxed with their logical names
(`box_logical_axes`) go through `jax.eval_shape(optimizer.init, ...)`, whose tree maps keep the
boxes on every parameter-shaped moment; `logical_specs` reads them back, in one pass over the
whole train state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
MODEL_AXIS = "model"

LogicalRules = Sequence[tuple[str, str | None]]

# The T5X standard rules: activations' batch on the data axis, the wide dimensions of parameters
# (vocab, mlp, heads) on the model axis, everything else replicated.
STANDARD_RULES: LogicalRules = (
    ("batch", DATA_AXIS),
    ("vocab", MODEL_AXIS),
    ("mlp", MODEL_AXIS),
    ("heads", MODEL_AXIS),
    ("joined_kv", MODEL_AXIS),
    ("kv", None),
    ("embed", None),
    ("length", None),
    ("relpos_buckets", None),
    ("layers", None),
)

# Fully sharded parameters (ZeRO-3 like): additionally split `embed` over the data axis.
FULLY_SHARDED_RULES: LogicalRules = tuple(
    (name, DATA_AXIS if name == "embed" else axis) for name, axis in STANDARD_RULES
)


def maybe_initialize_distributed() -> None:
    """Initialises jax.distributed when the job spans several hosts.

    Cloud TPU VMs (TPU_WORKER_HOSTNAMES with more than one host) and explicit coordinator settings
    (JAX_COORDINATOR_ADDRESS / DISTILL_SBS_MULTIHOST=1) both trigger it; single-host runs skip it.
    Must run before any other jax call touches the devices.
    """
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    multi_tpu = len([h for h in hosts.split(",") if h]) > 1
    explicit = (
        os.environ.get("DISTILL_SBS_MULTIHOST") == "1" or "JAX_COORDINATOR_ADDRESS" in os.environ
    )
    if multi_tpu or explicit:
        jax.distributed.initialize()


def create_mesh(
    num_partitions: int = 1,
    num_data_partitions: int = -1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A (data, model) mesh: `num_partitions` devices on the model axis, the rest on data.

    num_data_partitions=-1 puts all remaining devices on the data axis.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if num_partitions < 1 or n % num_partitions:
        raise ValueError(
            f"create_mesh: num_partitions={num_partitions} must divide the {n} available devices"
        )
    data = n // num_partitions if num_data_partitions == -1 else num_data_partitions
    if data * num_partitions > n or data < 1:
        raise ValueError(
            f"create_mesh: num_data_partitions={num_data_partitions} x num_partitions="
            f"{num_partitions} needs more than the {n} available devices"
        )
    used = devices[: data * num_partitions]
    try:
        # Topology-aware placement on TPU/GPU; fails for odd shapes or simulated CPU devices.
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh((data, num_partitions), devices=used)
    except (ValueError, AssertionError, NotImplementedError):
        grid = np.asarray(used).reshape(data, num_partitions)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


@dataclasses.dataclass
class Partitioner:
    """A mesh plus logical-axis rules; gives NamedShardings for params, optimizer state, batches."""

    mesh: Mesh
    rules: LogicalRules = STANDARD_RULES

    @contextlib.contextmanager
    def activation_context(self) -> Iterator[None]:
        """Mesh + rules in scope, so the network's logical activation constraints apply."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(list(self.rules)):
            yield

    def logical_to_sharding(self, logical_specs: Any) -> Any:
        """Maps a tree of logical PartitionSpecs to NamedShardings on this mesh."""
        return nn.logical_to_mesh_sharding(logical_specs, self.mesh, list(self.rules))

    def params_shardings(self, params_logical_axes: Any) -> Any:
        return self.logical_to_sharding(params_logical_axes)

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def batch_sharding(self) -> NamedSharding:
        """Batches: leading (batch) dimension on the data axis."""
        return NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

    @property
    def data_size(self) -> int:
        return self.mesh.shape[DATA_AXIS]

    def host_batch_to_global(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Assembles each host's slice of the batch into global arrays sharded over `data`."""
        sharding = self.batch_sharding()
        return {
            k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()
        }


def box_logical_axes(abstract_params: Any, params_logical_axes: Any) -> Any:
    """`abstract_params` with each leaf boxed (nn.LogicallyPartitioned) in its logical names."""
    return jax.tree.map(
        lambda leaf, spec: nn.LogicallyPartitioned(leaf, tuple(spec)),
        abstract_params,
        params_logical_axes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def logical_specs(boxed_tree: Any) -> Any:
    """Tree of logical PartitionSpecs for the unboxed `boxed_tree` (e.g. a whole train state).

    A leaf inside a box takes the box's names when its rank matches them (parameters, Adam moments,
    momentum); a dimension of size 1 (Adafactor's placeholders of shape [1]) is never split. A leaf
    of another rank (Adafactor's factored row/column statistics, one dimension short of their
    parameter) and a leaf outside any box (step counters, schedules' state) are replicated: they
    are small (one row or column of a parameter), so splitting them would save little memory.
    """

    def box_specs(box: nn.LogicallyPartitioned) -> Any:
        names = tuple(box.names)

        def spec(leaf: Any) -> PartitionSpec:
            if len(leaf.shape) != len(names):
                return PartitionSpec()
            sizes = leaf.shape
            return PartitionSpec(*(n if d > 1 else None for n, d in zip(names, sizes, strict=True)))

        return jax.tree.map(spec, box.value)

    def any_spec(x: Any) -> Any:
        return box_specs(x) if isinstance(x, nn.LogicallyPartitioned) else PartitionSpec()

    return jax.tree.map(
        any_spec, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )


def host_shard_info() -> tuple[int, int]:
    """(shard_id, num_shards) for this host's share of the input pipeline."""
    return jax.process_index(), jax.process_count()


@gin.configurable
def create_partitioner(
    num_partitions: int = 1,
    num_data_partitions: int = -1,
    fully_sharded: bool = False,
    rules: LogicalRules | None = None,
) -> Partitioner:
    """The gin entry point: mesh sizes and rules (standard, fully sharded, or explicit)."""
    mesh = create_mesh(num_partitions, num_data_partitions)
    if rules is None:
        rules = FULLY_SHARDED_RULES if fully_sharded else STANDARD_RULES
    return Partitioner(mesh, tuple(tuple(r) for r in rules))
