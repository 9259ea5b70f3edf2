"""The Flax T5 against Hugging Face T5 (PyTorch) as the oracle, plus packing, bf16 and dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _hf_t5 import (
    VARIANTS,
    hf_logits,
    hf_state_dict,
    make_hf_model,
    random_tokens,
)
from _tiny_t5 import tiny_config

from distill_sbs import convert
from distill_sbs.models import EncoderDecoderModel
from distill_sbs.network import Packing, T5Config, relative_position_bucket


def _ours(hf_model, **overrides):
    config = convert.hf_config_to_t5config(hf_model.config.to_dict())
    if overrides:
        config = T5Config.from_dict({**config.to_dict(), **overrides})
    params = convert.hf_state_dict_to_params(hf_state_dict(hf_model), config)
    return EncoderDecoderModel(config), params


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_hf(variant):
    hf = make_hf_model(variant)
    model, params = _ours(hf)
    rng = np.random.default_rng(1)
    # lengths beyond max_distance (16) exercise the logarithmic buckets; padding in both stacks
    enc = random_tokens(rng, [24, 9, 17], 24)
    dec = np.concatenate([np.zeros((3, 1), np.int32), random_tokens(rng, [19, 5, 11], 19)], 1)
    expected = hf_logits(hf, enc, dec)
    got = np.asarray(jax.jit(model.logits)(params, enc, dec))
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_relative_position_bucket_matches_hf():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        for nb, md in ((32, 128), (8, 16)):
            expected = T5Attention._relative_position_bucket(
                __import__("torch").tensor(rel), bidirectional, nb, md
            ).numpy()
            got = relative_position_bucket(jnp.asarray(rel), bidirectional, nb, md)
            np.testing.assert_array_equal(np.asarray(got), expected)


def _pack(segments, width):
    """Packs [(tokens, ...)] rows of one stack into one row with segment ids and positions."""
    tokens = np.zeros((1, width), np.int32)
    seg = np.zeros((1, width), np.int32)
    pos = np.zeros((1, width), np.int32)
    start = 0
    for i, t in enumerate(segments):
        n = len(t)
        tokens[0, start : start + n] = t
        seg[0, start : start + n] = i + 1
        pos[0, start : start + n] = np.arange(n)
        start += n
    return tokens, seg, pos


@pytest.mark.parametrize("variant", ["t5_1_0", "t5_1_1"])
def test_packed_equals_each_segment_alone(variant):
    model, params = _ours(make_hf_model(variant))
    rng = np.random.default_rng(2)
    encs = [random_tokens(rng, [n], n)[0] for n in (7, 12, 5)]
    decs = [np.concatenate([[0], random_tokens(rng, [n], n)[0][:-1]]) for n in (6, 9, 4)]
    enc, enc_seg, enc_pos = _pack(encs, 28)
    dec, dec_seg, dec_pos = _pack(decs, 22)
    logits = jax.jit(model.logits)
    packed = np.asarray(
        logits(
            params,
            enc,
            dec,
            packing=Packing(enc_seg, dec_seg, enc_pos, dec_pos),
        )
    )
    start = 0
    for e, d in zip(encs, decs, strict=True):
        alone = np.asarray(logits(params, e[None], d[None]))[0]
        np.testing.assert_allclose(packed[0, start : start + len(d)], alone, atol=2e-5, rtol=1e-5)
        start += len(d)


def test_bfloat16_activations_float32_params_and_logits():
    hf = make_hf_model("t5_1_1")
    model32, params = _ours(hf)
    model16, _ = _ours(hf, dtype="bfloat16")
    rng = np.random.default_rng(3)
    enc = random_tokens(rng, [10, 6], 10)
    dec = np.concatenate([np.zeros((2, 1), np.int32), random_tokens(rng, [7, 3], 7)], 1)
    l32 = np.asarray(jax.jit(model32.logits)(params, enc, dec))
    l16 = jax.jit(model16.logits)(params, enc, dec)
    assert l16.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    l16 = np.asarray(l16)
    assert not np.array_equal(l16, l32)  # bf16 really ran
    # bf16 has ~3 significant digits: compare relative to the logits' scale
    assert np.max(np.abs(l16 - l32)) < 0.05 * np.max(np.abs(l32))
    # and the ranking is essentially kept
    assert np.mean(l16.argmax(-1) == l32.argmax(-1)) > 0.8


def test_dropout_is_random_by_rng_and_off_by_default():
    cfg = tiny_config(vocab_size=64, dropout_rate=0.3)
    model = EncoderDecoderModel(cfg)
    params = model.init_params(jax.random.PRNGKey(0))
    enc = np.array([[5, 6, 7, 1]], np.int32)
    dec = np.array([[0, 5, 6]], np.int32)
    logits = jax.jit(model.logits, static_argnames=("enable_dropout",))
    base = logits(params, enc, dec)
    np.testing.assert_array_equal(base, logits(params, enc, dec))
    a = logits(params, enc, dec, enable_dropout=True, dropout_rng=jax.random.PRNGKey(1))
    b = logits(params, enc, dec, enable_dropout=True, dropout_rng=jax.random.PRNGKey(1))
    c = logits(params, enc, dec, enable_dropout=True, dropout_rng=jax.random.PRNGKey(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, base) and not np.allclose(a, c)
    with pytest.raises(ValueError, match="dropout_rng"):
        model.logits(params, enc, dec, enable_dropout=True)


@pytest.mark.parametrize("rate", [0.1, 0.5])
@pytest.mark.parametrize("impl", ["raw", "threefry2x32", "rbg"])
def test_dropout_rate_scaling_and_independence(rate, impl):
    from distill_sbs.network import Dropout

    key = jax.random.PRNGKey(3) if impl == "raw" else jax.random.key(3, impl=impl)
    x = jnp.ones((64, 257, 33), jnp.float32)  # odd sizes: draws are four per threefry call
    y = np.asarray(Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": key}))
    kept = y != 0
    n = kept.size
    # the drop rate within 4 standard deviations of a Bernoulli(rate) count
    assert abs((1 - kept.mean()) - rate) < 4 * np.sqrt(rate * (1 - rate) / n)
    # kept values are scaled by the exact inverse of the keep probability: unbiased mean
    scale = np.unique(y[kept])
    assert scale.size == 1 and abs(scale[0] * (1 - rate) - 1) < 2**-15
    # independent positions: neighbours (in the last axis and across rows) are uncorrelated
    k = kept.astype(np.float64) - kept.mean()
    for a, b in [(k[..., 1:], k[..., :-1]), (k[1:], k[:-1])]:
        corr = np.mean(a * b) / np.var(k)
        assert abs(corr) < 4 / np.sqrt(a.size)
    # deterministic per key, different across keys, identity when deterministic
    again = Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": key})
    np.testing.assert_array_equal(y, again)
    other_key = jax.random.PRNGKey(4) if impl == "raw" else jax.random.key(4, impl=impl)
    other = Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": other_key})
    assert np.mean((np.asarray(other) != 0) == kept) < 1 - rate / 2
    np.testing.assert_array_equal(Dropout(rate).apply({}, x, deterministic=True), x)


def test_params_logical_axes_cover_every_parameter():
    model = EncoderDecoderModel(tiny_config(vocab_size=64))
    params = model.init_params(jax.random.PRNGKey(0))
    axes = model.params_logical_axes()
    flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_a = dict(
        jax.tree_util.tree_flatten_with_path(
            axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
        )[0]
    )
    assert len(flat_p) == len(flat_a)
    known = {
        "batch",
        "length",
        "embed",
        "mlp",
        "heads",
        "kv",
        "joined_kv",
        "vocab",
        "relpos_buckets",
    }
    for path, x in flat_p:
        spec = flat_a[path]
        assert isinstance(x, jax.Array) and x.dtype == jnp.float32
        assert len(spec) == x.ndim and set(spec) <= known, (path, spec)
    assert axes["token_embedder"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
