"""On-policy distillation (GKD, distillation.OnPolicy) in the train step: lambda = 0 is supervised
KD exactly; with lambda > 0 the targets are the student's samples (equal to decoding outside the
step with the step's key) and the loss equals a numpy computation on them; a sharded step on a
simulated mesh equals one device.

Run as a script (`python tests/test_distillation_gkd.py mesh`) it is the subprocess of the mesh
test: 4 simulated CPU devices, printing MAXDIFF <value>."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tiny_t5 import TINY, tiny_config, tiny_model_and_batch

from distill_sbs import distillation
from distill_sbs.errors import UserError
from distill_sbs.losses import SAMPLED_FEATURE, ObjectiveLoss, summarize_metrics
from distill_sbs.models import EncoderDecoderModel
from distill_sbs.partitioning import STANDARD_RULES, Partitioner, create_mesh
from distill_sbs.trainer import SAMPLING_STREAM, Trainer

# one layer each (the trainer compiles in seconds); the student with dropout, so that the
# step's key matters; the batches are _tiny_t5's (vocabulary 64)
STUDENT = tiny_config(vocab_size=TINY.vocab_size, dropout_rate=0.1)
TEACHER = tiny_config(vocab_size=TINY.vocab_size, emb_dim=24)
LOSS = ObjectiveLoss((0.5, 0.5), divergence_weights=(0.3, 0.7), divergence="jsd", beta=0.4)
FIELDS = {"divergence_weights": LOSS.divergence_weights, "divergence": "jsd", "beta": 0.4}
SEED, LR, TEMPERATURE = 3, 0.5, 1.3


@functools.cache
def _teacher_params():
    return jax.jit(EncoderDecoderModel(TEACHER).init_params)(jax.random.PRNGKey(7))


def _teacher(partitioner: Partitioner | None = None, on_policy=None):
    model = EncoderDecoderModel(TEACHER)
    params = _teacher_params()
    shardings = None
    if partitioner is not None:
        shardings = partitioner.params_shardings(model.params_logical_axes())
        params = jax.device_put(params, shardings)
    return distillation.OnlineTeacher(model, params, shardings, on_policy)


def _trainer(on_policy, partitioner=None, num_microbatches=1):
    student = EncoderDecoderModel(STUDENT)
    part = partitioner or Partitioner(create_mesh(1, 1, devices=jax.devices()[:1]), STANDARD_RULES)
    return Trainer(
        student,
        optax.sgd(LR),
        part,
        LOSS.weights,
        num_microbatches=num_microbatches,
        dropout_seed=SEED,
        teacher=_teacher(part, on_policy),
        divergence=FIELDS,
    )


def _step(tr: Trainer, batch, steps: int = 1):
    state = tr.init_state(jax.random.PRNGKey(0))
    params0 = jax.device_get(state.params)
    losses = []
    for _ in range(steps):
        state, metrics = tr.train_step(state, batch)
        losses.append(float(metrics["loss_sum"]))
    return params0, jax.device_get(metrics), losses, jax.device_get(state.params)


def test_rows_are_the_fraction_spread_over_the_batch():
    assert distillation.OnPolicy(0.0).rows(8).tolist() == []
    assert distillation.OnPolicy(0.5).rows(8).tolist() == [1, 3, 5, 7]
    assert distillation.OnPolicy(1.0).rows(8).tolist() == list(range(8))
    assert len(distillation.OnPolicy(0.3).rows(10)) == 3


def _program(tr: Trainer, batch) -> str:
    """The train step's whole program (StableHLO text), lowered without compiling."""
    state = tr.abstract_state()[0]
    with tr.partitioner.activation_context():
        return jax.jit(tr._step).lower(state, batch, tr.teacher.params).as_text()


def test_lambda_zero_is_supervised_kd():
    # The same program as supervised KD, hence the same loss and gradients for every input.
    _, batch = tiny_model_and_batch()
    plain = _program(_trainer(None), batch)
    assert _program(_trainer(distillation.OnPolicy(0.0, TEMPERATURE)), batch) == plain
    assert _program(_trainer(distillation.OnPolicy(0.5, TEMPERATURE)), batch) != plain


# ---- the reference: numpy over the samples decoded outside the step ---------------------------


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _expected_batch(batch, rows, samples):
    """The batch the step should train on, written from the definition row by row."""
    out = {k: np.array(v) for k, v in batch.items()}
    sampled = np.zeros(batch["decoder_loss_weights"].shape, np.float32)
    for r, s in zip(rows, np.asarray(samples), strict=True):
        eos = np.flatnonzero(s == 1)
        n = eos[0] + 1 if eos.size else len(s)
        out["decoder_target_tokens"][r] = np.where(np.arange(len(s)) < n, s, 0)
        out["decoder_input_tokens"][r] = np.concatenate([[0], out["decoder_target_tokens"][r][:-1]])
        out["decoder_loss_weights"][r] = np.arange(len(s)) < n
        out["decoder_objective_ids"][r] = batch["decoder_objective_ids"][r, 0]
        sampled[r] = np.arange(len(s)) < n
    return out, sampled


