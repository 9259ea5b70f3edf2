"""Training checkpoints: periodic/final saves, keep-N, async, restore, best kept apart, and the
MODEL_DIR loadable by distill_sbs.load."""

from __future__ import annotations

import os

import jax
import numpy as np
import optax
import pytest
from _tiny_t5 import tiny_config

from distill_sbs import checkpoints
from distill_sbs.network import T5Config

SMALL = tiny_config()


def _params(seed):
    from distill_sbs.models import EncoderDecoderModel

    return EncoderDecoderModel(SMALL).init_params(jax.random.PRNGKey(seed))


def test_periodic_keep_n_restore_and_best(tmp_path):
    model_dir = str(tmp_path / "run")
    tx = optax.adamw(1e-3)
    mgr = checkpoints.CheckpointManager(
        model_dir, config=SMALL, save_interval_steps=2, max_to_keep=2, best_metric="acc"
    )
    saved = {}
    for step in range(1, 8):
        params = _params(step)
        opt = tx.init(params)
        if mgr.save(step, params, opt, {"batches_consumed": step}, force=step == 7):
            saved[step] = (params, opt)
        mgr.save_best(step, params, {"acc": {3: 0.9}.get(step, 0.1)})
    mgr.wait_until_finished()
    assert sorted(saved) == [2, 4, 6, 7]
    assert sorted(checkpoints.step_dirs(model_dir)) == [6, 7]  # keep-N
    assert mgr.latest_step() == 7

    abstract = jax.eval_shape(lambda: saved[7])
    params, opt, data_state = mgr.restore(7, abstract[0], abstract[1])
    assert data_state == {"batches_consumed": 7}
    for a, b in zip(jax.tree.leaves((params, opt)), jax.tree.leaves(saved[7]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mgr.close()

    # The MODEL_DIR (latest step) and the best checkpoint load as native checkpoints.
    latest = checkpoints.load_native(model_dir)
    assert latest.step == 7 and latest.config == SMALL
    best = checkpoints.load_native(os.path.join(model_dir, checkpoints.BEST_DIR))
    assert best.step == 3
    for a, b in zip(jax.tree.leaves(best.params), jax.tree.leaves(_params(3)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_mismatch_names_the_checkpoint(tmp_path):
    model_dir = str(tmp_path / "run")
    mgr = checkpoints.CheckpointManager(model_dir, config=SMALL, async_save=False)
    params = _params(0)
    mgr.save(1, params, optax.sgd(0.1).init(params), {"batches_consumed": 1}, force=True)
    other = jax.eval_shape(lambda: {"x": np.zeros((3,), np.float32)})
    with pytest.raises(ValueError, match="checkpoint_1"):
        mgr.restore(1, other, other)


def test_initial_checkpoint_native_and_hf_folder(tmp_path):
    from distill_sbs.convert import native_to_hf
    from distill_sbs.models import EncoderDecoderModel
    from distill_sbs.train import load_initial_params

    params = _params(5)
    native = str(tmp_path / "native")
    checkpoints.save_native(native, params, SMALL, None)
    hf = str(tmp_path / "hf")
    native_to_hf(native, hf)
    abstract = jax.eval_shape(lambda: params)
    for path in (native, hf):
        got = load_initial_params(path, abstract)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=0)
    bigger = EncoderDecoderModel(
        T5Config(**{**SMALL.to_dict(), "mlp_dim": 24, "mlp_activations": ("gelu", "linear")})
    )
    wrong = jax.eval_shape(bigger.init_params, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"INITIAL_CHECKPOINT_PATH=.*native.*shape"):
        load_initial_params(native, wrong)
