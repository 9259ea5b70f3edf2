"""A model class for upstream T5X users: T5X's trainer, our per-objective weighted loss.

Upstream `t5x.models.EncoderDecoderModel` trains a token mean, so a DSS task trained with it loses
its objective weights (alpha). `objective_weighted_model(...)` builds the subclass
`ObjectiveWeightedEncoderDecoderModel` whose `loss_fn` is `losses.ObjectiveLoss` (the loss our
trainer uses: sum over objectives of w_k times the mean cross-entropy of objective k's tokens)
and whose feature converter carries each target token's objective id. The weights are the
registered task's (`data.get_objectives`, gin's DatasetOptions) unless given.

T5X is imported only when a model is built (it is an optional dependency, installed from its
repository); `distill_sbs/gin/t5x/` has gin files for upstream `t5x/train.py` (docs/t5x.md).
The loss is normalised per objective inside each batch, so train without microbatches
(T5X's `num_microbatches = None`); T5X's `loss_normalizing_factor` does not apply.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from distill_sbs.errors import UserError


def _task(mixture_or_task_name: str) -> Any:
    import seqio

    import distill_sbs.tasks  # noqa: F401 - registers the built-in datasets

    return seqio.get_mixture_or_task(mixture_or_task_name)


def task_vocabulary(mixture_or_task_name: str) -> Any:
    """The targets vocabulary of a registered task: T5X requires the model's to equal it."""
    return _task(mixture_or_task_name).output_features["targets"].vocabulary


def objective_weights(mixture_or_task_name: str) -> tuple[float, ...]:
    """The objective weights of a registered method, in objective-id order (gin's DatasetOptions,
    e.g. dss_alpha, apply)."""
    from distill_sbs import data

    _task(mixture_or_task_name)
    return tuple(float(o.weight) for o in data.get_objectives(mixture_or_task_name))


def objective_weighted_model(
    *,
    mixture_or_task_name: str | None = None,
    weights: Sequence[float] | None = None,
    **kwargs: Any,
) -> Any:
    """An `ObjectiveWeightedEncoderDecoderModel(**kwargs)` (t5x.models.EncoderDecoderModel's
    arguments) with the objective weights of `mixture_or_task_name`, or `weights`."""
    if (mixture_or_task_name is None) == (weights is None):
        raise UserError("objective_weighted_model: give mixture_or_task_name or weights (one)")
    if weights is None:
        weights = objective_weights(mixture_or_task_name)
    return model_class()(objective_weights=weights, **kwargs)


@functools.cache
def model_class() -> type:
    """`ObjectiveWeightedEncoderDecoderModel`, a subclass of t5x.models.EncoderDecoderModel."""
    import jax.numpy as jnp
    from t5x import models

    from distill_sbs.data.feature_converter import ObjectiveEncDecFeatureConverter
    from distill_sbs.losses import ObjectiveLoss

    class ObjectiveWeightedEncoderDecoderModel(models.EncoderDecoderModel):
        """T5X's encoder-decoder model trained with `losses.ObjectiveLoss`."""

        FEATURE_CONVERTER_CLS = ObjectiveEncDecFeatureConverter

        def __init__(self, *args: Any, objective_weights: Sequence[float], **kwargs: Any):
            if kwargs.get("loss_normalizing_factor") is not None:
                raise UserError(
                    "ObjectiveWeightedEncoderDecoderModel: loss_normalizing_factor must be None "
                    "(the loss is normalised per objective)"
                )
            super().__init__(*args, **kwargs)
            self.objective_loss = ObjectiveLoss(
                tuple(objective_weights), self._label_smoothing, self._z_loss
            )

        def loss_fn(self, params: Any, batch: Any, dropout_rng: Any) -> tuple[Any, Any]:
            logits = self._compute_logits(params, batch, dropout_rng)
            loss, _ = self.objective_loss(logits, batch)
            # T5X's metrics (accuracy, loss, timing) over the same tokens
            segment_ids = {
                k[: -len("_segment_ids")]: v for k, v in batch.items() if k.endswith("_segment_ids")
            } or {
                k: v != 0
                for k, v in batch.items()
                if k in ("encoder_input_tokens", "decoder_target_tokens")
            }
            metrics = self._compute_metrics(
                logits=logits,
                targets=batch["decoder_target_tokens"],
                mask=jnp.asarray(batch["decoder_loss_weights"]),
                loss=loss,
                segment_ids=segment_ids,
            )
            return loss, metrics

    return ObjectiveWeightedEncoderDecoderModel