def _numpy_loss(student_logits, teacher_logits, batch, sampled, beta=0.4):
    lq, lp = _log_softmax(student_logits), _log_softmax(teacher_logits)
    targets = batch["decoder_target_tokens"]
    ce = -np.take_along_axis(lq, targets[..., None], -1)[..., 0]
    p, q = np.exp(lp), np.exp(lq)
    lm = np.log(beta * p + (1 - beta) * q)
    jsd = beta * (p * (lp - lm)).sum(-1) + (1 - beta) * (q * (lq - lm)).sum(-1)
    w, obj = batch["decoder_loss_weights"], batch["decoder_objective_ids"]
    loss = 0.0
    for k, (wk, gk) in enumerate(zip(LOSS.weights, LOSS.divergence_weights, strict=True)):
        mask = w * (obj == k)
        n = mask.sum()
        loss += wk * (mask * (1 - sampled) * ce).sum() / n + gk * (mask * jsd).sum() / n
    return loss


@pytest.mark.slow  # compiles a train step and the sampler
@pytest.mark.parametrize("fraction", [1.0])
def test_on_policy_targets_are_the_students_samples_and_the_loss_matches_numpy(fraction):
    _, batch = tiny_model_and_batch()
    student = EncoderDecoderModel(STUDENT)
    on_policy = distillation.OnPolicy(fraction, TEMPERATURE)
    params0, metrics, (loss,), params1 = _step(_trainer(on_policy), batch)
    # The step's key, as the trainer derives it; decoded here, outside the step.
    step_rng = jax.random.fold_in(jax.random.PRNGKey(SEED), 0)
    rows = on_policy.rows(8)
    samples = student.generate(
        params0,
        batch["encoder_input_tokens"][rows],
        max_decode_length=batch["decoder_target_tokens"].shape[1],
        method="sample",
        temperature=TEMPERATURE,
        rng=jax.random.fold_in(step_rng, SAMPLING_STREAM),
    )
    expected, sampled = _expected_batch(batch, rows, samples)
    # OnPolicy (as the step calls it) writes exactly these targets
    got = on_policy(student, params0, batch, jax.random.fold_in(step_rng, SAMPLING_STREAM))
    for key in expected:
        np.testing.assert_array_equal(np.asarray(got[key]), expected[key], err_msg=key)
    np.testing.assert_array_equal(np.asarray(got[SAMPLED_FEATURE]), sampled)
    # not vacuous: the samples are not the gold targets
    assert (expected["decoder_target_tokens"][rows] != batch["decoder_target_tokens"][rows]).any()
    assert (sampled.sum(1) > 0).sum() == len(rows)
    # The loss: numpy over the student's (with the step's dropout) and the teacher's logits.
    e = jax.tree.map(jnp.asarray, expected)
    teacher = _teacher()

    @jax.jit
    def logits(p, tp, b):
        s = student.logits(p, b["encoder_input_tokens"], b["decoder_input_tokens"],
                           enable_dropout=True, dropout_rng=step_rng)  # fmt: skip
        return s, teacher(tp, b)

    s_logits, t_logits = logits(params0, teacher.params, e)
    want = _numpy_loss(s_logits, t_logits, expected, sampled)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    # The update: SGD along the gradient of the same loss on the expected batch.
    e[SAMPLED_FEATURE] = jnp.asarray(sampled)
    loss_fn = lambda p: student.loss_fn(p, e, step_rng, LOSS, teacher=t_logits)[0]  # noqa: E731
    grads = jax.jit(jax.grad(loss_fn))(params0)
    for p0, g, p1 in zip(*map(jax.tree.leaves, (params0, grads, params1)), strict=True):
        np.testing.assert_allclose(p1, p0 - LR * np.asarray(g), rtol=1e-5, atol=1e-6)
    # The metrics: CE and accuracy over the gold tokens only, the divergence over all.
    np.testing.assert_allclose(metrics["sampled_tokens"], [
        sampled[expected["decoder_objective_ids"][:, 0] == k].sum() for k in (0, 1)])  # fmt: skip
    summary = summarize_metrics(metrics, ["label", "rationale"])
    assert summary["label/sampled_tokens"] == float(metrics["sampled_tokens"][0])
    if fraction == 1.0:
        assert "label/loss" not in summary and "label/divergence" in summary


