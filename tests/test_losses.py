"""The weighted objective loss against a plain numpy implementation of its definition."""

from __future__ import annotations

import numpy as np
import pytest

from distill_sbs.losses import ObjectiveLoss, summarize_metrics, weighted_objective_loss


def _numpy_loss(logits, targets, weights, obj_ids, obj_weights, label_smoothing=0.0, z_loss=0.0):
    b, n_len, v = logits.shape
    total = 0.0
    for k, w in enumerate(obj_weights):
        ce_sum, n = 0.0, 0.0
        for i in range(b):
            for j in range(n_len):
                if obj_ids[i, j] != k or weights[i, j] == 0:
                    continue
                x = logits[i, j].astype(np.float64)
                log_z = np.log(np.sum(np.exp(x - x.max()))) + x.max()
                logp = x - log_z
                if label_smoothing:
                    q = np.full(v, label_smoothing / (v - 1))
                    q[targets[i, j]] = 1 - label_smoothing
                    ce = -np.sum(q * logp) + np.sum(q * np.log(q))  # KL(q || p)
                else:
                    ce = -logp[targets[i, j]]
                ce_sum += weights[i, j] * (ce + z_loss * log_z**2)
                n += weights[i, j]
        if n:
            total += w * ce_sum / n
    return total


def _batch(seed=0, b=3, length=7, v=11, k=2):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, length, v)).astype(np.float32) * 3
    targets = rng.integers(0, v, size=(b, length))
    weights = (rng.random((b, length)) > 0.3).astype(np.float32)
    obj = rng.integers(0, k, size=(b, length))
    return logits, targets, weights, obj


@pytest.mark.parametrize("ls,zl", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.2, 1e-4)])
def test_matches_numpy_reference(ls, zl):
    logits, targets, weights, obj = _batch()
    w = np.array([0.5, 0.5], np.float32)
    loss, m = weighted_objective_loss(
        logits, targets, weights, obj, w, label_smoothing=ls, z_loss=zl
    )
    expected = _numpy_loss(logits, targets, weights, obj, w, ls, zl)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(m["tokens"]), [weights[obj == k].sum() for k in range(2)], rtol=0
    )


def test_dss_alpha_and_absent_objective():
    logits, targets, weights, obj = _batch(seed=1, k=3)
    obj = np.where(obj == 2, 0, obj)  # objective 2 absent from the batch
    w = np.array([0.3, 0.7, 5.0], np.float32)
    loss, m = weighted_objective_loss(logits, targets, weights, obj, w)
    np.testing.assert_allclose(
        float(loss), _numpy_loss(logits, targets, weights, obj, w), rtol=1e-5
    )
    assert float(m["tokens"][2]) == 0.0
    s = summarize_metrics({k: np.asarray(x) for k, x in m.items()}, ["label", "rationale", "x"])
    assert "x/loss" not in s and s["x/tokens"] == 0.0
    # token accuracy per objective
    hits = (logits.argmax(-1) == targets) * weights
    np.testing.assert_allclose(s["label/accuracy"], hits[obj == 0].sum() / weights[obj == 0].sum())


def test_microbatch_losses_add_up_with_full_batch_counts():
    logits, targets, weights, obj = _batch(seed=2, b=4)
    w = np.array([0.5, 0.5], np.float32)
    full, m = weighted_objective_loss(logits, targets, weights, obj, w)
    parts = [
        weighted_objective_loss(
            logits[i : i + 2],
            targets[i : i + 2],
            weights[i : i + 2],
            obj[i : i + 2],
            w,
            token_counts=m["tokens"],
        )[0]
        for i in (0, 2)
    ]
    np.testing.assert_allclose(float(sum(parts)), float(full), rtol=1e-6)


# ---- the distillation term: the same per-objective normalisation as the CE ---------------------


def _numpy_kd(logits, teacher, weights, obj_ids, gammas, counts=None):
    """sum_k gamma_k * (sum of KL(P_teacher || Q_student) over objective k's tokens) / n_k, by
    loops over tokens in float64; n_k from `counts` when given (the full batch's counts)."""
    total = 0.0
    for k, g in enumerate(gammas):
        kl_sum, n = 0.0, 0.0
        for i, j in np.ndindex(*obj_ids.shape):
            if obj_ids[i, j] != k or weights[i, j] == 0:
                continue
            s, t = logits[i, j].astype(np.float64), teacher[i, j].astype(np.float64)
            log_q = s - np.log(np.exp(s - s.max()).sum()) - s.max()
            log_p = t - np.log(np.exp(t - t.max()).sum()) - t.max()
            kl_sum += weights[i, j] * np.sum(np.exp(log_p) * (log_p - log_q))
            n += weights[i, j]
        n = n if counts is None else float(counts[k])
        if n:
            total += g * kl_sum / n
    return total


