"""Mesh and logical-axis rules; a train step on a 2x4 mesh of 8 simulated devices equals one."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from distill_sbs.partitioning import (
    FULLY_SHARDED_RULES,
    STANDARD_RULES,
    Partitioner,
    box_logical_axes,
    concrete_index,
    create_mesh,
    logical_specs,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def test_rules_map_logical_axes():
    mesh = create_mesh()
    part = Partitioner(mesh, STANDARD_RULES)
    sh = part.params_shardings(
        {"a": P("vocab", "embed"), "b": P("embed", "mlp"), "c": P("heads", "kv")}
    )
    assert sh["a"].spec == P("model", None)
    assert sh["b"].spec == P(None, "model")
    assert sh["c"].spec == P("model", None)
    full = Partitioner(mesh, FULLY_SHARDED_RULES).params_shardings({"a": P("vocab", "embed")})
    assert full["a"].spec == P("model", "data")
    assert part.batch_sharding().spec == P("data")


def test_mesh_size_errors_name_the_setting():
    with pytest.raises(ValueError, match="num_partitions=3"):
        create_mesh(num_partitions=3, devices=[jax.devices()[0]] * 2)
    with pytest.raises(ValueError, match="num_data_partitions=4"):
        create_mesh(num_partitions=1, num_data_partitions=4, devices=jax.devices()[:1])


def _opt_state_specs(tx):
    params = {"w": np.zeros((4, 6), np.float32), "b": np.zeros((6,), np.float32)}
    logical = {"w": P("embed", "mlp"), "b": P("mlp")}
    boxed = box_logical_axes(jax.eval_shape(lambda: params), logical)
    return logical_specs(jax.eval_shape(tx.init, boxed))


def test_opt_state_mirrors_params():
    import optax

    specs = _opt_state_specs(optax.adamw(1e-3))
    assert specs[0].mu == specs[0].nu == {"w": P("embed", "mlp"), "b": P("mlp")}
    assert specs[0].count == P()
    momentum = _opt_state_specs(optax.sgd(0.1, momentum=0.9))
    assert momentum[0].trace == {"w": P("embed", "mlp"), "b": P("mlp")}
    assert _opt_state_specs(optax.sgd(0.1)) == (optax.EmptyState(), optax.EmptyState())


def test_factored_adafactor_statistics_are_replicated():
    import optax

    state = _opt_state_specs(optax.adafactor(1e-3, min_dim_size_to_factor=2))[0]
    # "w" [4, 6] is factored: its row/column statistics ([6], [4]) and placeholder [1] are
    # replicated; "b" [6] is not: its second moment keeps "mlp", its [1] placeholders are unsplit.
    assert state.v_row["w"] == state.v_col["w"] == state.v["w"] == P()
    assert state.v["b"] == P("mlp")
    assert state.v_row["b"] == state.v_col["b"] == P(None)


def _subprocess_mesh_checks(env: dict[str, str], out_dir, *groups: list[str]) -> dict[str, float]:
    """Each group of checks in its own subprocess of 8 simulated devices, the groups at once:
    compiling (most of a check) is mostly one thread, so two processes use both cores."""
    env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    procs = []
    for i, checks in enumerate(groups):
        # output to files: a process blocked on a full pipe while the other is read would stall
        out, err = (open(out_dir / f"mesh{i}.{n}", "w+") for n in ("out", "err"))  # noqa: SIM115
        cmd = [sys.executable, os.path.join(HERE, "_mesh_check.py"), *checks]
        procs.append((subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True), out, err))
    diffs = {}
    for proc, out, err in procs:
        with out, err:
            returncode = proc.wait(timeout=900)
            out.seek(0), err.seek(0)
            assert returncode == 0, err.read()[-3000:]
            lines = [x.split() for x in out.read().splitlines() if x.startswith("MAXDIFF")]
        diffs.update({kind: float(v) for _, kind, v in lines})
    return diffs


@pytest.mark.slow  # two subprocesses at once, 14 short runs in all
def test_sharded_step_equals_single_device(subprocess_env, tmp_path):
    # Each run: two AdamW steps with 2 microbatches on a mesh of simulated devices; losses and
    # parameters vs the same on one device. The toy model and the tiny T5 (with dropout) on 2x4,
    # fully sharded 2x4 and 8x1 meshes; factored Adafactor on the toy model on the three meshes
    # and on T5 fully sharded (where T5's unfactored vectors, the layer-norm scales, are split
    # over the data axis like their parameters). Every run also checks each optimizer-state
    # leaf's sharding against an oracle (_mesh_check.check_opt_state_shardings).
    # The groups take about the same time; T5's Adafactor runs come last in theirs, so that
    # their initialisations (the same programs as the AdamW runs') come from the session's
    # compilation cache (subprocess_env).
    diffs = _subprocess_mesh_checks(
        subprocess_env,
        tmp_path,
        ["t5:full"],
        ["toy:full", "toy:full:adafactor", "t5:fsdp:adafactor"],
    )
    assert set(diffs) == {"toy", "toy-adafactor", "t5", "t5-adafactor"}, diffs
    assert max(diffs.values()) < 1e-5, diffs


def test_a_strided_device_index_is_refused():
    assert concrete_index((slice(None), slice(2, 4)), (3, 8)) == (
        slice(0, 3),
        slice(2, 4),
    )
    with pytest.raises(ValueError, match="strided"):
        concrete_index((slice(0, 4, 2),), (4,))
