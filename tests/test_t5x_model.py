"""Upstream T5X training our tasks with the objective weights (distill_sbs/t5x_model.py).

In one subprocess with upstream T5X (../shared/upstream) on the path, gin parses
distill_sbs/gin/t5x/arith_dss.gin as upstream t5x/train.py does (its train function's arguments:
the model, the train dataset config); T5X's data pipeline gives an arith_dss batch through the
model's feature converter, and T5X's train step (`trainer.train_with_lr`) computes the loss with
the model class, with DSS's alpha at the default 0.5 and at 0.7 (a gin binding). Our loss
(`EncoderDecoderModel.loss_fn` with `ObjectiveLoss`, what our trainer runs) on the same batch and
the same parameters (converted from T5X's) must equal it within 1e-5, and T5X's own
EncoderDecoderModel (a token sum, or with NUM_REAL_TARGET_TOKENS a token mean) must not.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
from _shared_data import REPO, SHARED

UPSTREAM = SHARED / "upstream"

SCRIPT = r"""
import dataclasses, json, sys
import gin, jax, jax.numpy as jnp, numpy as np
from t5x import gin_utils, models, trainer as trainer_lib, utils
from t5x import train_state as train_state_lib

from distill_sbs import t5x_checkpoint
from distill_sbs.losses import ObjectiveLoss
from distill_sbs.models import EncoderDecoderModel

gin_dir = sys.argv[1]

def train(**kwargs):  # stands for upstream t5x/train.py's train: gin fills its arguments
    return kwargs
train_using_gin = gin.configurable(train)  # before parsing, as t5x/train.py does

def step_loss(model, variables, batch):
    state = train_state_lib.FlaxOptimTrainState.create(model.optimizer_def, variables)
    _, metrics = trainer_lib.train_with_lr(
        state, batch, jnp.float32(0.0), jax.random.PRNGKey(0), model, None)
    return float(metrics["loss"].compute())

result = {}
for alpha in (None, 0.7):
    gin.clear_config()
    bindings = ["MODEL_DIR = '/tmp/unused'", "BATCH_SIZE = 8", "train/utils.DatasetConfig.seed = 0"]
    if alpha is not None:
        bindings.append(f"options.DatasetOptions.dss_alpha = {alpha}")
    gin_utils.parse_gin_flags([str(sys.argv[2]), gin_dir], ["t5x/arith_dss.gin"], bindings)
    args = train_using_gin()
    model, cfg = args["model"], args["train_dataset_cfg"]
    ds = utils.get_dataset(cfg, 0, 1, model.FEATURE_CONVERTER_CLS)
    batch = next(iter(ds.as_numpy_iterator()))
    shapes = {k: v.shape for k, v in batch.items()}
    types = {k: v.dtype for k, v in batch.items()}
    variables = model.get_initial_variables(jax.random.PRNGKey(1), shapes, types)
    weights = model.objective_loss.weights
    config, params = t5x_checkpoint.params_from_tree(variables["params"])
    ours, _ = EncoderDecoderModel(config).loss_fn(params, batch, None, ObjectiveLoss(weights))
    ids, w = batch["decoder_objective_ids"], batch["decoder_loss_weights"]
    plain = {}
    for factor in (None, "NUM_REAL_TARGET_TOKENS"):
        t5x_model = models.EncoderDecoderModel(
            module=model.module, input_vocabulary=model.input_vocabulary,
            output_vocabulary=model.output_vocabulary, optimizer_def=model.optimizer_def,
            loss_normalizing_factor=factor)
        plain[str(factor)] = step_loss(t5x_model, variables, batch)
    result[str(alpha)] = {
        "weights": list(weights),
        "tokens": [float(w[ids == k].sum()) for k in range(len(weights))],
        "t5x_with_class": step_loss(model, variables, batch),
        "ours": float(ours),
        "t5x_plain": plain,
    }
print("RESULT " + json.dumps(result))
"""


def start(background, subprocess_env: dict[str, str], out_dir) -> None:
    """Starts the upstream script (once; test_t5x_checkpoint starts it beside its own)."""
    if not (UPSTREAM / "t5x" / "trainer.py").is_file():
        pytest.fail(f"upstream T5X is not at {UPSTREAM} (../shared/upstream)")
    env = dict(subprocess_env)
    env["PYTHONPATH"] = os.pathsep.join([str(UPSTREAM), env["PYTHONPATH"]])
    gin_dir = str(REPO / "distill_sbs" / "gin")
    cmd = [sys.executable, "-c", SCRIPT, gin_dir, str(UPSTREAM)]
    background.start("t5x_model", cmd, env, out_dir)


@pytest.fixture(scope="module")
def result(background, subprocess_env, tmp_path_factory) -> dict:
    start(background, subprocess_env, tmp_path_factory.mktemp("t5x_model"))
    r = background.wait("t5x_model", timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.mark.slow
@pytest.mark.parametrize("alpha", ["None", "0.7"])
def test_t5x_train_step_with_the_model_class_gives_our_loss(result, alpha):
    r = result[alpha]
    assert r["weights"] == pytest.approx([0.5, 0.5] if alpha == "None" else [0.7, 0.3]), r
    # both objectives in the batch, with different token counts (else a token mean would agree)
    label, rationale = r["tokens"]
    assert 0 < label < rationale, r
    assert abs(r["t5x_with_class"] - r["ours"]) <= 1e-5, r
    for name, loss in r["t5x_plain"].items():
        assert abs(loss - r["ours"]) > 1e-2, (name, r)


@pytest.mark.slow
def test_alpha_reaches_the_loss(result):
    assert abs(result["None"]["ours"] - result["0.7"]["ours"]) > 1e-3, result
