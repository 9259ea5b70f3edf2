"""Rematerialisation policies (network.remat_policy, gin): the loss and gradients equal today's
step (policy "none") within float tolerance, with dropout on, and the policy is really applied
(a checkpoint in the traced step); an unknown policy is a clear error. (The memory the policies
save is for the GPU compiler to show: device_check.py plans each; XLA's CPU compiler reports the
same temporaries for all.)"""

from __future__ import annotations

import gin
import jax
import numpy as np
import pytest
from _tiny_t5 import tiny_model_and_batch

from distill_sbs.losses import ObjectiveLoss
from distill_sbs.network import remat_policy


def _with_policy(policy: str, fn):
    with gin.unlock_config():
        gin.bind_parameter("distill_sbs.network.remat_policy.policy", policy)
    try:
        return fn()
    finally:
        gin.clear_config()


def _loss_and_grads(policy: str):
    model, batch = tiny_model_and_batch()
    params = model.init_params(jax.random.PRNGKey(0))
    loss = ObjectiveLoss((0.5, 0.5))

    def f(p):
        return model.loss_fn(p, batch, jax.random.PRNGKey(1), loss)[0]

    grad = jax.value_and_grad(f)
    traced = _with_policy(policy, lambda: str(jax.make_jaxpr(grad)(params)))
    assert ("remat" in traced or "checkpoint" in traced) == (policy != "none")
    return _with_policy(policy, lambda: jax.jit(grad)(params))


@pytest.mark.parametrize("policy", ["minimal", "dots_saveable", "full"])
def test_gradients_unchanged(policy):
    loss0, grads0 = _loss_and_grads("none")
    loss1, grads1 = _loss_and_grads(policy)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    flat0, flat1 = jax.tree.leaves(grads0), jax.tree.leaves(grads1)
    assert len(flat0) == len(flat1) > 10
    for a, b in zip(flat0, flat1, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    assert max(float(np.abs(a).max()) for a in flat0) > 0


def test_unknown_policy_is_an_error():
    with pytest.raises(ValueError, match="remat_policy.policy: unknown 'some'"):
        remat_policy("some")
