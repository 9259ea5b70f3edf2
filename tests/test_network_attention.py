"""Attention through jax.nn.dot_product_attention (network.attention_impl, gin) against the einsum
path it replaces: logits, loss and gradients of the tiny T5 equal within float32 tolerance,
unpacked and packed (and under remat 'full'), with every encoder, decoder and cross-attention
really going through the fused call; greedy decoding unchanged; bfloat16 within bfloat16
tolerance; cuDNN where it cannot run, attention dropout and unknown names are one-line errors.
(cuDNN itself needs a GPU: benchmarks/device_check.py --attention cudnn --dropout 0.)"""

from __future__ import annotations

import collections
import dataclasses
import functools

import gin
import jax
import numpy as np
import pytest
from _tiny_t5 import tiny_config

from distill_sbs.errors import UserError
from distill_sbs.losses import ObjectiveLoss
from distill_sbs.models import EncoderDecoderModel
from distill_sbs.network import Packing, T5Config, attention_impl_of

LAYERS = 1
CONFIG = tiny_config(vocab_size=64, num_encoder_layers=LAYERS, num_decoder_layers=LAYERS)


@functools.cache
def _params():
    """The tiny model's float32 parameters, shared by every test here (their shapes do not
    depend on the activation dtype or dropout); one jitted init rather than eager op by op."""
    model = EncoderDecoderModel(CONFIG)
    return jax.jit(model.init_params)(jax.random.PRNGKey(0))


def _with_impl(impl: str, fn, remat: str = "none"):
    with gin.unlock_config():
        gin.bind_parameter("distill_sbs.network.attention_impl.impl", impl)
        gin.bind_parameter("distill_sbs.network.remat_policy.policy", remat)
    try:
        return fn()
    finally:
        gin.clear_config()