def test_loss_mixes_supervised_and_sampled_rows():
    # lambda = 0.5 at the loss: CE on the gold rows only, the divergence on all, one denominator
    _, batch = tiny_model_and_batch()
    rows = distillation.OnPolicy(0.5).rows(8)
    samples = np.random.default_rng(1).integers(0, TINY.vocab_size, (len(rows), 10))
    expected, sampled = _expected_batch(batch, rows, samples)
    rng = np.random.default_rng(2)
    s_logits, t_logits = (rng.normal(size=(8, 10, TINY.vocab_size)) * 2 for _ in range(2))
    got, metrics = LOSS(jnp.asarray(s_logits, jnp.float32), dict(
        jax.tree.map(jnp.asarray, expected), **{SAMPLED_FEATURE: jnp.asarray(sampled)}),
        teacher=jnp.asarray(t_logits, jnp.float32))  # fmt: skip
    np.testing.assert_allclose(float(got), _numpy_loss(s_logits, t_logits, expected, sampled),
                               rtol=1e-5)  # fmt: skip
    assert 0 < sampled.sum() < expected["decoder_loss_weights"].sum()


def test_sampled_targets_end_at_the_first_eos():
    _, batch = tiny_model_and_batch()
    batch["decoder_loss_weights"][6] = 0  # a row without targets keeps none
    rows = np.array([0, 3, 6, 7])
    samples = np.array([[5, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # EOS at 1
                        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # EOS first
                        [4, 4, 1, 0, 0, 0, 0, 0, 0, 0],
                        list(range(2, 12))],  # no EOS: the whole row
                       np.int32)  # fmt: skip
    got = distillation.with_sampled_targets(batch, rows, jnp.asarray(samples))
    want, sampled = _expected_batch(batch, rows, samples)
    want["decoder_loss_weights"][6] = sampled[6] = 0
    want["decoder_target_tokens"][6] = want["decoder_input_tokens"][6] = 0
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), want[key], err_msg=key)
    np.testing.assert_array_equal(np.asarray(got[SAMPLED_FEATURE]), sampled)
    assert sampled.sum(1).tolist() == [2, 0, 0, 1, 0, 0, 0, 10]
    np.testing.assert_array_equal(got["decoder_target_tokens"][7], samples[3])
    np.testing.assert_array_equal(got["decoder_input_tokens"][7], [0, *samples[3][:-1]])


def test_on_policy_errors():
    student, batch = tiny_model_and_batch()
    packed = dict(batch, decoder_segment_ids=np.ones_like(batch["decoder_target_tokens"]))
    with pytest.raises(UserError, match="needs unpacked batches: set train.pack = False"):
        distillation.OnPolicy(0.5)(student, None, packed, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"KD.on_policy_fraction=1.5: not in \[0, 1\]"):
        distillation.KD(weights={"rationale": 1.0}, on_policy_fraction=1.5)
    with pytest.raises(ValueError, match="KD.sample_temperature=-1.0: must be >= 0"):
        distillation.KD(weights={"rationale": 1.0}, sample_temperature=-1.0)
    kd = distillation.KD(weights={"rationale": 1.0}, on_policy_fraction=0.5)
    with pytest.raises(UserError, match="needs an online teacher to score the student's samples"):
        distillation.build_teacher(kd, TINY.vocab_size, None)


# ---- a simulated mesh ------------------------------------------------------------------------


def _mesh_maxdiff() -> float:
    """Two on-policy steps (lambda 0.5, 2 microbatches) on a 2x2 (data x model) mesh against
    one device: the largest relative loss and absolute parameter difference."""
    assert jax.device_count() == 4, jax.devices()
    _, batch = tiny_model_and_batch()
    on_policy = distillation.OnPolicy(0.5, TEMPERATURE)
    *_, ref_losses, ref_params = _step(_trainer(on_policy, num_microbatches=2), batch, steps=2)
    mesh = Partitioner(create_mesh(2, 2), STANDARD_RULES)
    *_, losses, params = _step(_trainer(on_policy, mesh, num_microbatches=2), batch, steps=2)
    print("LOSSES", losses, ref_losses, flush=True)
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        worst = max(worst, float(np.max(np.abs(a - b))))
    return worst


@pytest.mark.slow  # a subprocess compiling two train steps
def test_sharded_on_policy_step_equals_one_device(subprocess_env):
    env = dict(subprocess_env, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "mesh"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (diff,) = [float(x.split()[1]) for x in out.stdout.splitlines() if x.startswith("MAXDIFF")]
    assert diff < 1e-5, diff


if __name__ == "__main__" and sys.argv[1:] == ["mesh"]:
    print("MAXDIFF", _mesh_maxdiff(), flush=True)
