"""Decoding over a key/value cache: greedy, temperature / top-k / top-p sampling, beam search.

Every function here is pure JAX and runs as one `jax.lax.while_loop`, so a whole decode is one
compiled program. The model is reached through a step function

    step_fn(tokens [n, 1] int32, cache, index scalar int32) -> (logits [n, vocab] float32, cache)

that runs the decoder for one position over the cache (the prefix is never recomputed). Decoding
starts from PAD_ID (T5's decoder start token) and stops at EOS_ID; outputs are int32
[batch, max_decode_length] with EOS included and 0 after it.

Beam search follows Hugging Face's `generate(num_beams=..., early_stopping=False)` semantics: at
each step the best 2 * num_beams continuations over all beams are taken; those of the first
num_beams that end in EOS (or reach max_decode_length) become finished hypotheses scored
`sum(log p) / length ** length_penalty` (length counts generated tokens, EOS included); the best
num_beams continuations that do not end in EOS keep running. A batch item stops when it holds
num_beams finished hypotheses and its best running beam, scored at the current length, cannot beat
the worst of them. The best finished hypothesis is returned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import io_callback

from distill_sbs.network import EOS_ID, PAD_ID

StepFn = Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, Any]]
# step_callback(index, tokens int32 [n], token_logprobs f32 [n], top_ids int32 [n, k],
# top_logprobs f32 [n, k], done bool [n]) -> keep bool [n]: runs on the host after each decoding
# step (done: rows that had ended before, or wrote EOS now; their token is 0 or EOS).
StepCallback = Callable[..., Any]
_NEG = -1.0e9  # HF's "impossible" score


def _filter_logits(logits: jax.Array, top_k: int, top_p: jax.Array | None) -> jax.Array:
    """Keeps the top_k largest logits (top_k > 0) and the nucleus of mass top_p (if given)."""
    neg_inf = jnp.finfo(logits.dtype).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # the most likely token is always kept
        keep = (mass_before < top_p) | (jnp.arange(logits.shape[-1]) == 0)
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    return logits


def _step_logprobs(
    logits: jax.Array, chosen: jax.Array, k: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One step's (chosen f32 [n], top-k ids int32 [n, k], top-k f32 [n, k]) log-probabilities."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen_lp = jnp.take_along_axis(logp, chosen[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logp, k)
    return chosen_lp, top_ids.astype(jnp.int32), top_lp


def _call_host(
    callback: StepCallback,
    i: jax.Array,
    tokens: jax.Array,
    logprobs: tuple[jax.Array, jax.Array, jax.Array],
    done: jax.Array,
) -> jax.Array:
    """bool [n]: `callback(i, tokens, *logprobs, done)` run on the host, in step order."""
    result = jax.ShapeDtypeStruct(done.shape, jnp.bool_)
    return io_callback(callback, result, i, tokens, *logprobs, done, ordered=True)


def sample_decode(
    step_fn: StepFn,
    cache: Any,
    batch_size: int,
    max_decode_length: int,
    *,
    greedy: bool = True,
    rng: jax.Array | None = None,
    temperature: jax.Array | float = 1.0,
    top_k: int = 0,
    top_p: jax.Array | float | None = None,
    logprobs_top_k: int | None = None,
    step_callback: StepCallback | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Greedy (greedy=True) or ancestral sampling; int32 [batch, max_decode_length].

    logprobs_top_k (None: off): also return the log-probabilities of the model's distribution
    (log_softmax of the raw logits, before temperature and filtering) as
    (tokens, token_logprobs f32 [b, L], top_ids int32 [b, L, k], top_logprobs f32 [b, L, k]),
    k = max(logprobs_top_k, 1). step_callback: called on the host after each step (see
    StepCallback); rows it answers False for stop after this step's token (0 after it), so
    that a server can stream tokens and drop rows whose client left without ending the batch.
    """
    if not greedy and rng is None:
        raise ValueError("sampling needs an rng")
    if rng is None:
        rng = jax.random.PRNGKey(0)

    k = max(logprobs_top_k or 0, 1)
    want_logprobs = logprobs_top_k is not None or step_callback is not None

    def cond(state):
        i, _, _, done, *_ = state
        return (i < max_decode_length) & ~jnp.all(done)

    def body(state):
        i, tokens, cur, done, cache, rng, lp = state
        logits, cache = step_fn(cur[:, None], cache, i)
        if greedy:
            nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            rng, sub = jax.random.split(rng)
            filtered = _filter_logits(logits / temperature, top_k, top_p)
            nxt = jax.random.categorical(sub, filtered, axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, PAD_ID, nxt)
        tokens = tokens.at[:, i].set(nxt)
        if want_logprobs:
            step_lp = _step_logprobs(logits, nxt, k)
            lp = tuple(acc.at[:, i].set(x) for acc, x in zip(lp, step_lp, strict=True))
        done = done | (nxt == EOS_ID)
        if step_callback is not None:
            keep = _call_host(step_callback, i, nxt, tuple(x[:, i] for x in lp), done)
            done = done | ~keep  # the row keeps this step's token and writes 0 after it
        return i + 1, tokens, nxt, done, cache, rng, lp

    b, length = batch_size, max_decode_length
    lp0 = ()
    if want_logprobs:  # per position: the chosen token's, top-k ids, top-k log-probabilities
        lp0 = (
            jnp.zeros((b, length), jnp.float32),
            jnp.zeros((b, length, k), jnp.int32),
            jnp.zeros((b, length, k), jnp.float32),
        )
    state = (
        jnp.zeros((), jnp.int32),
        jnp.zeros((b, length), jnp.int32),
        jnp.full((b,), PAD_ID, jnp.int32),
        jnp.zeros((b,), bool),
        cache,
        rng,
        lp0,
    )
    out = jax.lax.while_loop(cond, body, state)
    if logprobs_top_k is None:
        return out[1]
    return (out[1], *out[6])


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [batch, k, ...], idx [batch, m] -> [batch, m, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def beam_search(
    step_fn: StepFn,
    cache: Any,
    batch_size: int,
    max_decode_length: int,
    *,
    num_beams: int = 4,
    length_penalty: jax.Array | float = 1.0,
    reorder_cache: Callable[[Any, jax.Array], Any] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Beam search; (best sequences int32 [batch, max_decode_length], their scores [batch]).

    `cache` holds batch_size * num_beams rows (beam-major within each batch item);
    `reorder_cache(cache, flat_indices)` gathers its rows (default: every leaf along axis 0).
    """
    b, k, length = batch_size, num_beams, max_decode_length
    cand = 2 * k  # as HF with one EOS id: enough candidates to keep k beams not ending in EOS
    if reorder_cache is None:
        reorder_cache = lambda c, idx: jax.tree_util.tree_map(lambda x: x[idx], c)  # noqa: E731

    def cond(state):
        i, *_, open_ = state
        return (i < length) & jnp.any(open_)

    def body(state):
        i, run_seq, run_scores, fin_seq, fin_scores, fin_flag, cache, open_ = state
        cur = jnp.where(i == 0, PAD_ID, run_seq[:, :, jnp.maximum(i - 1, 0)]).reshape(b * k, 1)
        logits, cache = step_fn(cur, cache, i)
        vocab = logits.shape[-1]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, k, vocab)
        total = (logp + run_scores[:, :, None]).reshape(b, k * vocab)
        top_scores, top_idx = jax.lax.top_k(total, cand)
        src_beam = top_idx // vocab
        tok = (top_idx % vocab).astype(jnp.int32)
        top_seq = _gather(run_seq, src_beam).at[:, :, i].set(tok)
        hits = (tok == EOS_ID) | (i + 1 >= length)

        # running beams: best k candidates that did not stop
        run_cand = top_scores + hits * _NEG
        keep = jax.lax.top_k(run_cand, k)[1]
        new_run_seq = _gather(top_seq, keep)
        new_run_scores = _gather(run_cand, keep)
        origin = _gather(src_beam, keep)  # [b, k] beam each survivor extends
        flat = (origin + jnp.arange(b)[:, None] * k).reshape(b * k)
        cache = reorder_cache(cache, flat)

        # finished hypotheses: only stops among the first k candidates count
        fin_cand = top_scores / ((i + 1).astype(jnp.float32) ** length_penalty)
        just = hits & (jnp.arange(cand) < k)[None, :]
        fin_cand = fin_cand + (~just) * _NEG + (~open_) * _NEG
        m_seq = jnp.concatenate([fin_seq, top_seq], axis=1)
        m_scores = jnp.concatenate([fin_scores, fin_cand], axis=1)
        m_flag = jnp.concatenate([fin_flag, just], axis=1)
        best = jax.lax.top_k(m_scores, k)[1]
        fin_seq, fin_scores, fin_flag = (
            _gather(m_seq, best),
            _gather(m_scores, best),
            _gather(m_flag, best),
        )

        # can a running beam still beat the worst finished one (HF's early_stopping=False)?
        best_running = new_run_scores[:, :1] / ((i + 1).astype(jnp.float32) ** length_penalty)
        worst = jnp.where(fin_flag, jnp.min(fin_scores, axis=1, keepdims=True), _NEG)
        open_ = open_ & jnp.any(best_running > worst, axis=1, keepdims=True)
        return i + 1, new_run_seq, new_run_scores, fin_seq, fin_scores, fin_flag, cache, open_

    run_scores = jnp.tile(jnp.array([0.0] + [_NEG] * (k - 1), jnp.float32), (b, 1))
    state = (
        jnp.zeros((), jnp.int32),
        jnp.zeros((b, k, length), jnp.int32),
        run_scores,
        jnp.zeros((b, k, length), jnp.int32),
        jnp.full((b, k), _NEG, jnp.float32),
        jnp.zeros((b, k), bool),
        cache,
        jnp.ones((b, 1), bool),
    )
    out = jax.lax.while_loop(cond, body, state)
    return out[3][:, 0], out[4][:, 0]
