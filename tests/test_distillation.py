"""Logit distillation: divergences against numpy references, gradients by finite differences,
top-k with k = vocab equal to full logits, the loss exact under packing and microbatching, the
online teacher, the saved top-k format and its errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tiny_t5 import tiny_config

from distill_sbs import distillation
from distill_sbs.data import topk as topk_store
from distill_sbs.losses import ObjectiveLoss, distillation_divergence
from distill_sbs.models import EncoderDecoderModel
from distill_sbs.partitioning import create_partitioner
from distill_sbs.teachers import topk
from distill_sbs.trainer import Trainer

# (kind, mixing weight: beta of jsd, skew a of the skew KLs, unused by the plain KLs)
KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.9), ("skew_kl", 0.1),
         ("skew_reverse_kl", 0.6)]  # fmt: skip


def _mixing(kind, mix):
    """distillation_divergence's keyword for the kind's mixing weight."""
    return {"jsd": {"beta": mix}, "skew_kl": {"skew": mix}, "skew_reverse_kl": {"skew": mix}}.get(
        kind, {}
    )


# ---- numpy references of the definitions (float64) --------------------------------------------


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_div(log_p, log_q, kind, mix):
    p, q = np.exp(log_p), np.exp(log_q)

    def kl(a, la, lb):
        return np.where(a > 0, a * (la - lb), 0.0).sum(-1)

    if kind == "forward_kl":
        return kl(p, log_p, log_q)
    if kind == "reverse_kl":
        return kl(q, log_q, log_p)
    if kind == "skew_kl":  # KL(P || a P + (1 - a) Q)
        return kl(p, log_p, np.log(mix * p + (1 - mix) * q))
    if kind == "skew_reverse_kl":  # KL(Q || (1 - a) P + a Q)
        return kl(q, log_q, np.log((1 - mix) * p + mix * q))
    m = mix * p + (1 - mix) * q
    return mix * kl(p, log_p, np.log(m)) + (1 - mix) * kl(q, log_q, np.log(m))


def _np_full(student, teacher, kind, mix, t):
    return _np_div(_log_softmax(teacher / t), _log_softmax(student / t), kind, mix)


def _np_topk(student, ids, teacher_lp, kind, mix, t):
    """Buckets: the k ids plus the rest, from the definition (sums of probabilities)."""
    q = np.exp(_log_softmax(student))
    q_top = np.take_along_axis(q, ids, -1)
    p_top = np.exp(teacher_lp)
    p = np.concatenate([p_top, 1 - p_top.sum(-1, keepdims=True)], -1)
    q = np.concatenate([q_top, 1 - q_top.sum(-1, keepdims=True)], -1)
    return _np_div(_log_softmax(np.log(p) / t), _log_softmax(np.log(q) / t), kind, mix)


def _logits(seed, shape=(3, 5, 17), scale=3.0):
    return np.random.default_rng(seed).normal(size=shape) * scale


@pytest.mark.parametrize("kind,mix", KINDS)
@pytest.mark.parametrize("t,t2", [(1.0, False), (2.0, True), (0.7, False)])
def test_full_logits_match_numpy(kind, mix, t, t2):
    s, te = _logits(0), _logits(1)
    with jax.enable_x64(True):
        got = distillation_divergence(
            jnp.asarray(s),
            jnp.asarray(te),
            kind=kind,
            **_mixing(kind, mix),
            temperature=t,
            scale_by_t2=t2,
        )
        got = np.asarray(got)
    want = _np_full(s, te, kind, mix, t) * (t * t if t2 else 1.0)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert (want >= -1e-12).all()


@pytest.mark.parametrize("kind,mix", KINDS)
@pytest.mark.parametrize("t", [1.0, 1.5])
def test_topk_matches_numpy(kind, mix, t):
    s, te = _logits(2), _logits(3)
    lp = _log_softmax(te)
    ids = np.argsort(-lp, -1)[..., :4]
    top_lp = np.take_along_axis(lp, ids, -1)
    with jax.enable_x64(True):
        top = (jnp.asarray(ids), jnp.asarray(top_lp))
        got = distillation_divergence(
            jnp.asarray(s), top, kind=kind, **_mixing(kind, mix), temperature=t
        )
        got = np.asarray(got)
    np.testing.assert_allclose(got, _np_topk(s, ids, top_lp, kind, mix, t), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind,mix", KINDS)
def test_topk_with_k_equal_vocab_equals_full_logits(kind, mix):
    s, te = _logits(4), _logits(5)
    lp = _log_softmax(te)
    ids = np.argsort(-lp, -1)  # every id, best first
    top = (jnp.asarray(ids), jnp.asarray(np.take_along_axis(lp, ids, -1), jnp.float32))
    s32 = jnp.asarray(s, jnp.float32)
    full = distillation_divergence(
        s32, jnp.asarray(te, jnp.float32), kind=kind, **_mixing(kind, mix)
    )
    sparse = distillation_divergence(s32, top, kind=kind, **_mixing(kind, mix))
    np.testing.assert_allclose(np.asarray(sparse), np.asarray(full), atol=2e-6)
    mixing = _mixing(kind, mix)
    g_full = jax.grad(
        lambda x: distillation_divergence(x, jnp.asarray(te), kind=kind, **mixing).sum()
    )(s32)
    g_top = jax.grad(lambda x: distillation_divergence(x, top, kind=kind, **mixing).sum())(s32)
    np.testing.assert_allclose(np.asarray(g_top), np.asarray(g_full), atol=2e-6)


@pytest.mark.parametrize("kind,mix", KINDS)
@pytest.mark.parametrize("sparse", [False, True])
def test_gradients_by_finite_differences(kind, mix, sparse):
    s, te = _logits(6, (2, 3, 7)), _logits(7, (2, 3, 7))
    lp = _log_softmax(te)
    ids = np.argsort(-lp, -1)[..., :3]
    teacher = (ids, np.take_along_axis(lp, ids, -1)) if sparse else te
    direction = np.random.default_rng(8).normal(size=s.shape)
    with jax.enable_x64(True):
        tj = jax.tree.map(jnp.asarray, teacher)

        def f(x):
            return jnp.sum(
                distillation_divergence(x, tj, kind=kind, **_mixing(kind, mix), temperature=1.3)
            )

        grad = np.asarray(jax.grad(f)(jnp.asarray(s)))
        eps = 1e-6
        numeric = (float(f(s + eps * direction)) - float(f(s - eps * direction))) / (2 * eps)
    np.testing.assert_allclose(np.sum(grad * direction), numeric, rtol=1e-6, atol=1e-8)


def _value_and_grad(student, teacher, **kw):
    f = lambda x: distillation_divergence(x, teacher, **kw)  # noqa: E731
    return f(student), jax.grad(lambda x: f(x).sum())(student)


def _teachers(seed):
    """(full logits, top-4 of them) of one teacher (float64 under enable_x64)."""
    te = _logits(seed)
    lp = _log_softmax(te)
    ids = np.argsort(-lp, -1)[..., :4]
    return jnp.asarray(te), (jnp.asarray(ids), jnp.asarray(np.take_along_axis(lp, ids, -1)))


@pytest.mark.parametrize("sparse", [False, True])
def test_skew_kls_at_zero_are_forward_and_reverse_kl(sparse):
    with jax.enable_x64(True):
        s, teacher = jnp.asarray(_logits(11)), _teachers(12)[sparse]
        for skew_kind, plain in (("skew_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")):
            got = _value_and_grad(s, teacher, kind=skew_kind, skew=0.0, temperature=1.3)
            want = _value_and_grad(s, teacher, kind=plain, temperature=1.3)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-12, rtol=1e-12)
            # and a skew moves it: the test compares distinct functions
            assert not np.allclose(_value_and_grad(s, teacher, kind=skew_kind, skew=0.1)[0],
                                   want[0])  # fmt: skip


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("beta", [0.2, 0.9])
def test_jsd_is_the_weighted_sum_of_the_skew_kls(beta, sparse):
    # JSD(beta) = beta KL(P||M) + (1-beta) KL(Q||M) with M = beta P + (1-beta) Q
    #           = beta SKL_beta(P||Q) + (1-beta) SRKL_(1-beta)(P||Q), exactly (values and grads).
    with jax.enable_x64(True):
        s, teacher = jnp.asarray(_logits(13)), _teachers(14)[sparse]
        jsd = _value_and_grad(s, teacher, kind="jsd", beta=beta, temperature=0.8)
        skl = _value_and_grad(s, teacher, kind="skew_kl", skew=beta, temperature=0.8)
        srkl = _value_and_grad(s, teacher, kind="skew_reverse_kl", skew=1 - beta, temperature=0.8)
        for j, a, b in zip(jsd, skl, srkl, strict=True):
            np.testing.assert_allclose(
                np.asarray(j), beta * np.asarray(a) + (1 - beta) * np.asarray(b), atol=1e-12
            )


def test_no_gradient_reaches_the_teacher():
    s, te = jnp.asarray(_logits(9)), jnp.asarray(_logits(10))
    g = jax.grad(lambda t: distillation_divergence(s, t, kind="jsd").sum())(te)
    assert not np.asarray(g).any()


def test_bad_arguments_raise_one_clear_error():
    s = jnp.zeros((2, 3, 8))
    with pytest.raises(ValueError, match="teacher vocabulary \\(9\\) differs"):
        distillation_divergence(s, jnp.zeros((2, 3, 9)))
    with pytest.raises(ValueError, match="expected one of"):
        distillation_divergence(s, s, kind="kl")
    with pytest.raises(ValueError, match="0 < beta < 1"):
        distillation_divergence(s, s, kind="jsd", beta=1.0)
    for kind, skew in (("skew_kl", 1.0), ("skew_reverse_kl", -0.1)):
        with pytest.raises(ValueError, match=f"{kind} needs 0 <= skew < 1"):
            distillation_divergence(s, s, kind=kind, skew=skew)
    with pytest.raises(ValueError, match="KD.skew=1.0: skew_kl needs 0 <= skew < 1"):
        distillation.KD(weights={"rationale": 1.0}, kind="skew_kl", skew=1.0)
    with pytest.raises(ValueError, match="no teacher"):
        ObjectiveLoss((1.0,), divergence_weights=(0.5,))(s, _batch_of(s))


def _batch_of(logits):
    b, n = logits.shape[:2]
    return {
        "decoder_target_tokens": jnp.ones((b, n), jnp.int32),
        "decoder_loss_weights": jnp.ones((b, n)),
    }


# ---- the loss in a model: packing, microbatching, online teacher ------------------------------

STUDENT = tiny_config(vocab_size=64)
TEACHER = tiny_config(vocab_size=64, emb_dim=24, num_encoder_layers=2, num_decoder_layers=2)


def _examples(seed=0, n=4):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        inp = list(rng.integers(2, 64, rng.integers(3, 7))) + [1]
        tgt = list(rng.integers(2, 64, rng.integers(2, 6))) + [1]
        out.append((inp, tgt, i % 2))
    return out


def _unpacked(examples, li=8, lt=8):
    b = len(examples)
    f = {k: np.zeros((b, n), np.int32) for k, n in [("encoder_input_tokens", li),
         ("decoder_target_tokens", lt), ("decoder_input_tokens", lt),
         ("decoder_objective_ids", lt)]}  # fmt: skip
    f["decoder_loss_weights"] = np.zeros((b, lt), np.float32)
    for r, (inp, tgt, obj) in enumerate(examples):
        f["encoder_input_tokens"][r, : len(inp)] = inp
        f["decoder_target_tokens"][r, : len(tgt)] = tgt
        f["decoder_input_tokens"][r, 1 : len(tgt)] = tgt[:-1]
        f["decoder_objective_ids"][r, : len(tgt)] = obj
        f["decoder_loss_weights"][r, : len(tgt)] = 1.0
    return f


def _packed(examples, li=16, lt=16):
    """Two examples per row, as seqio's packer lays them out."""
    rows = [examples[i : i + 2] for i in range(0, len(examples), 2)]
    keys = ["encoder_input_tokens", "encoder_segment_ids", "encoder_positions",
            "decoder_target_tokens", "decoder_input_tokens", "decoder_segment_ids",
            "decoder_positions", "decoder_objective_ids"]  # fmt: skip
    f = {k: np.zeros((len(rows), li if k.startswith("enc") else lt), np.int32) for k in keys}
    f["decoder_loss_weights"] = np.zeros((len(rows), lt), np.float32)
    for r, row in enumerate(rows):
        ei = di = 0
        for seg, (inp, tgt, obj) in enumerate(row, start=1):
            f["encoder_input_tokens"][r, ei : ei + len(inp)] = inp
            f["encoder_segment_ids"][r, ei : ei + len(inp)] = seg
            f["encoder_positions"][r, ei : ei + len(inp)] = np.arange(len(inp))
            sl = slice(di, di + len(tgt))
            f["decoder_target_tokens"][r, sl] = tgt
            f["decoder_input_tokens"][r, di + 1 : di + len(tgt)] = tgt[:-1]
            f["decoder_segment_ids"][r, sl] = seg
            f["decoder_positions"][r, sl] = np.arange(len(tgt))
            f["decoder_objective_ids"][r, sl] = obj
            f["decoder_loss_weights"][r, sl] = 1.0
            ei, di = ei + len(inp), di + len(tgt)
    return f


