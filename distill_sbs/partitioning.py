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
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distill_sbs.errors import UserError

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


# The variables that describe a cluster to jax.distributed (the names jax itself reads), and ours:
# DISTILL_SBS_MULTIHOST=1 initialises with jax's own cluster detection (SLURM, TPU, MPI), and
# DISTILL_SBS_INIT_TIMEOUT bounds the wait for every process to join (seconds).
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
TIMEOUT_ENV = "DISTILL_SBS_INIT_TIMEOUT"
DEFAULT_INIT_TIMEOUT = 300
# Clusters whose layout jax.distributed reads by itself (SLURM, Open MPI, Cloud TPU).
_DETECTED_CLUSTER_ENVS = ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES")


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """How this process joins a multi-process job; None fields are left to jax's detection."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    timeout_s: int


def _env_int(env: Mapping[str, str], name: str, low: int, high: int | None = None) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if value < low or (high is not None and value >= high):
        bound = f"an integer >= {low}" + ("" if high is None else f" and < {high}")
        raise UserError(f"{name}={raw!r} must be {bound}")
    return value


def cluster_spec(env: Mapping[str, str] | None = None) -> ClusterSpec | None:
    """The multi-process settings in `env` (default os.environ), or None for a one-process run.

    A job spans several processes when JAX_COORDINATOR_ADDRESS is set (with JAX_NUM_PROCESSES and
    JAX_PROCESS_ID, or jax's cluster detection filling them in), when DISTILL_SBS_MULTIHOST=1, or
    on a Cloud TPU VM slice of several hosts (TPU_WORKER_HOSTNAMES). Bad values raise a UserError
    naming the variable.
    """
    env = os.environ if env is None else env
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    address = env.get(COORDINATOR_ENV) or None
    if not (address or env.get("DISTILL_SBS_MULTIHOST") == "1" or len(hosts) > 1):
        return None
    if address is not None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"{COORDINATOR_ENV}={address!r} must be host:port")
    num = _env_int(env, NUM_PROCESSES_ENV, 1)
    pid = _env_int(env, PROCESS_ID_ENV, 0, num)
    detectable = len(hosts) > 1 or any(k in env for k in _DETECTED_CLUSTER_ENVS)
    if address and (num is None or pid is None) and not detectable:
        raise UserError(
            f"{COORDINATOR_ENV}={address} is set, so {NUM_PROCESSES_ENV} (how many processes) and "
            f"{PROCESS_ID_ENV} (this one's index, 0..N-1) must be set too"
        )
    timeout = _env_int(env, TIMEOUT_ENV, 1)
    return ClusterSpec(address, num, pid, DEFAULT_INIT_TIMEOUT if timeout is None else timeout)


def _join_failed_message(spec: ClusterSpec) -> str:
    who = ", ".join(
        f"{name}={value}"
        for name, value in (
            (COORDINATOR_ENV, spec.coordinator_address),
            (NUM_PROCESSES_ENV, spec.num_processes),
            (PROCESS_ID_ENV, spec.process_id),
        )
        if value is not None
    )
    return (
        f"error: jax.distributed did not start within {spec.timeout_s} s ({TIMEOUT_ENV}): "
        f"not every process joined the coordinator ({who or 'cluster auto-detection'}); check "
        "that all processes run, that process 0 can bind the address, and that the port is open"
    )


def maybe_initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
    """Initialises jax.distributed when the job spans several processes; True if it did.

    Must run before any other jax call touches the devices. The wait for the other processes is
    bounded: jax's own timeout would abort the process with a C++ stack trace, so a watchdog a
    little ahead of it prints one error line naming the settings and exits with status 1.
    """
    spec = cluster_spec(env)
    if spec is None:
        return False
    # Collectives between CPU processes (tests, `launch_local`) need an implementation; gloo ships
    # with jaxlib (the default from jax 0.4.3x on, named here for older versions). GPU and TPU
    # collectives do not use this setting.
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")

    def give_up() -> None:
        print(_join_failed_message(spec), file=sys.stderr, flush=True)
        os._exit(1)

    watchdog = threading.Timer(spec.timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=spec.coordinator_address,
            num_processes=spec.num_processes,
            process_id=spec.process_id,
            initialization_timeout=spec.timeout_s + 30,  # ours fires first, with a clear line
        )
    finally:
        watchdog.cancel()
    return True


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


def concrete_index(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """A device's index into a global array (jax's, slice(None) for a whole dimension), with
    concrete bounds: the block a host reads for that device."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    bounds = [s.indices(n) for s, n in zip(index, shape, strict=True)]
    if any(step != 1 for _, _, step in bounds):
        raise ValueError(f"strided device index {index}")
    return tuple(slice(start, stop) for start, stop, _ in bounds)
