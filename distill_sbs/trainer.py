"""Train state and the jitted, sharded train / eval steps (T5X's trainer.py; the loop: training.py).

`Trainer` compiles one train step with explicit input/output shardings and a donated state:
dropout rngs folded from the step, optional gradient accumulation over microbatches (lax.scan), the
model's `loss_fn`, an optax update. Metrics come back as on-device sums; the loop adds them up on
device (`add_metrics`) and fetches them every N steps only.

The trainer knows a model only through `TrainableModel` and a batch only as a mapping of arrays
with a leading batch axis; feature names live with the model (models.py) and the loss (losses.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from distill_sbs import partitioning
from distill_sbs.losses import ObjectiveLoss
from distill_sbs.partitioning import Partitioner

Batch = Mapping[str, jax.Array]
# folded into the step's key for on-policy sampling (microbatches fold 0..m-1 for dropout)
SAMPLING_STREAM = 0x5A3D1E
Params = Any  # a pytree of float32 arrays
Metrics = dict[str, jax.Array]


class TrainableModel(Protocol):
    """What the trainer needs of a model (models.EncoderDecoderModel is one)."""

    def init_params(self, rng: jax.Array) -> Params:
        """Fresh parameters (plain arrays)."""
        ...

    def params_logical_axes(self) -> Any:
        """A tree like the parameters whose leaves are PartitionSpecs of logical axis names."""
        ...

    def loss_fn(
        self,
        params: Params,
        batch: Batch,
        dropout_rng: jax.Array | None,
        loss: ObjectiveLoss,
        token_counts: jax.Array | None = None,
    ) -> tuple[jax.Array, Metrics]:
        """(scalar loss, metric sums); dropout iff dropout_rng; token_counts: [K] denominators
        (the full batch's when `batch` is one microbatch, so microbatches add up exactly).
        A model used with a teacher also takes `teacher=` (its distributions, see Teacher)."""
        ...


class Teacher(Protocol):
    """A frozen source of the teacher's token distributions (distillation.py): run inside the
    jitted step on each (micro)batch; `params` travel as a step argument with `params_shardings`."""

    params: Any
    params_shardings: Any
    # Optional (getattr): on_policy(student, student_params, batch, rng) -> batch, run on the
    # whole batch before the loss (GKD: targets sampled from the student, distillation.OnPolicy);
    # before_step(trainer, state, batch) -> batch, run on the host before the jitted step (a
    # server teacher's round trip: distillation.ServedTeacher).

    def __call__(self, params: Any, batch: Batch) -> Any:
        """Teacher logits [b, l, vocab] or top-k (ids, log-probs) [b, l, k] (no gradients)."""
        ...


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of optimizer updates applied
    params: Params
    opt_state: Any


class Trainer:
    """Compiled train/eval steps for one model, optimizer, partitioner and objective weights."""

    def __init__(
        self,
        model: TrainableModel,
        optimizer: optax.GradientTransformation,
        partitioner: Partitioner,
        objective_weights: Sequence[float],
        *,
        num_microbatches: int = 1,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        dropout_seed: int = 0,
        teacher: Teacher | None = None,
        divergence: Mapping[str, Any] | None = None,
    ) -> None:
        """teacher, divergence: distillation (distillation.py); divergence holds ObjectiveLoss's
        divergence fields (divergence_weights, divergence, beta, temperature, scale_by_t2)."""
        self.model = model
        self.optimizer = optimizer
        self.partitioner = partitioner
        self.loss = ObjectiveLoss(
            tuple(objective_weights), label_smoothing, z_loss, **(divergence or {})
        )
        if self.loss.distills and teacher is None:
            raise ValueError("divergence weights are set but no teacher was given")
        self.teacher = teacher
        self.num_microbatches = num_microbatches
        self.dropout_seed = dropout_seed
        self._train_step = None
        self._eval_step = None

    # ---- state ------------------------------------------------------------------------------

    @functools.cached_property
    def _abstract_and_shardings(self) -> tuple[TrainState, TrainState]:
        # One pass: params boxed in their logical axes go through optimizer.init, which keeps the
        # boxes on the moments; every state leaf's sharding is read from its box.
        params = jax.eval_shape(self.model.init_params, jax.random.PRNGKey(0))
        boxed_params = partitioning.box_logical_axes(params, self.model.params_logical_axes())
        boxed = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32),
            params=boxed_params,
            opt_state=jax.eval_shape(self.optimizer.init, boxed_params),
        )
        shardings = self.partitioner.logical_to_sharding(partitioning.logical_specs(boxed))
        abstract = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            nn.meta.unbox(boxed),
            shardings,
        )
        return abstract, shardings

    def abstract_state(self) -> tuple[TrainState, TrainState]:
        """(abstract state: ShapeDtypeStructs with shardings, state of NamedShardings); cached."""
        return self._abstract_and_shardings

    @property
    def state_shardings(self) -> TrainState:
        return self._abstract_and_shardings[1]

    @property
    def params_shardings(self) -> Any:
        return self.state_shardings.params

    def init_state(self, rng: jax.Array | None = None, params: Params = None) -> TrainState:
        """A sharded initial state: from `params` (e.g. a loaded checkpoint) or a fresh init."""
        shardings = self.state_shardings
        with self.partitioner.activation_context():
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

    def _loss_and_grads(
        self, params: Params, batch: Batch, rng: jax.Array, counts: jax.Array, teacher_params=None
    ) -> tuple[tuple[jax.Array, Metrics], Params]:
        # The teacher runs outside the differentiated function: no gradient reaches it.
        extra = {} if self.teacher is None else {"teacher": self.teacher(teacher_params, batch)}

        def loss_fn(p: Params) -> tuple[jax.Array, Metrics]:
            return self.model.loss_fn(p, batch, rng, self.loss, counts, **extra)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    def _accumulate(
        self, params: Params, batch: Batch, rng: jax.Array, counts: jax.Array, teacher_params=None
    ) -> tuple[jax.Array, Metrics, Params]:
        """Loss, metric sums and gradients summed over `num_microbatches` slices (lax.scan)."""
        m = self.num_microbatches

        # [B, ...] -> [m, B/m, ...] taking every m-th row, so each microbatch keeps rows from
        # every data shard (no resharding of the batch axis).
        def split(x: jax.Array) -> jax.Array:
            x = x.reshape((x.shape[0] // m, m) + x.shape[1:])
            return jnp.swapaxes(x, 0, 1)

        micro = jax.tree.map(split, dict(batch))

        def body(carry, xs):
            i, mb = xs
            (loss, metrics), grads = self._loss_and_grads(
                params, mb, jax.random.fold_in(rng, i), counts, teacher_params
            )
            return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(
            lambda: self._loss_and_grads(params, first, rng, counts, teacher_params)
        )
        (loss_s, metrics_s), grads_s = shapes
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss_s, metrics_s, grads_s))
        (loss, metrics, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(m), micro))
        return loss, metrics, grads

    def _step(
        self, state: TrainState, batch: Batch, teacher_params: Any = None
    ) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(jax.random.PRNGKey(self.dropout_seed), state.step)
        on_policy = getattr(self.teacher, "on_policy", None)
        if on_policy is not None:  # before the counts: sampled targets have their own lengths
            batch = on_policy(self.model, state.params, batch, self.sampling_rng(state.step))
        # Full-batch denominators, so microbatch losses (and grads) add up to the batch's exactly.
        counts = self.loss.token_counts(batch)
        if self.num_microbatches == 1:
            (loss, metrics), grads = self._loss_and_grads(
                state.params, batch, rng, counts, teacher_params
            )
        else:
            loss, metrics, grads = self._accumulate(
                state.params, batch, rng, counts, teacher_params
            )
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics)
        metrics["loss_sum"] = loss
        metrics["grad_norm_sum"] = optax.global_norm(grads)
        metrics["num_steps"] = jnp.ones((), jnp.float32)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def sampling_rng(self, step: jax.Array) -> jax.Array:
        """The key of step `step`'s on-policy samples: a resumed run draws the same ones."""
        rng = jax.random.fold_in(jax.random.PRNGKey(self.dropout_seed), step)
        return jax.random.fold_in(rng, SAMPLING_STREAM)

    def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        """One optimizer update; `state` is donated (do not reuse it after the call)."""
        before = getattr(self.teacher, "before_step", None)
        if before is not None:  # the host's part of the step (a server teacher's round trip)
            batch = before(self, state, batch)
        if self._train_step is None:
            shardings = self.state_shardings
            in_shardings = (shardings, self.partitioner.batch_sharding())
            if self.teacher is not None:
                in_shardings += (self.teacher.params_shardings,)
            self._train_step = jax.jit(
                self._step,
                in_shardings=in_shardings,
                out_shardings=(shardings, self.partitioner.replicated()),
                donate_argnums=(0,),
            )
        teacher_args = () if self.teacher is None else (self.teacher.params,)
        with self.partitioner.activation_context():
            return self._train_step(state, batch, *teacher_args)

    def eval_step(self, params: Params, batch: Batch) -> Metrics:
        """Loss metric sums on one batch, no dropout (teacher-forced)."""
        if self._eval_step is None:
            # Teacher-forced eval loss: the objectives' CE only (no teacher at evaluation).
            ce_only = dataclasses.replace(self.loss, divergence_weights=())

            def step(p: Params, b: Batch) -> Metrics:
                loss, metrics = self.model.loss_fn(p, b, None, ce_only)
                return dict(metrics, loss_sum=loss, num_steps=jnp.ones((), jnp.float32))

            self._eval_step = jax.jit(
                step,
                in_shardings=(self.params_shardings, self.partitioner.batch_sharding()),
                out_shardings=self.partitioner.replicated(),
            )
        with self.partitioner.activation_context():
            return self._eval_step(params, batch)


def add_metrics(acc: Metrics | None, new: Metrics) -> Metrics:
    """Accumulates metric sums on device (no host synchronisation)."""
    return new if acc is None else jax.tree.map(jnp.add, acc, new)
