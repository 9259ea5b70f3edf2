"""Decoding against HF generate (greedy, 4-beam search), and the sampling options."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from _hf_t5 import hf_generate, hf_state_dict, make_hf_model, random_tokens

from distill_sbs import convert
from distill_sbs.models import EncoderDecoderModel
from distill_sbs.network import EOS_ID

# EOS strengths (see make_hf_model) that give these inputs both stopped and running rows
EOS_BIAS = {"t5_1_0": 4.0, "t5_1_1": 16.0}


def _pair(variant, eos_bias):
    hf = make_hf_model(variant, seed=3, eos_bias=eos_bias)
    config = convert.hf_config_to_t5config(hf.config.to_dict())
    params = convert.hf_state_dict_to_params(hf_state_dict(hf), config)
    return hf, EncoderDecoderModel(config), params


def _check_eos_layout(tokens):
    """After the first EOS there are only zeros."""
    for row in np.asarray(tokens):
        hits = np.flatnonzero(row == EOS_ID)
        if hits.size:
            assert not row[hits[0] + 1 :].any(), row


@pytest.mark.parametrize("variant", ["t5_1_0", "t5_1_1"])
def test_greedy_equals_hf(variant):
    # eos_bias makes some rows stop early, so that EOS handling is compared too
    hf, model, params = _pair(variant, eos_bias=EOS_BIAS[variant])
    enc = random_tokens(np.random.default_rng(4), [13, 6, 20, 9, 3], 20)
    expected = hf_generate(hf, enc, max_new_tokens=12)
    got = np.asarray(model.generate(params, enc, max_decode_length=12))
    assert got.dtype == np.int32 and got.shape == (5, 12)
    np.testing.assert_array_equal(got, expected)
    stopped = (expected == EOS_ID).any(1)
    assert stopped.any() and not stopped.all(), "test needs rows that stop and rows that do not"
    _check_eos_layout(got)


@pytest.mark.parametrize("variant", ["t5_1_0", "t5_1_1"])
def test_beam_search_best_sequence_equals_hf(variant):
    hf, model, params = _pair(variant, eos_bias=EOS_BIAS[variant])
    enc = random_tokens(np.random.default_rng(5), [11, 4, 17, 8], 17)
    expected = hf_generate(hf, enc, max_new_tokens=10, num_beams=4)
    got = np.asarray(model.generate(params, enc, max_decode_length=10, method="beam", num_beams=4))
    np.testing.assert_array_equal(got, expected)
    stopped = (expected == EOS_ID).any(1)
    assert stopped.any() and not stopped.all(), "test needs rows that stop and rows that do not"
    _check_eos_layout(got)


def test_sampling_options():
    _, model, params = _pair("t5_1_1", eos_bias=0.0)
    enc = random_tokens(np.random.default_rng(6), [9, 5, 12], 12)
    greedy = np.asarray(model.generate(params, enc, max_decode_length=8))

    def sample(**kw):
        return np.asarray(model.generate(params, enc, max_decode_length=8, method="sample", **kw))

    r1, r2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    # top_k=1, a tiny nucleus and temperature 0 all reduce to greedy
    np.testing.assert_array_equal(sample(rng=r1, top_k=1), greedy)
    np.testing.assert_array_equal(sample(rng=r1, top_p=1e-6), greedy)
    np.testing.assert_array_equal(sample(rng=None, temperature=0.0), greedy)
    # same rng same draw; another rng (high temperature) another draw
    a = sample(rng=r1, temperature=2.0)
    np.testing.assert_array_equal(a, sample(rng=r1, temperature=2.0))
    assert not np.array_equal(a, sample(rng=r2, temperature=2.0))
    assert not np.array_equal(a, greedy)
    # top_k=3: every sampled token is among the 3 best under teacher forcing of the sample
    s = sample(rng=r2, top_k=3, temperature=5.0)
    dec = np.concatenate([np.zeros((3, 1), np.int32), s[:, :-1]], 1)
    logits = np.asarray(jax.jit(model.logits)(params, enc, dec))
    rank = (logits > np.take_along_axis(logits, s[..., None], -1)).sum(-1)
    live = np.cumsum(np.cumsum(s == EOS_ID, 1), 1) <= 1  # up to and including the first EOS
    assert (rank[live] < 3).all() and (rank[live] > 0).any()
    with pytest.raises(ValueError, match="rng"):
        sample(rng=None)
    with pytest.raises(ValueError, match="method"):
        model.generate(params, enc, max_decode_length=8, method="nucleus")


def test_greedy_is_consistent_with_teacher_forced_logits():
    """The cached incremental decoder gives the argmax of the full (uncached) forward pass."""
    _, model, params = _pair("t5_1_0", eos_bias=0.0)
    enc = random_tokens(np.random.default_rng(7), [15, 7], 15)
    out = np.asarray(model.generate(params, enc, max_decode_length=20))
    dec = np.concatenate([np.zeros((2, 1), np.int32), out[:, :-1]], 1)
    logits = np.asarray(jax.jit(model.logits)(params, enc, dec))
    live = np.cumsum(np.cumsum(out == EOS_ID, 1), 1) <= 1
    np.testing.assert_array_equal(logits.argmax(-1)[live], out[live])


def test_text_helpers_need_a_vocabulary():
    _, model, _ = _pair("t5_1_0", eos_bias=0.0)
    with pytest.raises(ValueError, match="vocabulary"):
        model.encode_texts(["a"], 8)
