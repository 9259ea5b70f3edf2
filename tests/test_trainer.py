"""Trainer mechanics on a toy model: accumulation equivalence, sharded == single device."""

from __future__ import annotations

import jax
import numpy as np
import optax
from _toy_model import ToyModel, toy_batch

from distill_sbs.partitioning import create_partitioner
from distill_sbs.trainer import Trainer


def _run(num_microbatches: int, steps: int = 3, optimizer=None, same_batch=False):
    model = ToyModel()
    tr = Trainer(
        model,
        optimizer or optax.adamw(1e-2),
        create_partitioner(),
        [0.5, 0.5],
        num_microbatches=num_microbatches,
        dropout_seed=3,
    )
    state = tr.init_state(jax.random.PRNGKey(0))
    losses = []
    for i in range(steps):
        state, m = tr.train_step(state, toy_batch(0 if same_batch else i))
        losses.append(float(m["loss_sum"]))
    return losses, jax.device_get(state.params)


def test_loss_decreases_and_step_counts():
    losses, _ = _run(1, steps=20, optimizer=optax.adam(3e-2), same_batch=True)
    assert losses[-1] < 0.7 * losses[0], losses


def test_grad_accumulation_matches_full_batch():
    # Without dropout the accumulated gradient is exactly the full-batch gradient.
    model = ToyModel()
    batch = toy_batch(0)
    outs = []
    for m in (1, 4):
        tr = Trainer(model, optax.sgd(0.1), create_partitioner(), [0.3, 0.7], num_microbatches=m)
        tr.model = _NoDropout(model)
        state = tr.init_state(jax.random.PRNGKey(0))
        state, met = tr.train_step(state, batch)
        outs.append((float(met["loss_sum"]), jax.device_get(state.params), met))
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(outs[0][1]), jax.tree.leaves(outs[1][1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outs[0][2]["tokens"], outs[1][2]["tokens"])


class _NoDropout:
    def __init__(self, m):
        self.m = m

    def __getattr__(self, k):
        return getattr(self.m, k)

    def loss_fn(self, params, batch, dropout_rng, *a, **kw):
        return self.m.loss_fn(params, batch, None, *a, **kw)
