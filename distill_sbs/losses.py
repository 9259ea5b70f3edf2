"""The per-objective-normalised weighted loss (docs/architecture.md, "Loss").

    loss = sum_k w_k * (sum of CE over the target tokens of objective k) / (number of those tokens)

With two objectives, label (w=alpha) and rationale (w=1-alpha), this is the Distilling Step-by-Step
reference `alpha * label_loss + (1 - alpha) * rationale_loss`, each a token mean as Hugging Face's
CrossEntropyLoss(ignore_index=-100) computes it. Objectives absent from a batch contribute 0.

`ObjectiveLoss` is the loss's configuration (w_k, label smoothing, z-loss) plus the reading of a
feature-converted batch (targets, loss weights, objective ids); a model's `loss_fn` applies it to
its logits, so neither the trainer nor the model repeats the feature names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp


def objective_token_counts(
    loss_weights: jax.Array, objective_ids: jax.Array, num_objectives: int
) -> jax.Array:
    """float32 [num_objectives]: loss-weighted number of target tokens of each objective."""
    onehot = jax.nn.one_hot(objective_ids, num_objectives, dtype=jnp.float32)  # [b, l, k]
    return jnp.einsum("blk,bl->k", onehot, loss_weights.astype(jnp.float32))


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
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (scalar loss, metrics) for one batch.

    logits: float [batch, length, vocab]; targets, objective_ids: int [batch, length];
    loss_weights: [batch, length], 0 on padding; objective_weights: [num_objectives] (w_k).
    label_smoothing: T5X-style smoothing, normalised so a perfect prediction has loss 0.
    z_loss: coefficient of log(Z)^2 per token (T5X's auxiliary loss), normalised like the CE.
    token_counts: [num_objectives] denominators; pass the full batch's counts when this call sees
      one microbatch of it, so that microbatch losses add up to the full-batch loss exactly.

    metrics (all float32 sums, so they add up across microbatches and steps):
      "ce_sum" [K] cross-entropy summed over objective k's tokens (without z-loss, with smoothing),
      "correct" [K] argmax hits, "tokens" [K] token counts, "z_loss_sum" scalar.
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

    onehot = jax.nn.one_hot(objective_ids, k, dtype=jnp.float32) * weights[..., None]  # [b, l, k]
    ce_sum = jnp.einsum("blk,bl->k", onehot, ce)
    z_sum = jnp.einsum("blk,bl->k", onehot, zl)
    counts = jnp.sum(onehot, axis=(0, 1)) if token_counts is None else token_counts
    correct = jnp.einsum(
        "blk,bl->k", onehot, (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    )
    per_objective = (ce_sum + z_sum) / jnp.maximum(counts, 1e-8)
    loss = jnp.sum(objective_weights * jnp.where(counts > 0, per_objective, 0.0))
    metrics = {
        "ce_sum": ce_sum,
        "correct": correct,
        "tokens": jnp.sum(onehot, axis=(0, 1)),
        "z_loss_sum": jnp.sum(z_sum),
    }
    return loss, metrics


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))

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
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(loss, metric sums) of `logits` [batch, length, vocab] against the batch's targets."""
        return weighted_objective_loss(
            logits,
            batch["decoder_target_tokens"],
            batch["decoder_loss_weights"],
            objective_ids(batch),
            jnp.asarray(self.weights, jnp.float32),
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            token_counts=token_counts,
        )


def summarize_metrics(
    sums: dict[str, Any], objective_names: list[str] | tuple[str, ...]
) -> dict[str, float]:
    """Turns accumulated metric sums into readable per-objective means (host side)."""
    out: dict[str, float] = {}
    for i, name in enumerate(objective_names):
        n = float(sums["tokens"][i])
        if n > 0:
            out[f"{name}/loss"] = float(sums["ce_sum"][i]) / n
            out[f"{name}/accuracy"] = float(sums["correct"][i]) / n
        out[f"{name}/tokens"] = n
    return out
