"""The per-objective-normalised weighted loss (docs/architecture.md, "Loss").

    loss = sum_k w_k * (sum of CE over the target tokens of objective k) / (number of those tokens)

With two objectives, label (w=alpha) and rationale (w=1-alpha), this is the Distilling Step-by-Step
reference `alpha * label_loss + (1 - alpha) * rationale_loss`, each a token mean as Hugging Face's
CrossEntropyLoss(ignore_index=-100) computes it. Objectives absent from a batch contribute 0.
Logit distillation adds sum_k gamma_k * (sum of the divergence over objective k's tokens) / (the
same number); `objective_means` is the one normalisation both terms go through.

`ObjectiveLoss` is the loss's configuration (w_k, label smoothing, z-loss) plus the reading of a
feature-converted batch (targets, loss weights, objective ids); a model's `loss_fn` applies it to
its logits, so neither the trainer nor the model repeats the feature names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp


def _objective_mask(
    objective_ids: jax.Array, loss_weights: jax.Array, num_objectives: int
) -> jax.Array:
    """float32 [batch, length, K]: each token's loss weight in the column of its objective."""
    onehot = jax.nn.one_hot(objective_ids, num_objectives, dtype=jnp.float32)
    return onehot * loss_weights.astype(jnp.float32)[..., None]


def objective_token_counts(
    loss_weights: jax.Array, objective_ids: jax.Array, num_objectives: int
) -> jax.Array:
    """float32 [num_objectives]: loss-weighted number of target tokens of each objective."""
    return jnp.sum(_objective_mask(objective_ids, loss_weights, num_objectives), axis=(0, 1))


def objective_means(sums: jax.Array, counts: jax.Array) -> jax.Array:
    """float32 [K]: the per-objective normalisation, sums_k / counts_k, shared by the
    cross-entropy and the distillation divergence; 0 for an objective absent from the batch
    (count 0), with no NaN in the value or its gradient."""
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1e-8), 0.0)