def _batch(packed: bool, rows: int = 3, inp: int = 14, tgt: int = 12) -> dict[str, np.ndarray]:
    """Random rows with trailing padding; packed: two or three examples per row."""
    rng = np.random.default_rng(1)
    feats: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    for r in range(rows):
        n = 1 + r if packed else 1
        enc_lens = rng.integers(2, inp // n, size=n)
        dec_lens = rng.integers(2, tgt // n, size=n)
        row = {k: np.zeros(inp if k.startswith("encoder") else tgt, np.int32) for k in _KEYS}
        e = d = 0
        for i, (el, dl) in enumerate(zip(enc_lens, dec_lens, strict=True)):
            row["encoder_input_tokens"][e : e + el] = rng.integers(2, CONFIG.vocab_size, el)
            row["encoder_segment_ids"][e : e + el] = i + 1
            row["encoder_positions"][e : e + el] = np.arange(el)
            targets = rng.integers(2, CONFIG.vocab_size, dl)
            targets[-1] = 1  # EOS
            row["decoder_target_tokens"][d : d + dl] = targets
            row["decoder_input_tokens"][d : d + dl] = np.concatenate([[0], targets[:-1]])
            row["decoder_loss_weights"][d : d + dl] = 1
            row["decoder_objective_ids"][d : d + dl] = i % 2
            row["decoder_segment_ids"][d : d + dl] = i + 1
            row["decoder_positions"][d : d + dl] = np.arange(dl)
            e, d = e + el, d + dl
        for k, v in row.items():
            feats[k].append(v)
    batch = {k: np.stack(v) for k, v in feats.items()}
    batch["decoder_loss_weights"] = batch["decoder_loss_weights"].astype(np.float32)
    if not packed:
        for k in _PACKING:
            del batch[k]
    return batch


_PACKING = ["encoder_segment_ids", "encoder_positions", "decoder_segment_ids", "decoder_positions"]
_KEYS = [
    "encoder_input_tokens",
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_loss_weights",
    "decoder_objective_ids",
] + _PACKING


def _fused_calls(monkeypatch) -> collections.Counter:
    """Counts jax.nn.dot_product_attention's calls by kind (encoder, decoder self, cross)."""
    calls: collections.Counter = collections.Counter()
    real = jax.nn.dot_product_attention

    def spy(q, k, v, bias=None, mask=None, **kw):
        kind = "cross" if bias is None else ("self" if kw["is_causal"] else "encoder")
        calls[kind] += 1
        assert kw["scale"] == 1.0
        return real(q, k, v, bias, mask, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    return calls


def _logits_loss_grads(
    impl: str, config: T5Config, batch: dict[str, np.ndarray], remat: str = "none"
):
    model = EncoderDecoderModel(config)
    params = _params()
    loss = ObjectiveLoss((0.5, 0.5))

    def f(p):
        logits = model.logits(
            p,
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            packing=Packing.from_features(batch),
        )
        return loss(logits, batch, None, None)[0], logits

    (value, logits), grads = _with_impl(
        impl, lambda: jax.jit(jax.value_and_grad(f, has_aux=True))(params), remat
    )
    return logits, value, grads


@functools.cache
def _einsum_float32(packed: bool):
    """The oracle: today's einsum step on the float32 tiny model (shared by two tests)."""
    return _logits_loss_grads("einsum", CONFIG, _batch(packed))


@pytest.mark.parametrize(
    "packed, remat",
    [(False, "none"), (True, "none"), (True, "full")],
    ids=["unpacked", "packed", "packed-remat-full"],
)
def test_xla_path_equals_einsum_float32(packed, remat, monkeypatch):
    logits0, loss0, grads0 = _einsum_float32(packed)
    calls = _fused_calls(monkeypatch)
    logits1, loss1, grads1 = _logits_loss_grads("xla", CONFIG, _batch(packed), remat)
    assert calls == {"encoder": LAYERS, "self": LAYERS, "cross": LAYERS}
    np.testing.assert_allclose(logits1, logits0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    flat0, flat1 = jax.tree.leaves(grads0), jax.tree.leaves(grads1)
    assert len(flat0) == len(flat1) > 10
    for a, b in zip(flat0, flat1, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    # the relative position tables learn through the bias passed to the fused call
    rel = grads1["encoder"]["relpos_bias"]["rel_embedding"]
    assert float(np.abs(rel).max()) > 0


def test_xla_path_equals_einsum_bfloat16():
    config = dataclasses.replace(CONFIG, dtype="bfloat16")
    batch = _batch(packed=True)
    logits0, loss0, grads0 = _logits_loss_grads("einsum", config, batch)
    logits1, loss1, grads1 = _logits_loss_grads("xla", config, batch)
    # bfloat16 keeps 8 bits: the einsum path rounds the scores to it, the fused one does not
    np.testing.assert_allclose(loss1, loss0, rtol=1e-2)
    np.testing.assert_allclose(logits1, logits0, atol=0.1)
    for a, b in zip(jax.tree.leaves(grads0), jax.tree.leaves(grads1), strict=True):
        assert np.linalg.norm(b - a) <= 0.05 * np.linalg.norm(a) + 1e-6


def test_greedy_decoding_unchanged(monkeypatch):
    """The cache is created through the fused call; the cached steps are einsum's."""
    enc = _batch(packed=False)["encoder_input_tokens"]

    def decode(impl: str):
        model = EncoderDecoderModel(CONFIG)  # its own compiled generate per implementation
        params = _params()
        return _with_impl(
            impl, lambda: model.generate(params, enc, max_decode_length=6, logprobs_top_k=2)
        )

    ids0, logp0 = decode("einsum")[:2]
    calls = _fused_calls(monkeypatch)
    ids1, logp1 = decode("xla")[:2]
    assert calls["self"] == calls["cross"] == LAYERS
    np.testing.assert_array_equal(ids1, ids0)
    np.testing.assert_allclose(logp1, logp0, rtol=1e-5, atol=1e-5)


def _first_error(impl: str, fn) -> str:
    with pytest.raises(UserError) as e:
        _with_impl(impl, fn)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_cudnn_off_gpu_float32_and_unknown_are_one_line_errors(monkeypatch):
    bf16 = dataclasses.replace(CONFIG, dtype="bfloat16")
    assert "needs an NVIDIA GPU" in _first_error("cudnn", lambda: attention_impl_of(bf16))
    assert "unknown 'flash'" in _first_error("flash", lambda: attention_impl_of(bf16))
    # on a GPU backend: float32 activations are refused before cuDNN is asked
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert "T5Config.dtype = 'bfloat16'" in _first_error("cudnn", lambda: attention_impl_of(CONFIG))
    # and cuDNN's own refusal (here: none installed) is one line naming the setting
    model = EncoderDecoderModel(bf16)
    params = _params()
    batch = _batch(packed=False)
    message = _first_error(
        "cudnn",
        lambda: model.logits(params, batch["encoder_input_tokens"], batch["decoder_input_tokens"]),
    )
    assert message.startswith("attention_impl.impl = 'cudnn': ")


def test_attention_dropout_on_fused_path_is_an_error():
    model = EncoderDecoderModel(dataclasses.replace(CONFIG, dropout_rate=0.1))
    params = _params()
    batch = _batch(packed=False)
    message = _first_error(
        "xla",
        lambda: model.loss_fn(params, batch, jax.random.PRNGKey(1), ObjectiveLoss((0.5, 0.5))),
    )
    assert "T5Config.dropout_rate = 0" in message


def test_gin_name():
    gin.parse_config("attention_impl.impl = 'xla'")
    try:
        assert attention_impl_of(CONFIG) == "xla"
    finally:
        gin.clear_config()
    assert attention_impl_of(CONFIG) == "einsum"
