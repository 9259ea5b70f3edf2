"""Run in a subprocess with 8 simulated CPU devices: a train step on a 2x4 (data x model) mesh, and
on the fully sharded rules, must equal the same step on one device. Prints MAXDIFF <value>.

Every optimizer-state leaf is also checked against an oracle written independently of
partitioning.py: a leaf shaped like the parameter at the end of its path has that parameter's
sharding; any other leaf (counters, Adafactor's factored statistics) is replicated."""

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


OPTIMIZERS = {
    "adamw": lambda: optax.adamw(1e-2),
    # factor every matrix of the tiny models (the default leaves dimensions under 128 whole)
    "adafactor": lambda: optax.adafactor(1e-2, min_dim_size_to_factor=4),
}


def check_opt_state_shardings(state, part: Partitioner) -> dict[str, int]:
    params = {
        tuple(str(k) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)
    }
    kinds = {"like_param": 0, "replicated": 0}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state):
        keys = tuple(str(k) for k in path)
        param = next((params[keys[i:]] for i in range(len(keys)) if keys[i:] in params), None)
        if param is not None and param.shape == leaf.shape:
            want, kind = param.sharding, "like_param"
        else:
            want, kind = part.replicated(), "replicated"
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (keys, leaf.sharding, want)
        kinds[kind] += 1
    return kinds


def run(
    kind: str, mesh_shape: tuple[int, int], rules, opt: str = "adamw"
) -> tuple[list[float], list[np.ndarray]]:
    assert jax.device_count() == 8, jax.devices()
    model, batch = build(kind)
    devices = jax.devices()[: mesh_shape[0] * mesh_shape[1]]
    part = Partitioner(create_mesh(mesh_shape[1], mesh_shape[0], devices=devices), rules)
    tr = Trainer(model, OPTIMIZERS[opt](), part, [0.5, 0.5], num_microbatches=2, dropout_seed=1)
    state = tr.init_state(jax.random.PRNGKey(0))
    # Each leaf lives on the mesh's devices with the sharding the rules give.
    leaf = jax.tree.leaves(state.params)[0]
    assert len(leaf.sharding.device_set) == len(devices)
    kinds = check_opt_state_shardings(state, part)
    # not vacuous: moments shaped like parameters (AdamW; Adafactor's unfactored vectors, which
    # only T5 has) and replicated leaves (counters; Adafactor's factored statistics) both occur
    assert kinds["replicated"] > 0 and (
        kinds["like_param"] > 0 or (opt, kind) == ("adafactor", "toy")
    ), kinds
    losses = []
    for _ in range(2):
        state, m = tr.train_step(state, batch)
        losses.append(float(m["loss_sum"]))
    return losses, [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def check(kind: str, which: str, opt: str) -> float:
    ref_l, ref_p = run(kind, (1, 1), STANDARD_RULES, opt)
    worst = 0.0
    # quick: 2x4; fsdp: 2x4 fully sharded; full: both and 8x1
    configs = [((2, 4), FULLY_SHARDED_RULES if which == "fsdp" else STANDARD_RULES)]
    if which == "full":
        configs += [((2, 4), FULLY_SHARDED_RULES), ((8, 1), STANDARD_RULES)]
    for shape, rules in configs:
        losses, p = run(kind, shape, rules, opt)
        worst = max(worst, max(abs(a - b) / abs(b) for a, b in zip(losses, ref_l, strict=True)))
        for a, b in zip(p, ref_p, strict=True):
            worst = max(worst, float(np.max(np.abs(a - b))))
    return worst


if __name__ == "__main__":
    # arguments: KIND:WHICH[:OPTIMIZER] ..., e.g. toy:full t5:quick:adafactor; prints
    # MAXDIFF KIND[-OPTIMIZER] VALUE per check
    for arg in sys.argv[1:]:
        kind, which, opt = (arg.split(":") + ["quick", "adamw"][arg.count(":") :])[:3]
        name = kind if opt == "adamw" else f"{kind}-{opt}"
        print("MAXDIFF", name, check(kind, which, opt), flush=True)
