"""Cross-tokenizer distillation (distill_sbs/cross_tokenizer.py): the pieces' character spans and
their alignment, the span-aligned divergence and ULD against numpy references per token, and the
span-aligned divergence with the student's own tokenizer against losses.distillation_divergence."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_sbs import cross_tokenizer as xt

# A student vocabulary of pieces (text, a space as itself) and a teacher's other pieces.
STUDENT = ["<pad>", "</s>", " ", "a", "b", "ab", " a", " b", "ba", "c", " c", "abc", " ba"]
TEACHER = [" ab", " b", "a", " c", "</s>", "zz", " ba", "b", "c", " "]
LOOKUP = {p: i for i, p in enumerate(STUDENT)}.get


def test_piece_spans_and_alignment():
    text = "ab ba c"
    t = xt.piece_spans([" ab", " b", "a", " c", "</s>"], text, "t")
    assert t == [(0, 2), (2, 4), (4, 5), (5, 7), (7, 7)]  # dummy-prefix space dropped, EOS empty
    s = xt.piece_spans([" a", "b", " ba", " c", "</s>"], text, "s")
    assert xt.align(t, s, len(text)) == [(0, 1, 0, 2), (1, 3, 2, 3), (3, 4, 3, 4), (4, 5, 4, 5)]
    # Both sides' leading empty " " piece align with each other (a shared end at 0).
    t0 = xt.piece_spans([" ", "ab", "</s>"], "ab", "t")
    s0 = xt.piece_spans([" ", "a", "b", "</s>"], "ab", "s")
    assert xt.align(t0, s0, 2) == [(0, 1, 0, 1), (1, 2, 1, 3), (2, 3, 3, 4)]
    with pytest.raises(xt.CrossTokenizerError, match=r"t: .*do not cover.*piece 1 ' x'"):
        xt.piece_spans([" ab", " x"], text, "t")
    with pytest.raises(xt.CrossTokenizerError, match=r"they spell 'ab' of 'ab ba c'"):
        xt.piece_spans([" ab"], text, "t")


def _entry(rng, text: str, pieces: list[str], k: int) -> xt.Entry:
    """A teacher entry with random distributions over TEACHER at each of its pieces."""
    spans = xt.piece_spans(pieces, text, "t")
    lps, top = [], []
    for piece in pieces:
        logits = rng.normal(size=len(TEACHER)) * 2
        logp = logits - np.log(np.exp(logits).sum())
        order = np.argsort(-logp)[:k]
        top.append(tuple((TEACHER[i], float(logp[i])) for i in order))
        lps.append(float(logp[TEACHER.index(piece)]))
    return xt.Entry("x", "o", text, tuple(pieces), tuple(spans), tuple(lps), tuple(top))


CASES = [  # (text, teacher pieces, student pieces)
    ("ab ba c", [" ab", " b", "a", " c", "</s>"], [" a", "b", " ba", " c", "</s>"]),
    ("ba c", [" ", "b", "a", " c", "</s>"], [" ", "ba", " c", "</s>"]),
]
LENGTH = 7


def _batch(k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    entries = [_entry(rng, text, t, k) for text, t, _ in CASES]
    ids = [[LOOKUP(p) for p in s] for _, _, s in CASES]
    feats = [
        xt.features(e, i, s, LOOKUP, k, LENGTH)
        for e, i, (_, _, s) in zip(entries, ids, CASES, strict=True)
    ]
    targets = np.zeros((len(CASES), LENGTH), np.int32)
    for r, i in enumerate(ids):
        targets[r, : len(i)] = i
    logits = rng.normal(size=(len(CASES), LENGTH, len(STUDENT))).astype(np.float32) * 2
    return entries, ids, xt.batch_features(feats), targets, logits


def _np_div(p: np.ndarray, q: np.ndarray, kind: str, beta: float) -> float:
    def kl(a, b):
        m = a > 0
        return float(np.sum(a[m] * (np.log(a[m]) - np.log(b[m]))))

    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def _span_reference(entry, ids, logits, k, kind, beta) -> np.ndarray:
    """Per student token, in float64, from the alignment and the entry (not the features)."""
    x = logits.astype(np.float64)
    q = np.exp(x - x.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    pieces = [STUDENT[i] for i in ids]
    out = np.zeros(len(logits))
    spans = xt.piece_spans(pieces, entry.target, "s")
    for t0, t1, s0, s1 in xt.align(entry.spans, spans, len(entry.target)):
        if t1 - t0 == 1 and s1 - s0 == 1:
            cls = {LOOKUP(pc): np.exp(lp) for pc, lp in entry.top[t0][:k] if LOOKUP(pc) is not None}
            cls.setdefault(ids[s0], np.exp(entry.logprobs[t0]))
            p = np.array([*cls.values(), max(1 - sum(cls.values()), 1e-6)])
            qs = q[s0, list(cls)]
            qv = np.array([*qs, 1 - qs.sum()])
        else:
            big_p = np.exp(sum(entry.logprobs[t0:t1]))
            big_q = np.prod([q[j, ids[j]] for j in range(s0, s1)])
            p, qv = np.array([big_p, 1 - big_p]), np.array([big_q, 1 - big_q])
        out[s0] = _np_div(p, qv, kind, beta)
    return out


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("k", [3, 6])
def test_span_divergence_matches_numpy_reference(kind, k):
    entries, ids, feats, targets, logits = _batch(k)
    span = jax.jit(functools.partial(xt.span_divergence, kind=kind, beta=0.3))
    got = np.asarray(span(logits, targets, feats))
    for r, entry in enumerate(entries):
        want = _span_reference(entry, ids[r], logits[r], k, kind, 0.3)
        np.testing.assert_allclose(got[r], want, atol=1e-5)
    # One-token spans, longer spans and positions without a term all occur.
    assert set(np.unique(feats["xt_kind"])) == {xt.NONE, xt.TOKEN, xt.SPAN}
    # Some top-k pieces are not student pieces (left in the bucket) and some are.
    assert 0 < feats["xt_valid"].sum() < feats["xt_valid"].size
    grad = jax.grad(lambda z: jnp.sum(xt.span_divergence(z, targets, feats, kind=kind)))(logits)
    with pytest.raises(ValueError, match="'skew_kl': expected one of"):
        xt.span_divergence(logits, targets, feats, kind="skew_kl")  # not silently another one
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_uld_matches_numpy_reference():
    k = 4
    entries, ids, feats, _, logits = _batch(k, seed=1)
    got = np.asarray(xt.uld_loss(logits, feats))
    for r, entry in enumerate(entries):
        x = logits[r].astype(np.float64)
        q = np.exp(x - x.max(-1, keepdims=True))
        q = -np.sort(-q / q.sum(-1, keepdims=True), axis=-1)[:, :k]
        want = np.zeros(LENGTH)
        for j in range(min(len(entry.tokens), len(ids[r]))):
            p = np.zeros(k)
            top = sorted((np.exp(lp) for _, lp in entry.top[j]), reverse=True)
            p[: len(top)] = top
            want[j] = np.abs(p - q[j]).sum()
        np.testing.assert_allclose(got[r], want, atol=1e-5)
    assert np.all(got[1, len(CASES[1][2]) :] == 0)  # beyond the shorter side: no term


@pytest.fixture(scope="module")
def own_teacher():
    """A tiny T5 teacher over the student's own arith vocabulary, scored on three target texts:
    (tokenizer, texts, targets [3, 24], teacher log-probs [3, 24, 256], student logits)."""
    import sentencepiece as spm
    from _tiny_t5 import tiny_config

    from distill_sbs.data.vocab import ARITH_SPM
    from distill_sbs.models import EncoderDecoderModel

    tok = spm.SentencePieceProcessor(model_file=ARITH_SPM)
    model = EncoderDecoderModel(tiny_config())
    params = model.init_params(jax.random.PRNGKey(0))
    texts = ["2", "The robin is a bird. So 12.", "The robin is a bird. So 1 of them is a bird."]
    targets = np.zeros((len(texts), 24), np.int32)
    for r, text in enumerate(texts):
        ids = [*tok.encode(text), 1]
        assert tok.unk_id() not in ids  # the pieces spell the text
        targets[r, : len(ids)] = ids
    enc = np.asarray([[*tok.encode("So 12 of them"), 1]] * len(texts), np.int32)
    dec_in = np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)
    teacher = np.asarray(jax.nn.log_softmax(jax.jit(model.logits)(params, enc, dec_in), axis=-1))
    student = np.random.default_rng(0).normal(size=teacher.shape).astype(np.float32) * 3
    return tok, texts, targets, teacher, student


@pytest.mark.parametrize("k", [4, 128])
@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_span_divergence_with_the_students_own_tokenizer_is_the_top_k_divergence(
    own_teacher, k, kind
):
    """With the teacher's tokenizer the student's own, every span is one token on both sides and
    at each target token the span-aligned value equals losses.distillation_divergence(student
    logits, (top-k ids, top-k log-probs)): the same-vocabulary KD term of a top-k file holding
    the same top-k, where that top-k holds the target token; where it does not, the target is
    one more class, so it equals distillation_divergence on the top-k plus (target id, the
    teacher's log-prob of it)."""
    from distill_sbs.generation import token_text
    from distill_sbs.losses import distillation_divergence

    tok, texts, targets, teacher, student = own_teacher
    length = targets.shape[1]
    top_ids = np.argsort(-teacher, axis=-1, kind="stable")[..., :k]
    top_lps = np.take_along_axis(teacher, top_ids, axis=-1)
    lookup = xt.sentencepiece_lookup(tok)
    feats = []
    for r, text in enumerate(texts):
        n = len(tok.encode(text)) + 1
        pieces = xt.sentencepiece_text(tok, targets[r, :n])
        entry = xt.Entry("x", "o", text, tuple(pieces), tuple(xt.piece_spans(pieces, text, "t")),
                         tuple(float(teacher[r, j, targets[r, j]]) for j in range(n)),
                         tuple(tuple((token_text(tok, int(i)), float(lp))
                                     for i, lp in zip(top_ids[r, j], top_lps[r, j], strict=True))
                               for j in range(n)))  # fmt: skip
        feats.append(xt.features(entry, targets[r, :n].tolist(), pieces, lookup, k, length))
        assert np.all(feats[-1]["xt_kind"][:n] == xt.TOKEN)  # every span is one token
    span = jax.jit(functools.partial(xt.span_divergence, kind=kind))  # jitted: seconds, not a
    div = jax.jit(functools.partial(distillation_divergence, kind=kind))  # minute of eager ops
    got = np.asarray(span(student, targets, xt.batch_features(feats)))
    in_top = np.any(top_ids == targets[..., None], axis=-1)
    target_lp = np.take_along_axis(teacher, targets[..., None], axis=-1)
    same = div(student, (top_ids, top_lps))
    plus = div(
        student,
        (
            np.concatenate([top_ids, targets[..., None]], -1),
            np.concatenate([top_lps, target_lp], -1),
        ),
    )
    mask = targets > 0
    want = np.where(in_top, same, plus)
    np.testing.assert_allclose(got[mask], want[mask], atol=1e-5)
    assert (~in_top[mask]).any() and (in_top[mask].any() or k < 128)  # both cases occur
    assert np.all(got[~mask] == 0)


def test_pieces_file_round_trip_and_bad_lines(tmp_path):
    entry = _entry(np.random.default_rng(2), *CASES[0][:2], k=3)
    path = str(tmp_path / "p.jsonl")
    xt.save(path, [entry])
    assert xt.load(path) == {("x", "o"): entry}
    good = entry.to_json()
    for bad, needle in [
        ({k: v for k, v in good.items() if k != "top"}, r"p.jsonl:1: not a pieces entry .*'top'"),
        ({**good, "logprobs": good["logprobs"][:-1]}, r"p.jsonl:1: tokens, spans, .* differ"),
        ({**good, "spans": [[0, 2], [3, 4], *good["spans"][2:]]}, r"span \[3, 4\] does not "),
    ]:
        (tmp_path / "p.jsonl").write_text(json.dumps(bad) + "\n")
        with pytest.raises(xt.CrossTokenizerError, match=needle):
            xt.load(path)
