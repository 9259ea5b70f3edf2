"""Logit distillation from a teacher with another tokenizer (docs/distillation.md, "Teachers with
another tokenizer"): the teacher's pieces file, their alignment with the student's tokens by
character spans, and the two losses.

The file (JSON lines, one per scored target; written by teachers/topk.py from a server):

    {"id": ..., "objective": ..., "target": <the target text>,
     "tokens": [teacher piece texts], "spans": [[start, end], ...] (character offsets into the
     target; a trailing special token such as EOS is [len, len]), "logprobs": [each piece's own
     log-probability], "top": [{piece text: log-prob, ...} per position, best first]}

Losses, per student target token (float32 [batch, length], added like the same-vocabulary KD term
through losses.weighted_objective_loss(divergence=...)):

    span_divergence  GOLD-style: where both tokenizations end a token at the same character, the
                     text between consecutive shared boundaries is one span. A span of one token
                     on both sides compares the two next-token distributions over the teacher's
                     top-k pieces that are student pieces too, plus the target token (with the
                     teacher's log-prob of its own piece) when the top-k lacks it, plus one
                     bucket for the rest of the mass (as losses.distillation_divergence does for
                     a same-vocabulary top-k); a longer span compares the probability of its
                     text (the chain of its tokens' probabilities) as the two classes {span,
                     not span}. The value sits at the span's first student token.
    uld_loss         ULD (Boizard et al. 2024): the L1 distance between the sorted top-k
                     probabilities of teacher position j and student position j (no vocabulary
                     mapping; the longer sequence's extra positions are left out).

In training (gin: `teacher_pieces_path.path`, `KD.cross_tokenizer`), `attach` adds each train
example's features, `encode`d as one int32 feature per target token that seqio packs like the
tokens; distillation.CrossTokenizerPieces `decode_features` them in the train step.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from distill_sbs import storage
from distill_sbs.data.feature_converter import PIECES_EXAMPLE_FEATURE, PIECES_MODEL_FEATURE
from distill_sbs.errors import UserError

_REST_MIN = 1e-6  # least rest mass of a teacher (its stored log-probs are rounded)
_Q_MAX_LOG = -1e-7  # a student span probability is read as at most exp(-1e-7): log(1 - Q) finite


KINDS = ("forward_kl", "reverse_kl", "jsd")  # the span loss's divergences (losses.py's meanings)


class CrossTokenizerError(UserError):
    """Teacher pieces that cannot be aligned with the target text, or an invalid pieces file."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One scored target in the teacher's own tokenizer."""

    id: str
    objective: str
    target: str
    tokens: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]
    logprobs: tuple[float, ...]
    top: tuple[tuple[tuple[str, float], ...], ...]  # per position, best first

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "objective": self.objective,
            "target": self.target,
            "tokens": list(self.tokens),
            "spans": [list(s) for s in self.spans],
            "logprobs": list(self.logprobs),
            "top": [dict(t) for t in self.top],
        }


def piece_spans(pieces: Sequence[str], text: str, where: str) -> list[tuple[int, int]]:
    """Character span [start, end) of each piece in `text`. The pieces must spell the text in
    order, except that the first may carry a leading space the text lacks (SentencePiece's dummy
    prefix; such a piece may then cover nothing) and that pieces left once the text is spelled
    (EOS and other special tokens) are empty spans at its end; anything else is an error."""
    spans, pos = [], 0
    for i, piece in enumerate(pieces):
        if pos == len(text) and i > 0:
            spans.append((pos, pos))
            continue
        if i == 0 and piece.startswith(" ") and not text.startswith(" "):
            piece = piece[1:]
        if not text.startswith(piece, pos) or (not piece and i > 0):
            raise CrossTokenizerError(
                f"{where}: the teacher's pieces do not cover the target text: piece {i} "
                f"{pieces[i]!r} does not continue {text[:pos]!r} in {text!r}"
            )
        spans.append((pos, pos + len(piece)))
        pos += len(piece)
    if pos != len(text):
        raise CrossTokenizerError(
            f"{where}: the teacher's pieces do not cover the target text: they spell "
            f"{text[:pos]!r} of {text!r}"
        )
    return spans


