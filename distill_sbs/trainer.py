"""Train state, the jitted and sharded train / eval steps, and the training loop.

`Trainer` compiles one train step with explicit input/output shardings and a donated state:
dropout rngs folded from the step, optional gradient accumulation over microbatches (lax.scan), the
per-objective-normalised loss of losses.py, an optax update. Metrics come back as on-device sums;
the loop (`train`, below) adds them up on device and fetches them every N steps only.

`train` reads top to bottom: build the model, optimizer and partitioner; restore the latest
checkpoint in MODEL_DIR (or start from INITIAL_CHECKPOINT_PATH, or from scratch); skip the batches
already consumed; then step, log every `log_period` steps (the only host synchronisation), save
every `checkpoint_period` steps and at the end, evaluate every `eval_period` steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from distill_sbs.losses import objective_token_counts, weighted_objective_loss
from distill_sbs.partitioning import Partitioner

Batch = dict[str, jax.Array]

# Feature-converter keys passed to the network besides the two token arrays (absent unless packed).
_PACKING_KEYS = (
    "encoder_segment_ids",
    "encoder_positions",
    "decoder_segment_ids",
    "decoder_positions",
)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of optimizer updates applied
    params: Any
    opt_state: Any


def model_logits(model: Any, params: Any, batch: Batch, dropout_rng: jax.Array | None) -> jax.Array:
    """float32 [batch, length, vocab] decoder logits of `model` for a feature-converted batch."""
    kwargs = {k: batch[k] for k in _PACKING_KEYS if k in batch}
    return model.logits(
        params,
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        enable_dropout=dropout_rng is not None,
        dropout_rng=dropout_rng,
        **kwargs,
    )


def batch_loss(
    model: Any,
    params: Any,
    batch: Batch,
    objective_weights: jax.Array,
    dropout_rng: jax.Array | None = None,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    token_counts: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training loss of one batch (see losses.weighted_objective_loss)."""
    logits = model_logits(model, params, batch, dropout_rng)
    targets = batch["decoder_target_tokens"]
    obj = batch.get("decoder_objective_ids")
    if obj is None:  # a plain single-objective task
        obj = jnp.zeros_like(targets)
    return weighted_objective_loss(
        logits,
        targets,
        batch["decoder_loss_weights"],
        obj,
        objective_weights,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        token_counts=token_counts,
    )