def weighted_objective_loss(
    logits: jax.Array,
    targets: jax.Array,
    loss_weights: jax.Array,
    objective_ids: jax.Array,
    objective_weights: jax.Array | Any,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    token_counts: jax.Array | None = None,
    divergence: jax.Array | None = None,
    divergence_weights: jax.Array | Any = (),
    sampled: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (scalar loss, metrics) for one batch.

    logits: float [batch, length, vocab]; targets, objective_ids: int [batch, length];
    loss_weights: [batch, length], 0 on padding; objective_weights: [num_objectives] (w_k).
    label_smoothing: T5X-style smoothing, normalised so a perfect prediction has loss 0.
    z_loss: coefficient of log(Z)^2 per token (T5X's auxiliary loss), normalised like the CE.
    token_counts: [num_objectives] denominators; pass the full batch's counts when this call sees
      one microbatch of it, so that microbatch losses add up to the full-batch loss exactly.
    divergence: float [batch, length] per-token distillation divergence (distillation_divergence),
      added as sum_k gamma_k * (its sum over objective k's tokens) / (number of those tokens),
      over the same tokens and denominators as the CE; divergence_weights: [K] (gamma_k).
    sampled: float [batch, length], 1 on target tokens the student sampled itself (on-policy
      distillation, SAMPLED_FEATURE): they carry the divergence but no CE, z-loss or hits, and
      still count in the denominators (GKD's mixture of supervised and on-policy examples).

    metrics (all float32 sums, so they add up across microbatches and steps):
      "ce_sum" [K] cross-entropy summed over objective k's tokens (without z-loss, with smoothing),
      "correct" [K] hits (target logit is the max), "tokens" [K] token counts, "z_loss_sum" scalar,
      and with a divergence "div_sum" [K] its sum over objective k's tokens; with `sampled`
      "sampled_tokens" [K] the sampled tokens among "tokens".
    """
    objective_weights = jnp.asarray(objective_weights, jnp.float32)
    k = objective_weights.shape[0]
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    weights = loss_weights.astype(jnp.float32)

    log_z = jax.nn.logsumexp(logits, axis=-1)  # [b, l]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = log_z - target_logit  # -log p(target)
    if label_smoothing > 0.0:
        confidence = 1.0 - label_smoothing
        low = label_smoothing / (vocab - 1)
        mean_neg_logp = log_z - jnp.sum(logits, axis=-1) / vocab  # mean over vocab of -log p
        sum_other = vocab * mean_neg_logp - nll  # sum of -log p over non-target classes
        normaliser = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
        ce = confidence * nll + low * sum_other - normaliser
    else:
        ce = nll
    zl = z_loss * jnp.square(log_z)

    onehot = _objective_mask(objective_ids, weights, k)  # [b, l, k]
    tokens = jnp.sum(onehot, axis=(0, 1))
    supervised = onehot
    if sampled is not None:  # the student's own samples: divergence only
        supervised = onehot * (1.0 - sampled.astype(jnp.float32))[..., None]
    ce_sum = jnp.einsum("blk,bl->k", supervised, ce)
    z_sum = jnp.einsum("blk,bl->k", supervised, zl)
    counts = tokens if token_counts is None else token_counts
    # A hit: the target's logit is the largest (the max is logsumexp's own; an argmax is a
    # variadic reduce that XLA's CPU backend runs unvectorised: 2% of a t5 small step). Unlike
    # argmax, an exact tie with another token counts as a hit.
    hit = target_logit >= jnp.max(logits, axis=-1)
    correct = jnp.einsum("blk,bl->k", supervised, hit.astype(jnp.float32))
    loss = jnp.sum(objective_weights * objective_means(ce_sum + z_sum, counts))
    metrics = {"ce_sum": ce_sum, "correct": correct, "tokens": tokens, "z_loss_sum": jnp.sum(z_sum)}
    if divergence is not None:
        gammas = jnp.asarray(divergence_weights, jnp.float32)
        div_sum = jnp.einsum("blk,bl->k", onehot, divergence)
        loss = loss + jnp.sum(gammas * objective_means(div_sum, counts))
        metrics["div_sum"] = div_sum
    if sampled is not None:
        metrics["sampled_tokens"] = tokens - jnp.sum(supervised, axis=(0, 1))
    return loss, metrics


# float [batch, length]: 1 on target tokens the student sampled (distillation.OnPolicy writes it
# inside the train step; no data pipeline does)
SAMPLED_FEATURE = "decoder_sampled"


# A teacher that computes its own per-token divergence [batch, length] from the student's logits
# and target tokens, given ObjectiveLoss's kind and beta (a teacher of another tokenizer:
# distillation.CrossTokenizerPieces); added like distillation_divergence's values.
TokenDivergence = Callable[..., jax.Array]


def objective_ids(batch: Mapping[str, jax.Array]) -> jax.Array:
    """int [batch, length] objective of each target token; a plain task (no ids) is objective 0."""
    ids = batch.get("decoder_objective_ids")
    return jnp.zeros_like(batch["decoder_target_tokens"]) if ids is None else ids


@dataclasses.dataclass(frozen=True)
class ObjectiveLoss:
    """The training loss's settings: objective weights w_k, label smoothing, z-loss coefficient."""

    weights: Sequence[float] = (1.0,)  # stored as a tuple of floats (hashable, static under jit)
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    # Distillation terms: gamma_k per objective (empty: none), added as gamma_k * mean_k(D)
    # over the same tokens and denominators as the CE (see distillation_divergence for the rest).
    divergence_weights: Sequence[float] = ()
    divergence: str = "forward_kl"
    beta: float = 0.5
    skew: float = 0.1
    temperature: float = 1.0
    scale_by_t2: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        gammas = tuple(float(w) for w in self.divergence_weights)
        object.__setattr__(self, "divergence_weights", gammas)
        if gammas and len(gammas) != len(self.weights):
            raise ValueError(f"{len(gammas)} divergence weights for {len(self.weights)} objectives")

    @property
    def distills(self) -> bool:
        """Whether the loss has a divergence term (then it needs the teacher's distributions)."""
        return any(g != 0.0 for g in self.divergence_weights)

    @property
    def num_objectives(self) -> int:
        return len(self.weights)

    def token_counts(self, batch: Mapping[str, jax.Array]) -> jax.Array:
        """float32 [K]: the batch's per-objective token counts (the loss's denominators)."""
        return objective_token_counts(
            batch["decoder_loss_weights"], objective_ids(batch), self.num_objectives
        )

    def __call__(
        self,
        logits: jax.Array,
        batch: Mapping[str, jax.Array],
        token_counts: jax.Array | None = None,
        teacher: jax.Array | TopK | TokenDivergence | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(loss, metric sums) of `logits` [batch, length, vocab] against the batch's targets;
        `teacher` (full logits or top-k, see distillation_divergence, or a TokenDivergence) when
        `distills`."""
        divergence = None
        if self.distills and callable(teacher):  # a teacher of another tokenizer: its own terms
            divergence = teacher(
                logits, batch["decoder_target_tokens"], kind=self.divergence, beta=self.beta
            )
        elif self.distills:
            if teacher is None:
                raise ValueError("ObjectiveLoss has divergence weights but no teacher was given")
            divergence = distillation_divergence(
                logits,
                teacher,
                kind=self.divergence,
                beta=self.beta,
                skew=self.skew,
                temperature=self.temperature,
                scale_by_t2=self.scale_by_t2,
            )
        return weighted_objective_loss(
            logits,
            batch["decoder_target_tokens"],
            batch["decoder_loss_weights"],
            objective_ids(batch),
            jnp.asarray(self.weights, jnp.float32),
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            token_counts=token_counts,
            divergence=divergence,
            divergence_weights=self.divergence_weights,
            sampled=batch.get(SAMPLED_FEATURE),
        )


def summarize_metrics(
    sums: dict[str, Any], objective_names: list[str] | tuple[str, ...]
) -> dict[str, float]:
    """Turns accumulated metric sums into readable per-objective means (host side)."""
    out: dict[str, float] = {}
    for i, name in enumerate(objective_names):
        n = float(sums["tokens"][i])
        sampled = float(sums["sampled_tokens"][i]) if "sampled_tokens" in sums else 0.0
        if n - sampled > 0:  # CE and hits over the targets that were not the student's samples
            out[f"{name}/loss"] = float(sums["ce_sum"][i]) / (n - sampled)
            out[f"{name}/accuracy"] = float(sums["correct"][i]) / (n - sampled)
        if n > 0 and "div_sum" in sums:  # the distillation divergence's token mean
            out[f"{name}/divergence"] = float(sums["div_sum"][i]) / n
        if "sampled_tokens" in sums:
            out[f"{name}/sampled_tokens"] = sampled
        out[f"{name}/tokens"] = n
    return out


# ---- distillation divergences (docs/distillation.md) ------------------------------------------

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl")
TopK = tuple  # (ids int [..., k], log-probs float [..., k]): a teacher's k most likely tokens
_REST_MIN = 1e-6  # least rest mass of a top-k teacher with k < vocab (its stored log-probs
# are rounded, so their sum may reach 1; a zero rest would make reverse KL infinite)


def _bucket_log_probs(
    student_logits: jax.Array, ids: jax.Array, teacher_logprobs: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(teacher, student) log-probabilities [..., k + 1] over the k top-k ids plus one bucket
    holding everything else; both sides at temperature 1 (an empty bucket is -inf)."""
    vocab, k = student_logits.shape[-1], ids.shape[-1]
    log_q = jax.nn.log_softmax(student_logits, axis=-1)
    q_top = jnp.take_along_axis(log_q, ids, axis=-1)  # [..., k]
    # The student's rest mass as a logsumexp over the ids outside the top-k (no 1 - sum).
    lead = jnp.indices(ids.shape, sparse=True)[:-1]
    in_top = jnp.zeros(student_logits.shape, bool).at[(*lead, ids)].set(True)
    has_rest = ~jnp.all(in_top, axis=-1, keepdims=True)
    # All-masked rows get a dummy input so that logsumexp's gradient stays finite.
    rest_in = jnp.where(has_rest, jnp.where(in_top, -jnp.inf, log_q), 0.0)
    q_rest = jax.nn.logsumexp(rest_in, axis=-1, keepdims=True)
    q_rest = jnp.where(has_rest, q_rest, -jnp.inf)
    rest_mass = 1.0 - jnp.sum(jnp.exp(teacher_logprobs), axis=-1, keepdims=True)
    # k = vocab: nothing is left over, whatever the rounding of the stored log-probs says.
    rest_mass = jnp.clip(rest_mass, _REST_MIN, 1.0) if k < vocab else jnp.zeros_like(rest_mass)
    p_rest = jnp.where(rest_mass > 0, jnp.log(jnp.where(rest_mass > 0, rest_mass, 1.0)), -jnp.inf)
    return (
        jnp.concatenate([teacher_logprobs, p_rest], axis=-1),
        jnp.concatenate([q_top, q_rest], axis=-1),
    )


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """sum_c p_c (log p_c - log q_c) over the last axis; classes with p_c = 0 add 0."""
    present = log_p > -jnp.inf
    lp = jnp.where(present, log_p, 0.0)  # double where: no NaN gradient from the 0 * inf branch
    lq = jnp.where(present, log_q, 0.0)
    return jnp.sum(jnp.where(present, jnp.exp(lp) * (lp - lq), 0.0), axis=-1)


def _log_mixture(log_p: jax.Array, log_q: jax.Array, weight_p: float) -> jax.Array:
    """log(weight_p P + (1 - weight_p) Q) per class, 0 <= weight_p <= 1; -inf where both are 0
    (the rest bucket when k = vocab), with finite gradients there."""
    empty = (log_p == -jnp.inf) & (log_q == -jnp.inf)
    log_m = jnp.logaddexp(
        jnp.where(empty, 0.0, jnp.log(weight_p) + log_p),  # no NaN gradient at (-inf, -inf)
        jnp.where(empty, 0.0, jnp.log1p(-weight_p) + log_q),
    )
    return jnp.where(empty, -jnp.inf, log_m)


def distillation_divergence(
    student_logits: jax.Array,
    teacher: jax.Array | TopK,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
) -> jax.Array:
    """float32 [...]: divergence per token between the teacher's (P) and student's (Q)
    next-token distributions at `temperature`.

    student_logits: [..., vocab]. teacher: full logits [..., vocab], or (ids [..., k], log-probs
    [..., k]) of its top-k tokens: then both distributions are first reduced to k + 1 classes,
    the k ids and one bucket for the rest of the mass (exact when k = vocab), and tempered over
    those classes (p_c^(1/T), renormalised). kind: "forward_kl" KL(P||Q); "reverse_kl" KL(Q||P);
    "jsd" generalized JSD(beta) = beta KL(P||M) + (1-beta) KL(Q||M), M = beta P + (1-beta) Q,
    0 < beta < 1 (GKD); "skew_kl" KL(P || a P + (1-a) Q) and "skew_reverse_kl"
    KL(Q || (1-a) P + a Q), a = skew, 0 <= a < 1 (DistiLLM; a = 0 is forward / reverse KL).
    scale_by_t2 multiplies by T^2 (Hinton et al.: keeps gradient scale).
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"divergence kind {kind!r}: expected one of {DIVERGENCES}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got beta={beta} (use forward_kl/reverse_kl)")
    if kind.startswith("skew") and not 0.0 <= skew < 1.0:
        raise ValueError(f"{kind} needs 0 <= skew < 1, got skew={skew}")
    if temperature <= 0.0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    dtype = jnp.promote_types(student_logits.dtype, jnp.float32)  # bf16 -> f32; f64 stays
    s = student_logits.astype(dtype)
    if isinstance(teacher, tuple):
        ids, logprobs = teacher
        log_p, log_q = _bucket_log_probs(s, ids, logprobs.astype(dtype))
    else:
        if teacher.shape[-1] != s.shape[-1]:
            raise ValueError(
                f"teacher vocabulary ({teacher.shape[-1]}) differs from the student's "
                f"({s.shape[-1]})"
            )
        log_p, log_q = teacher.astype(dtype), s
    log_p = jax.nn.log_softmax(jax.lax.stop_gradient(log_p) / temperature, axis=-1)
    log_q = jax.nn.log_softmax(log_q / temperature, axis=-1)
    if kind == "forward_kl":
        d = _kl(log_p, log_q)
    elif kind == "reverse_kl":
        d = _kl(log_q, log_p)
    elif kind == "skew_kl":
        d = _kl(log_p, _log_mixture(log_p, log_q, skew))
    elif kind == "skew_reverse_kl":
        d = _kl(log_q, _log_mixture(log_p, log_q, 1.0 - skew))
    else:
        log_m = _log_mixture(log_p, log_q, beta)
        d = beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    return d * temperature**2 if scale_by_t2 else d