def _teacher():
    model = EncoderDecoderModel(TEACHER)
    params = model.init_params(jax.random.PRNGKey(7))
    return distillation.OnlineTeacher(model, params, None)


LOSS = ObjectiveLoss((0.5, 0.5), divergence_weights=(0.3, 0.7), divergence="jsd", beta=0.4)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_packed_equals_unpacked(kind):
    student = EncoderDecoderModel(STUDENT)
    params = student.init_params(jax.random.PRNGKey(1))
    teacher = _teacher()
    loss = ObjectiveLoss((0.5, 0.5), divergence_weights=(0.3, 0.7), divergence=kind)
    out = []
    for batch in (_unpacked(_examples()), _packed(_examples())):
        batch = jax.tree.map(jnp.asarray, batch)
        t = teacher(teacher.params, batch)
        out.append(student.loss_fn(params, batch, None, loss, teacher=t))
    np.testing.assert_allclose(float(out[0][0]), float(out[1][0]), rtol=1e-5)
    np.testing.assert_allclose(out[0][1]["div_sum"], out[1][1]["div_sum"], rtol=1e-5)
    assert float(out[0][1]["div_sum"].sum()) > 0


def _trainer(teacher, num_microbatches, loss=LOSS):
    fields = {f: getattr(loss, f) for f in ("divergence_weights", "divergence", "beta")}
    return Trainer(
        EncoderDecoderModel(STUDENT),
        optax.sgd(0.5),
        create_partitioner(),
        loss.weights,
        num_microbatches=num_microbatches,
        teacher=teacher,
        divergence=fields,
    )