def _ends(spans: Sequence[tuple[int, int]], length: int) -> list[int]:
    """Each token's end; the k-th empty token at the text's end ends at length + k + 1, so that
    the two sides' EOS align with each other (a virtual character each)."""
    out, extra = [], 0
    for start, end in spans:
        if start == end == length and out:
            extra += 1
            out.append(length + extra)
        else:
            out.append(end)
    return out


def align(
    teacher: Sequence[tuple[int, int]], student: Sequence[tuple[int, int]], length: int
) -> list[tuple[int, int, int, int]]:
    """(t0, t1, s0, s1) per span between consecutive shared token ends: teacher tokens t0:t1 and
    student tokens s0:s1 cover the same text. Tokens after the last shared end are left out."""
    t_ends, s_ends = _ends(teacher, length), _ends(student, length)
    shared = sorted(set(t_ends) & set(s_ends))  # 0 too: both sides' dummy-prefix pieces
    out, t, s = [], 0, 0
    for b in shared:
        t1, s1 = t, s
        while t1 < len(t_ends) and t_ends[t1] <= b:
            t1 += 1
        while s1 < len(s_ends) and s_ends[s1] <= b:
            s1 += 1
        out.append((t, t1, s, s1))
        t, s = t1, s1
    return out


def sentencepiece_text(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The student's pieces as text (a space for "\u2581"), as generation.token_text spells them."""
    from distill_sbs.generation import token_text

    return [token_text(tokenizer, int(i)) for i in ids]


def sample_pieces(
    tokenizer: Any, ids: Sequence[int], eos_id: int = 1
) -> tuple[str, list[str], list[tuple[int, int]]]:
    """(text, pieces, spans) of the student's sampled target `ids` (its EOS, if any, last): the
    text the tokenizer decodes, each token's share of it (decoding one more token adds its piece
    to the text; a control token such as PAD adds nothing: an empty span inside the text), EOS
    an empty span at its end. Ids without a piece read as <unk>, as seqio decodes them."""
    size, unk = tokenizer.get_piece_size(), tokenizer.unk_id()
    ids = [int(i) if 0 <= int(i) < size else unk for i in ids]
    if eos_id in ids:
        ids = ids[: ids.index(eos_id) + 1]
    text, pieces, spans = "", [], []
    for j, i in enumerate(ids):
        if i == eos_id:
            pieces.append("")
            spans.append((len(text), len(text)))
            continue
        # SentencePiece decodes a prefix to a prefix of the text; where it would not (bytes
        # completed later), the token adds what is past the text's length: the pieces still
        # spell the text.
        piece = tokenizer.decode_ids(ids[: j + 1])[len(text) :]
        pieces.append(piece)
        spans.append((len(text), len(text) + len(piece)))
        text += piece
    return text, pieces, spans


def sentencepiece_lookup(tokenizer: Any) -> Callable[[str], int | None]:
    """A teacher piece's text -> the student's id of the same piece, or None."""
    unk = tokenizer.unk_id()

    def lookup(piece: str) -> int | None:
        i = tokenizer.piece_to_id(piece.replace(" ", "\u2581"))
        return None if i == unk and piece != tokenizer.id_to_piece(unk) else int(i)

    return lookup


# Per-example features (numpy, [length, ...]), host side; the loss reads them in the step.
FEATURES = ("xt_ids", "xt_valid", "xt_logprobs", "xt_kind", "xt_last", "xt_span_logprob",
            "uld_logprobs", "uld_valid")  # fmt: skip
NONE, TOKEN, SPAN = 0, 1, 2  # xt_kind: no term here; a one-token span; a longer span's start


def features(
    entry: Entry,
    student_ids: Sequence[int],
    student_pieces: Sequence[str],
    lookup: Callable[[str], int | None],
    k: int,
    length: int,
    student_spans: Sequence[tuple[int, int]] | None = None,
) -> dict[str, np.ndarray]:
    """The loss's features of one example whose student target tokens are `student_ids` (EOS
    included; `student_pieces` their texts), padded or cut to `length` positions.
    `student_spans`: the tokens' spans when known (a sample's, from `sample_pieces`, may hold
    empty tokens inside the text), else read from the pieces."""
    where = f"example {entry.id!r} ({entry.objective})"
    s_spans = student_spans
    if s_spans is None:
        s_spans = piece_spans(student_pieces, entry.target, f"{where}, the student's tokens")
    f = {
        "xt_ids": np.zeros((length, k + 1), np.int32),
        "xt_valid": np.zeros((length, k + 1), bool),
        "xt_logprobs": np.full((length, k + 1), -np.inf, np.float32),
        "xt_kind": np.zeros(length, np.int32),
        "xt_last": np.zeros(length, np.int32),
        "xt_span_logprob": np.zeros(length, np.float32),
        "uld_logprobs": np.full((length, k), -np.inf, np.float32),
        "uld_valid": np.zeros(length, bool),
    }
    for t0, t1, s0, s1 in align(entry.spans, s_spans, len(entry.target)):
        if s1 > length:  # the student's target was cut
            break
        if t1 - t0 == 1 and s1 - s0 == 1:
            f["xt_kind"][s0] = TOKEN
            mapped = ((lookup(piece), lp) for piece, lp in entry.top[t0][:k])
            kept = [(i, lp) for i, lp in mapped if i is not None]  # the rest: in the bucket
            if student_ids[s0] not in [i for i, _ in kept]:  # the target token, always a class
                kept.append((student_ids[s0], entry.logprobs[t0]))
            for slot, (i, lp) in enumerate(kept):
                f["xt_ids"][s0, slot], f["xt_logprobs"][s0, slot] = i, lp
                f["xt_valid"][s0, slot] = True
        else:
            f["xt_kind"][s0], f["xt_last"][s0] = SPAN, s1 - 1
            f["xt_span_logprob"][s0] = sum(entry.logprobs[t0:t1])
    for j in range(min(len(entry.tokens), len(student_ids), length)):
        lps = sorted((lp for _, lp in entry.top[j][:k]), reverse=True)
        f["uld_logprobs"][j, : len(lps)] = lps
        f["uld_valid"][j] = True
    return f


def batch_features(examples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks per-example features into [batch, length, ...] arrays."""
    return {name: np.stack([e[name] for e in examples]) for name in FEATURES}


# ---- in training: the file named in gin, its features carried with the batches ----------------


@gin.configurable
def teacher_pieces_path(path: str | None = None) -> str | None:
    """The pieces file of the train split (gin: `teacher_pieces_path.path = "..."`); None: none."""
    return path


_SCALARS = ("xt_kind", "xt_last", "xt_span_logprob", "uld_valid")  # one value per token


def _layout(k: int) -> list[tuple[str, int, Any]]:
    """(feature, values per token, dtype) in the encoded feature's order."""
    return [("xt_ids", k + 1, np.int32), ("xt_valid", k + 1, bool),
            ("xt_logprobs", k + 1, np.float32), ("xt_kind", 1, np.int32), ("xt_last", 1, np.int32),
            ("xt_span_logprob", 1, np.float32), ("uld_logprobs", k, np.float32),
            ("uld_valid", 1, bool)]  # fmt: skip


def encode(feats: Mapping[str, np.ndarray]) -> np.ndarray:
    """One example's `features` [T, ...] as int32 [T, 4k + 7] for seqio's packer: integers + 1
    and float32 bits + 1 (no value is 0, which the packer reads as padding; the values pass
    exactly), and `xt_last` as the offset from its own position (packing moves a target along
    its row)."""
    length = len(feats["xt_kind"])
    k = feats["uld_logprobs"].shape[-1]
    cols = []
    for name, width, dtype in _layout(k):
        x = np.asarray(feats[name]).reshape(length, width)
        if name == "xt_last":
            span = feats["xt_kind"].reshape(length, 1) == SPAN
            x = np.where(span, x - np.arange(length)[:, None], 0)
        if dtype is np.float32:
            x = np.ascontiguousarray(x, np.float32).view(np.int32)
        cols.append(x.astype(np.int64) + 1)
    return np.concatenate(cols, axis=1).astype(np.int32)


def decode_features(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The loss's features [b, l, ...] from the batch's encoded PIECES_MODEL_FEATURE [b, l * w]
    (packed or not). Padding has no term, nor has a span whose last token is not in the same
    target (one cut by TASK_FEATURE_LENGTHS)."""
    targets = batch["decoder_target_tokens"]
    b, length = targets.shape
    enc = batch[PIECES_MODEL_FEATURE].reshape(b, length, -1)
    raw = jnp.where(enc == 0, 1, enc) - 1  # padding: 0, 0.0 and False everywhere
    out, col = {}, 0
    for name, width, dtype in _layout((enc.shape[-1] - 7) // 4):
        x = raw[..., col : col + width]
        col += width
        if dtype is np.float32:
            x = jax.lax.bitcast_convert_type(x, jnp.float32)
        elif dtype is bool:
            x = x > 0
        out[name] = x[..., 0] if name in _SCALARS else x
    last = jnp.arange(length) + out["xt_last"]
    inside = last < length
    last = jnp.minimum(last, length - 1)
    inside &= jnp.take_along_axis(batch["decoder_loss_weights"], last, axis=-1) > 0
    if "decoder_segment_ids" in batch:  # packed: the span ends in its own example
        seg = batch["decoder_segment_ids"]
        inside &= jnp.take_along_axis(seg, last, axis=-1) == seg
    out["xt_kind"] = jnp.where((out["xt_kind"] == SPAN) & ~inside, NONE, out["xt_kind"])
    out["xt_last"] = last
    return out


def stored_k(entries: Mapping[tuple[str, str], Entry], path: str) -> int:
    """The file's k: the most top log-probabilities at any position."""
    k = max((len(t) for e in entries.values() for t in e.top), default=0)
    if k == 0:
        raise CrossTokenizerError(f"{path}: the pieces file holds no top log-probabilities")
    return k


def attach(
    examples: list[dict],
    entries: Mapping[tuple[str, str], Entry],
    vocabulary: Any,
    objective: str,
    path: str,
    eos_id: int = 1,
) -> list[dict]:
    """Adds the encoded features of each example's entry (PIECES_EXAMPLE_FEATURE, int32 [target
    tokens, 4k + 7]) to the examples of one objective; the entry's target must be the example's."""
    tok = getattr(vocabulary, "tokenizer", None)
    if tok is None:
        raise CrossTokenizerError(
            f"{path}: a pieces file needs a SentencePiece student vocabulary, not "
            f"{type(vocabulary).__name__}"
        )
    k, lookup = stored_k(entries, path), sentencepiece_lookup(tok)
    out = []
    for ex in examples:
        entry = entries.get((str(ex["id"]), objective))
        if entry is None:
            raise CrossTokenizerError(
                f"{path}: no pieces entry for example {ex['id']!r} (objective {objective!r}); "
                "the file was written for other records"
            )
        if entry.target != ex["targets"]:
            raise CrossTokenizerError(
                f"{path}: the target of {ex['id']!r} ({objective}) is {entry.target[:60]!r} in "
                f"the file but {ex['targets'][:60]!r} in the records"
            )
        ids = [*vocabulary.encode(ex["targets"]), eos_id]
        f = features(entry, ids, sentencepiece_text(tok, ids), lookup, k, len(ids))
        out.append({**ex, PIECES_EXAMPLE_FEATURE: encode(f)})
    return out


# ---- the losses (jitted with the student) -----------------------------------------------------


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """sum_c p_c (log p_c - log q_c) over the last axis; classes with p_c = 0 add 0."""
    present = log_p > -jnp.inf
    lp = jnp.where(present, log_p, 0.0)
    lq = jnp.where(present, log_q, 0.0)
    return jnp.sum(jnp.where(present, jnp.exp(lp) * (lp - lq), 0.0), axis=-1)


def _divergence(log_p: jax.Array, log_q: jax.Array, kind: str, beta: float) -> jax.Array:
    if kind == "forward_kl":
        return _kl(log_p, log_q)
    if kind == "reverse_kl":
        return _kl(log_q, log_p)
    empty = (log_p == -jnp.inf) & (log_q == -jnp.inf)
    log_m = jnp.logaddexp(
        jnp.where(empty, 0.0, jnp.log(beta) + log_p),
        jnp.where(empty, 0.0, jnp.log1p(-beta) + log_q),
    )
    log_m = jnp.where(empty, -jnp.inf, log_m)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, accurate at both ends."""
    return jnp.where(x > -0.6931, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def span_divergence(
    student_logits: jax.Array,
    targets: jax.Array,
    feats: Mapping[str, jax.Array],
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
) -> jax.Array:
    """float32 [b, l]: the span-aligned divergence D(teacher || student) of `features`, at each
    span's first student token (0 elsewhere). student_logits [b, l, V]; targets [b, l]."""
    if kind not in KINDS:
        raise ValueError(f"span-aligned divergence kind {kind!r}: expected one of {KINDS}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got beta={beta}")
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    ids, valid = feats["xt_ids"], feats["xt_valid"]
    kind_ = feats["xt_kind"]
    # One-token spans: the mapped top-k + a rest bucket (the student's rest exactly, by
    # logsumexp over the ids outside the kept ones).
    q_top = jnp.where(valid, jnp.take_along_axis(log_q, ids, axis=-1), -jnp.inf)
    lead = jnp.indices(ids.shape, sparse=True)[:-1]
    kept = jnp.zeros(log_q.shape, bool).at[(*lead, ids)].max(valid)
    has_rest = ~jnp.all(kept, axis=-1, keepdims=True)
    rest_in = jnp.where(has_rest, jnp.where(kept, -jnp.inf, log_q), 0.0)
    q_rest = jnp.where(has_rest, jax.nn.logsumexp(rest_in, axis=-1, keepdims=True), -jnp.inf)
    p_top = jax.lax.stop_gradient(jnp.where(valid, feats["xt_logprobs"], -jnp.inf))
    mass = 1.0 - jnp.sum(jnp.exp(p_top), axis=-1, keepdims=True)
    mass = jnp.where(has_rest, jnp.clip(mass, _REST_MIN, 1.0), 1.0)
    p_rest = jnp.where(has_rest, jnp.log(mass), -jnp.inf)
    token_p = jnp.concatenate([p_top, p_rest], axis=-1)
    token_q = jnp.concatenate([q_top, q_rest], axis=-1)
    # Longer spans: the chain of the student's target-token log-probs over the span (a cumsum
    # difference) against the teacher's, as the two classes {span, not span}.
    tok = jnp.take_along_axis(log_q, targets[..., None], axis=-1)[..., 0]
    csum = jnp.cumsum(tok, axis=-1)
    chain = jnp.take_along_axis(csum, feats["xt_last"], axis=-1) - csum + tok
    is_span = kind_ == SPAN
    chain = jnp.where(is_span, jnp.minimum(chain, _Q_MAX_LOG), -1.0)  # safe off the spans
    p_span = jax.lax.stop_gradient(jnp.where(is_span, feats["xt_span_logprob"], -1.0))
    p_span = jnp.minimum(p_span, np.log1p(-_REST_MIN))
    pad = jnp.full((*chain.shape, ids.shape[-1] - 1), -jnp.inf)
    span_p = jnp.concatenate([p_span[..., None], pad, _log1mexp(p_span)[..., None]], axis=-1)
    span_q = jnp.concatenate([chain[..., None], pad, _log1mexp(chain)[..., None]], axis=-1)
    log_p = jnp.where(is_span[..., None], span_p, token_p)
    log_qc = jnp.where(is_span[..., None], span_q, token_q)
    d = _divergence(log_p, log_qc, kind, beta)
    return jnp.where(kind_ == NONE, 0.0, d)


def uld_loss(student_logits: jax.Array, feats: Mapping[str, jax.Array]) -> jax.Array:
    """float32 [b, l]: ULD's L1 distance between the teacher's sorted top-k probabilities (0 for
    missing ones) and the student's k largest probabilities, at aligned positions (0 elsewhere)."""
    p = jax.lax.stop_gradient(jnp.exp(feats["uld_logprobs"]))
    p = -jnp.sort(-p, axis=-1)
    q, _ = jax.lax.top_k(jax.nn.softmax(student_logits.astype(jnp.float32), axis=-1), p.shape[-1])
    return jnp.where(feats["uld_valid"], jnp.sum(jnp.abs(p - q), axis=-1), 0.0)


LOSSES = ("span", "uld")


def divergence(
    loss: str,
    student_logits: jax.Array,
    targets: jax.Array,
    feats: Mapping[str, jax.Array],
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
) -> jax.Array:
    """The per-token values of `loss` ("span" or "uld")."""
    if loss == "span":
        return span_divergence(student_logits, targets, feats, kind=kind, beta=beta)
    if loss == "uld":
        return uld_loss(student_logits, feats)
    raise ValueError(f"cross-tokenizer loss {loss!r}: expected one of {LOSSES}")


# ---- the file ---------------------------------------------------------------------------------


def save(path: str, entries: Sequence[Entry]) -> None:
    """Writes the entries as JSON lines."""
    storage.write_text(path, "".join(json.dumps(e.to_json()) + "\n" for e in entries))


def load(path: str) -> dict[tuple[str, str], Entry]:
    """(example id, objective) -> Entry; a line that is not a valid entry is one error."""
    from distill_sbs.data.records import iter_json_lines

    if not storage.exists(path):
        raise CrossTokenizerError(f"{path}: no such pieces file (teacher_pieces_path.path)")
    out = {}
    for d, where in iter_json_lines(path, "a pieces entry"):
        try:
            e = Entry(
                str(d["id"]),
                str(d["objective"]),
                str(d["target"]),
                tuple(str(t) for t in d["tokens"]),
                tuple((int(a), int(b)) for a, b in d["spans"]),
                tuple(float(x) for x in d["logprobs"]),
                tuple(tuple((str(p), float(lp)) for p, lp in t.items()) for t in d["top"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CrossTokenizerError(f"{where}: not a pieces entry ({err!r})") from err
        n = len(e.tokens)
        if not n == len(e.spans) == len(e.logprobs) == len(e.top):
            raise CrossTokenizerError(f"{where}: tokens, spans, logprobs and top differ in length")
        _check_spans(e.spans, e.target, where)
        out[(e.id, e.objective)] = e
    return out


def _check_spans(spans: Sequence[tuple[int, int]], text: str, where: str) -> None:
    """The spans must tile the text in order (empty ones allowed at its start and end)."""
    pos = 0
    for a, b in spans:
        if a != pos or b < a or b > len(text):
            raise CrossTokenizerError(f"{where}: span [{a}, {b}] does not continue at {pos}")
        pos = b
    if pos != len(text):
        raise CrossTokenizerError(f"{where}: the spans end at {pos}, the target at {len(text)}")
