"""Run in a subprocess with 8 simulated CPU devices: a train step on a 2x4 (data x model) mesh, and
on the fully sharded rules, must equal the same step on one device. Prints MAXDIFF <value>."""

from __future__ import annotations

import sys

import jax
import numpy as np
import optax

from distill_sbs.partitioning import FULLY_SHARDED_RULES, STANDARD_RULES, Partitioner, create_mesh
from distill_sbs.trainer import Trainer


def build(kind: str):
    if kind == "toy":
        from _toy_model import ToyModel, toy_batch

        return ToyModel(vocab=32, embed=8, mlp=16), toy_batch(0, batch=8)
    from _tiny_t5 import tiny_model_and_batch

    return tiny_model_and_batch()


def run(kind: str, mesh_shape: tuple[int, int], rules) -> tuple[list[float], list[np.ndarray]]:
    assert jax.device_count() == 8, jax.devices()
    model, batch = build(kind)
    devices = jax.devices()[: mesh_shape[0] * mesh_shape[1]]
    part = Partitioner(create_mesh(mesh_shape[1], mesh_shape[0], devices=devices), rules)
    tr = Trainer(model, optax.adamw(1e-2), part, [0.5, 0.5], num_microbatches=2, dropout_seed=1)
    state = tr.init_state(jax.random.PRNGKey(0))
    # Each leaf lives on the mesh's devices with the sharding the rules give.
    leaf = jax.tree.leaves(state.params)[0]
    assert len(leaf.sharding.device_set) == len(devices)
    losses = []
    for _ in range(2):
        state, m = tr.train_step(state, batch)
        losses.append(float(m["loss_sum"]))
    return losses, [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def check(kind: str, which: str) -> float:
    ref_l, ref_p = run(kind, (1, 1), STANDARD_RULES)
    worst = 0.0
    configs = [((2, 4), STANDARD_RULES)]
    if which == "full":
        configs += [((2, 4), FULLY_SHARDED_RULES), ((8, 1), STANDARD_RULES)]
    for shape, rules in configs:
        losses, p = run(kind, shape, rules)
        worst = max(worst, max(abs(a - b) / abs(b) for a, b in zip(losses, ref_l, strict=True)))
        for a, b in zip(p, ref_p, strict=True):
            worst = max(worst, float(np.max(np.abs(a - b))))
    return worst


if __name__ == "__main__":
    # arguments: KIND:WHICH ..., e.g. toy:full t5:quick; prints MAXDIFF KIND VALUE per check
    for arg in sys.argv[1:]:
        kind, _, which = arg.partition(":")
        print("MAXDIFF", kind, check(kind, which or "quick"), flush=True)