@pytest.mark.slow  # compiles train steps (about a minute on a shared CPU)
def test_microbatched_equals_full_batch_online_teacher():
    batch = _unpacked(_examples(n=8))
    results = []
    for m in (1, 4):
        tr = _trainer(_teacher(), m)
        state, metrics = tr.train_step(tr.init_state(jax.random.PRNGKey(0)), batch)
        results.append((metrics, jax.device_get(state.params)))
    (m1, p1), (m4, p4) = results
    np.testing.assert_allclose(float(m1["loss_sum"]), float(m4["loss_sum"]), rtol=1e-6)
    np.testing.assert_allclose(m1["div_sum"], m4["div_sum"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The KD term moved the student: without it the update differs.
    plain = Trainer(
        EncoderDecoderModel(STUDENT), optax.sgd(0.5), create_partitioner(), LOSS.weights
    )
    state, _ = plain.train_step(plain.init_state(jax.random.PRNGKey(0)), batch)
    assert not np.allclose(jax.tree.leaves(jax.device_get(state.params))[0], jax.tree.leaves(p1)[0])


def _with_topk(batch, k):
    """The batch plus its teacher's top-k as encoded features (what the converter emits)."""
    t = _teacher()
    logp = np.asarray(jax.nn.log_softmax(t(t.params, jax.tree.map(jnp.asarray, batch)), -1))
    ids = np.argsort(-logp, -1)[..., :k]
    lp = np.take_along_axis(logp, ids, -1)
    enc_ids, enc_lp = topk_store.encode(ids, lp)
    pad = batch["decoder_loss_weights"][..., None] == 0
    return {**batch, topk_store.ID_FEATURE: np.where(pad, 0, enc_ids),
            topk_store.LOGPROB_FEATURE: np.where(pad, 0, enc_lp)}  # fmt: skip


@pytest.mark.slow  # compiles train steps (about a minute on a shared CPU)
def test_offline_topk_vocab_equals_online_and_microbatches_add_up():
    batch = _with_topk(_unpacked(_examples(n=8)), k=STUDENT.vocab_size)
    online = _trainer(_teacher(), 1)
    s_on, m_on = online.train_step(online.init_state(jax.random.PRNGKey(0)), batch)
    outs = []
    for m in (1, 2):
        tr = _trainer(distillation.OfflineTopK(), m)
        state, metrics = tr.train_step(tr.init_state(jax.random.PRNGKey(0)), batch)
        outs.append((metrics, jax.device_get(state.params)))
    for metrics, params in outs:
        np.testing.assert_allclose(float(metrics["loss_sum"]), float(m_on["loss_sum"]), rtol=1e-5)
        online_params = jax.tree.leaves(jax.device_get(s_on.params))
        for a, b in zip(jax.tree.leaves(params), online_params, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_offline_topk_k_larger_than_stored():
    batch = jax.tree.map(jnp.asarray, _with_topk(_unpacked(_examples()), k=3))
    ids, lp = distillation.OfflineTopK(2)(None, batch)
    assert ids.shape[-1] == 2 and np.isfinite(np.asarray(lp)).all()
    with pytest.raises(ValueError, match="KD.topk=5 is larger than the 3 stored"):
        distillation.OfflineTopK(5)(None, batch)


# ---- the top-k file ---------------------------------------------------------------------------


def _entries(k=3, vocab=50):
    rng = np.random.default_rng(0)
    out = []
    for i in range(3):
        n = 2 + i
        logits = rng.normal(size=(n, vocab))
        lp = _log_softmax(logits)
        ids = np.argsort(-lp, -1)[:, :k]
        out.append(
            (f"r{i}", "rationale", rng.integers(2, vocab, n), ids, np.take_along_axis(lp, ids, -1))
        )
    return out


def test_topk_file_round_trip_and_size(tmp_path):
    path = str(tmp_path / "t.npz")
    entries = _entries()
    topk_store.save(path, entries, vocab_size=50)
    store = topk_store.load(path)
    targets, ids, lp = store.entry("r1", "rationale")
    np.testing.assert_array_equal(targets, entries[1][2])
    np.testing.assert_array_equal(ids, entries[1][3])
    np.testing.assert_allclose(lp, entries[1][4], atol=2e-3)  # float16 storage
    # ids 2 + 3 x 2 bytes + log-probs 3 x 2 bytes per token, plus the npz headers
    assert 14 <= topk_store.bytes_per_token(path) < 14 + 2000 / 9
    enc_ids, enc_lp = topk_store.encode(ids, lp.astype(np.float32))
    assert (enc_ids != 0).all() and (enc_lp != 0).all()
    d_ids, d_lp = topk_store.decode_features(jnp.asarray(enc_ids), jnp.asarray(enc_lp))
    np.testing.assert_array_equal(np.asarray(d_ids), ids)
    np.testing.assert_array_equal(np.asarray(d_lp), lp.astype(np.float32))


def test_topk_file_errors(tmp_path):
    path = str(tmp_path / "t.npz")
    bad = _entries()
    bad[1] = (*bad[1][:4], np.where(np.arange(3) == 1, np.nan, bad[1][4]))
    with pytest.raises(topk_store.TopKError, match="NaN log-probability at target token 0"):
        topk_store.save(path, bad, vocab_size=50)
    topk_store.save(path, _entries(), vocab_size=50)
    store = topk_store.load(path)
    with pytest.raises(topk_store.TopKError, match="no top-k entry for example 'r9'"):
        store.entry("r9", "rationale")

    class Vocab:
        def encode(self, text):
            return [int(t) for t in text.split()]

    targets = store.entry("r0", "rationale")[0]
    ok = {"id": "r0", "targets": " ".join(map(str, targets[:-1]))}
    eos = int(targets[-1])  # the stored targets are random ids: their last one plays EOS
    assert topk_store.EXAMPLE_IDS in topk_store.attach([ok], store, Vocab(), "rationale", eos)[0]
    longer = {"id": "r0", "targets": ok["targets"] + " 7"}
    with pytest.raises(topk_store.TopKError, match="has 2 tokens, the record's 3"):
        topk_store.attach([longer], store, Vocab(), "rationale", eos)
    other = {"id": "r0", "targets": str(int(targets[0]) + 1)}
    with pytest.raises(topk_store.TopKError, match="same length, other tokens"):
        topk_store.attach([other], store, Vocab(), "rationale", eos)


def test_online_teacher_vocabulary_must_match(tmp_path):
    from distill_sbs import checkpoints

    model = EncoderDecoderModel(TEACHER)
    checkpoints.save_native(
        str(tmp_path / "t"), model.init_params(jax.random.PRNGKey(0)), TEACHER, None
    )
    with pytest.raises(ValueError, match="its vocabulary has 64 ids, the student's 32"):
        distillation.load_online_teacher(str(tmp_path / "t"), 32, create_partitioner())
    t = distillation.load_online_teacher(
        str(tmp_path / "t"), 64, create_partitioner(), dtype="bfloat16"
    )
    assert jax.tree.leaves(t.params)[0].dtype == jnp.bfloat16


@pytest.mark.slow  # writes top-k for 800 examples and builds packed and unpacked batches
def test_saved_topk_through_the_feature_converter_matches_the_teacher(tmp_path):
    import distill_sbs.tasks  # noqa: F401  registers arith
    import gin

    from distill_sbs import data
    from distill_sbs.network import Packing

    model = EncoderDecoderModel(tiny_config())
    params = model.init_params(jax.random.PRNGKey(3))
    path = str(tmp_path / "arith.topk.npz")
    size = topk.write_topk(model, params, "arith_dss", path, k=4, batch_size=64)
    assert 4 * 2 * 2 + 2 <= size < 4 * 2 * 2 + 6  # uint16 ids, float16 log-probs, target, keys
    gin.bind_parameter("teacher_topk_path.path", path)
    try:
        for pack in (True, False):
            ds = data.get_dataset(
                "arith_dss", task_feature_lengths={"inputs": 64, "targets": 64}, split="train",
                batch_size=4, shuffle=False, pack=pack, repeat=False,
            )  # fmt: skip
            batch = next(ds.as_numpy_iterator())
            ids, lp = distillation.OfflineTopK()(None, jax.tree.map(jnp.asarray, batch))
            logits = model.logits(
                params, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                packing=Packing.from_features(batch),
            )  # fmt: skip
            online = np.asarray(jax.nn.log_softmax(logits, -1))
            real = batch["decoder_loss_weights"] > 0
            assert real.sum() > 0 and ids.shape[-1] == 4
            at_ids = np.take_along_axis(online, np.asarray(ids), -1)
            np.testing.assert_allclose(np.asarray(lp)[real], at_ids[real], atol=5e-3)
            best = -np.sort(-online, -1)[..., :4]
            np.testing.assert_allclose(at_ids[real], best[real], atol=1e-5)
    finally:
        gin.bind_parameter("teacher_topk_path.path", None)


def test_offline_teacher_checks_vocabulary_and_k(tmp_path):
    import gin

    path = str(tmp_path / "t.npz")
    topk_store.save(path, _entries(k=3, vocab=50), vocab_size=50)
    kd = distillation.KD(weights={"rationale": 1.0})
    with pytest.raises(ValueError, match="no top-k file is set"):
        distillation.build_teacher(kd, 50, create_partitioner())
    gin.bind_parameter("teacher_topk_path.path", path)
    try:
        with pytest.raises(ValueError, match="teacher with 50 vocabulary ids, the student has 64"):
            distillation.build_teacher(kd, 64, create_partitioner())
        with pytest.raises(ValueError, match="KD.topk=4 is larger than the 3 stored"):
            distillation.build_teacher(
                distillation.KD(weights={"rationale": 1.0}, topk=4), 50, create_partitioner()
            )
        teacher = distillation.build_teacher(kd, 50, create_partitioner())
        assert isinstance(teacher, distillation.OfflineTopK)
    finally:
        gin.bind_parameter("teacher_topk_path.path", None)
    with pytest.raises(ValueError, match="names objective\\(s\\) \\['rationale'\\]"):
        kd.loss_fields(["label"])