class Trainer:
    """Compiled train/eval steps for one model, optimizer, partitioner and objective weights."""

    def __init__(
        self,
        model: Any,
        optimizer: optax.GradientTransformation,
        partitioner: Partitioner,
        objective_weights: Sequence[float],
        *,
        num_microbatches: int = 1,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        dropout_seed: int = 0,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.partitioner = partitioner
        self.objective_weights = np.asarray(objective_weights, np.float32)
        self.num_objectives = len(self.objective_weights)
        self.num_microbatches = num_microbatches
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.dropout_seed = dropout_seed
        self.params_shardings = partitioner.params_shardings(model.params_logical_axes())
        self._train_step = None
        self._eval_step = None

    # ---- state ------------------------------------------------------------------------------

    def abstract_state(self, abstract_params: Any = None) -> tuple[TrainState, TrainState]:
        """(abstract state with shardings, state shardings) for `abstract_params` (shapes only)."""
        if abstract_params is None:
            abstract_params = self.abstract_params()
        abstract_opt = jax.eval_shape(self.optimizer.init, abstract_params)
        opt_sh = self.partitioner.opt_state_shardings(
            abstract_opt, abstract_params, self.params_shardings
        )
        shardings = TrainState(
            step=self.partitioner.replicated(), params=self.params_shardings, opt_state=opt_sh
        )
        shapes = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params, opt_state=abstract_opt
        )
        abstract = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
        )
        return abstract, shardings

    def abstract_params(self) -> Any:
        return jax.eval_shape(self.model.init_params, jax.random.PRNGKey(0))

    @property
    def state_shardings(self) -> TrainState:
        return self.abstract_state(self.abstract_params())[1]

    def init_state(self, rng: jax.Array | None = None, params: Any = None) -> TrainState:
        """A sharded initial state: from `params` (e.g. a loaded checkpoint) or a fresh init."""
        with self.partitioner.activation_context():
            return self._init_state(rng, params)

    def _init_state(self, rng: jax.Array | None, params: Any) -> TrainState:
        _, shardings = self.abstract_state(self.abstract_params())
        if params is None:
            rng = jax.random.PRNGKey(0) if rng is None else rng
            # Initialise directly into the sharded layout (no full copy on one device).
            params = jax.jit(self.model.init_params, out_shardings=shardings.params)(rng)
        else:
            params = jax.device_put(params, shardings.params)
        opt_state = jax.jit(self.optimizer.init, out_shardings=shardings.opt_state)(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
        return TrainState(step=step, params=params, opt_state=opt_state)

    # ---- steps ------------------------------------------------------------------------------

    def _loss_and_grads(self, params: Any, batch: Batch, rng: jax.Array, counts: jax.Array):
        def loss_fn(p):
            return batch_loss(
                self.model,
                p,
                batch,
                self.objective_weights,
                rng,
                label_smoothing=self.label_smoothing,
                z_loss=self.z_loss,
                token_counts=counts,
            )

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    def _step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(jax.random.PRNGKey(self.dropout_seed), state.step)
        obj = batch.get("decoder_objective_ids")
        if obj is None:
            obj = jnp.zeros_like(batch["decoder_target_tokens"])
        # Full-batch denominators, so microbatch losses (and grads) add up to the batch's exactly.
        counts = objective_token_counts(batch["decoder_loss_weights"], obj, self.num_objectives)
        m = self.num_microbatches
        if m == 1:
            (loss, metrics), grads = self._loss_and_grads(state.params, batch, rng, counts)
        else:
            # [B, ...] -> [m, B/m, ...] taking every m-th row, so each microbatch keeps rows from
            # every data shard (no resharding of the batch axis).
            def split(x):
                x = x.reshape((x.shape[0] // m, m) + x.shape[1:])
                return jnp.swapaxes(x, 0, 1)

            micro = jax.tree.map(split, batch)

            def body(carry, xs):
                i, mb = xs
                (l_i, met_i), g_i = self._loss_and_grads(
                    state.params, mb, jax.random.fold_in(rng, i), counts
                )
                loss_acc, met_acc, g_acc = carry
                return (
                    loss_acc + l_i,
                    jax.tree.map(jnp.add, met_acc, met_i),
                    jax.tree.map(jnp.add, g_acc, g_i),
                ), None

            zeros_g = jax.tree.map(jnp.zeros_like, state.params)
            zeros_m = jax.eval_shape(
                lambda: self._loss_and_grads(
                    state.params, jax.tree.map(lambda x: x[0], micro), rng, counts
                )[0][1]
            )
            zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros_m)
            (loss, metrics, grads), _ = jax.lax.scan(
                body, (jnp.zeros((), jnp.float32), zeros_m, zeros_g), (jnp.arange(m), micro)
            )
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics)
        metrics["loss_sum"] = loss
        metrics["grad_norm_sum"] = optax.global_norm(grads)
        metrics["num_steps"] = jnp.ones((), jnp.float32)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def train_step(
        self, state: TrainState, batch: Batch
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer update; `state` is donated (do not reuse it after the call)."""
        if self._train_step is None:
            shardings = self.state_shardings
            self._train_step = jax.jit(
                self._step,
                in_shardings=(shardings, self.partitioner.batch_sharding()),
                out_shardings=(shardings, self.partitioner.replicated()),
                donate_argnums=(0,),
            )
        with self.partitioner.activation_context():
            return self._train_step(state, batch)

    def eval_step(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
        """Loss metric sums on one batch, no dropout (teacher-forced)."""
        if self._eval_step is None:

            def step(p, b):
                loss, metrics = batch_loss(self.model, p, b, self.objective_weights, None)
                return dict(metrics, loss_sum=loss, num_steps=jnp.ones((), jnp.float32))

            self._eval_step = jax.jit(
                step,
                in_shardings=(self.params_shardings, self.partitioner.batch_sharding()),
                out_shardings=self.partitioner.replicated(),
            )
        with self.partitioner.activation_context():
            return self._eval_step(params, batch)


def add_metrics(
    acc: dict[str, jax.Array] | None, new: dict[str, jax.Array]
) -> dict[str, jax.Array]:
    """Accumulates metric sums on device (no host synchronisation)."""
    return new if acc is None else jax.tree.map(jnp.add, acc, new)