def test_distillation_term_matches_numpy_reference():
    """ObjectiveLoss with divergence weights: CE plus gamma_k * mean_k(KL), an absent objective
    adding 0, and microbatches with the full batch's counts adding up to the full-batch loss."""
    logits, targets, weights, obj = _batch(seed=3, b=4, k=3)
    obj = np.where(obj == 2, 1, obj)  # objective 2 absent from the batch
    teacher = np.random.default_rng(4).normal(size=logits.shape).astype(np.float32) * 2
    w, gammas = (0.4, 0.6, 1.0), (0.7, 0.2, 3.0)
    loss = ObjectiveLoss(w, divergence_weights=gammas, divergence="forward_kl")

    def batch(rows):
        return {
            "decoder_target_tokens": targets[rows],
            "decoder_loss_weights": weights[rows],
            "decoder_objective_ids": obj[rows],
        }

    full, m = loss(logits, batch(slice(None)), teacher=teacher)
    ce = _numpy_loss(logits, targets, weights, obj, w)
    kd = _numpy_kd(logits, teacher, weights, obj, gammas)
    assert kd > 0.1 * ce  # the term is large enough that a wrong normalisation would show
    np.testing.assert_allclose(float(full), ce + kd, rtol=1e-5)
    assert float(m["div_sum"][2]) == 0.0
    counts = m["tokens"]
    parts = []
    for rows in (slice(0, 1), slice(1, 4)):
        part, _ = loss(logits[rows], batch(rows), token_counts=counts, teacher=teacher[rows])
        want = _numpy_kd(logits[rows], teacher[rows], weights[rows], obj[rows], gammas, counts)
        np.testing.assert_allclose(
            float(part) - float(ObjectiveLoss(w)(logits[rows], batch(rows), counts)[0]),
            want,
            rtol=1e-5,
        )
        parts.append(float(part))
    np.testing.assert_allclose(sum(parts), float(full), rtol=1e-5)


# ---- the DSS reference loss, computed independently with Hugging Face T5 in PyTorch ----------


def _hf_reference(config, params, label_rows, rationale_rows, alpha):
    """alpha * label_loss + (1 - alpha) * rationale_loss: two HF forward passes, as DSS does."""
    import torch
    import transformers

    from distill_sbs.convert import params_to_hf_state_dict, t5config_to_hf_config

    hf_cfg = {k: v for k, v in t5config_to_hf_config(config).items() if k != "architectures"}
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf_cfg)).eval()
    if not config.logits_via_embedding:  # transformers 5 ties lm_head at construction; untie it
        model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
    state = {
        k: torch.from_numpy(v.copy()) for k, v in params_to_hf_state_dict(params, config).items()
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("embed_tokens" in k for k in missing), (missing, unexpected)
    loss = 0.0
    for rows, w in ((label_rows, alpha), (rationale_rows, 1 - alpha)):
        inp = torch.from_numpy(rows["inputs"]).long()
        labels = torch.from_numpy(rows["targets"]).long()
        labels = labels.masked_fill(labels == 0, -100)  # the collator's padding -> ignore_index
        out = model(input_ids=inp, attention_mask=(inp != 0).long(), labels=labels)
        loss = loss + w * out.loss
    loss.backward()
    grads = {k: p.grad.numpy() for k, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def _rows(rng, n, inp_len, tgt_len, vocab):
    inputs = np.zeros((n, inp_len), np.int32)
    targets = np.zeros((n, tgt_len), np.int32)
    for i in range(n):
        li, lt = rng.integers(3, inp_len + 1), rng.integers(2, tgt_len + 1)
        inputs[i, : li - 1] = rng.integers(2, vocab, li - 1)
        inputs[i, li - 1] = 1
        targets[i, : lt - 1] = rng.integers(2, vocab, lt - 1)
        targets[i, lt - 1] = 1
    return {"inputs": inputs, "targets": targets}


def test_loss_and_grads_equal_hf_dss_reference():
    import jax

    from distill_sbs.convert import params_to_hf_state_dict
    from distill_sbs.models import EncoderDecoderModel
    from distill_sbs.network import T5Config

    config = T5Config(
        vocab_size=48,
        emb_dim=16,
        num_heads=2,
        head_dim=8,
        mlp_dim=24,
        num_encoder_layers=2,
        num_decoder_layers=2,
    )
    model = EncoderDecoderModel(config)
    params = model.init_params(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    # Labels are short, rationales long: a plain token mean over the batch would differ a lot.
    label_rows, rat_rows = _rows(rng, 3, 10, 4, 48), _rows(rng, 3, 10, 14, 48)
    alpha = 0.3
    expected, hf_grads = _hf_reference(config, params, label_rows, rat_rows, alpha)

    tl = 14
    pad = lambda x: np.pad(x, ((0, 0), (0, tl - x.shape[1])))  # noqa: E731
    targets = np.concatenate([pad(label_rows["targets"]), rat_rows["targets"]])
    batch = {
        "encoder_input_tokens": np.concatenate([label_rows["inputs"], rat_rows["inputs"]]),
        "decoder_target_tokens": targets,
        "decoder_input_tokens": np.pad(targets, ((0, 0), (1, 0)))[:, :-1],
        "decoder_loss_weights": (targets > 0).astype(np.float32),
        "decoder_objective_ids": np.repeat([[0], [0], [0], [1], [1], [1]], tl, axis=1),
    }

    def loss_fn(p):
        return model.loss_fn(p, batch, None, ObjectiveLoss((alpha, 1 - alpha)))[0]

    loss, grads = jax.value_and_grad(loss_fn)(params)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    ours = params_to_hf_state_dict(jax.device_get(grads), config)
    checked = 0
    for key in (
        "shared.weight",
        "lm_head.weight",
        "encoder.block.0.layer.0.SelfAttention.q.weight",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "decoder.block.1.layer.1.EncDecAttention.o.weight",
        "decoder.block.1.layer.2.DenseReluDense.wi_0.weight",
        "decoder.final_layer_norm.weight",
    ):
        np.testing.assert_allclose(ours[key], hf_grads[key], rtol=1e-4, atol=1e-6, err_msg=key)
        checked += 1
    assert checked == 7
