"""optax optimizers and learning-rate schedules as gin choices.

- `adafactor`: as T5X fine-tunes T5 (constant lr 1e-3, decay_rate 0.8, no momentum, parameter-scale
  updates, update clipping 1.0); optax.adafactor's defaults are exactly these.
- `adamw`: as the Distilling Step-by-Step reference trains (Hugging Face Trainer: AdamW lr 5e-5,
  betas (0.9, 0.999), eps 1e-8, weight decay 0, linear decay to 0 without warmup).
"""

from __future__ import annotations

from collections.abc import Callable

import gin
import optax

from distill_sbs.errors import UserError

Schedule = Callable[[int], float]


@gin.configurable
def learning_rate_schedule(
    learning_rate: float,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    end_value: float = 0.0,
) -> Schedule:
    """constant | linear (to end_value at total_steps) | cosine | rsqrt (T5 pre-training),
    each after an optional linear warmup from 0."""
    if schedule == "constant":
        main = optax.constant_schedule(learning_rate)
    elif schedule in ("linear", "cosine"):
        if not total_steps:
            raise ValueError(f"learning_rate_schedule: schedule={schedule!r} needs total_steps")
        decay_steps = max(total_steps - warmup_steps, 1)
        if schedule == "linear":
            main = optax.linear_schedule(learning_rate, end_value, decay_steps)
        else:
            main = optax.cosine_decay_schedule(
                learning_rate, decay_steps, end_value / learning_rate
            )
    elif schedule == "rsqrt":
        offset = max(warmup_steps, 1)
        main = lambda step: learning_rate * (offset / (step + offset)) ** 0.5
    else:
        raise ValueError(
            f"learning_rate_schedule: unknown schedule {schedule!r}; "
            "use constant, linear, cosine or rsqrt"
        )
    if warmup_steps <= 0:
        return main
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, main], [warmup_steps])


@gin.configurable
def create_optimizer(
    name: str = "adafactor",
    learning_rate: float | None = None,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    weight_decay: float = 0.0,
    grad_clip_norm: float | None = None,
    b1: float | None = None,
    b2: float | None = None,
    eps: float | None = None,
) -> tuple[optax.GradientTransformation, Schedule]:
    """Returns (optimizer, learning-rate schedule). learning_rate defaults per optimizer:
    1e-3 for adafactor (T5X fine-tuning), 5e-5 for adamw (DSS reference). b1, b2, eps are
    adamw's (default 0.9, 0.999, 1e-8); sgd has no weight decay. A setting the chosen optimizer
    would ignore is a UserError, not silently dropped."""
    _check_settings(name, weight_decay=weight_decay, b1=b1, b2=b2, eps=eps)
    if name == "adafactor":
        lr = 1e-3 if learning_rate is None else learning_rate
        sched = learning_rate_schedule(lr, schedule, warmup_steps, total_steps)
        tx = optax.adafactor(
            learning_rate=sched,
            weight_decay_rate=weight_decay or None,
        )
    elif name == "adamw":
        lr = 5e-5 if learning_rate is None else learning_rate
        sched = learning_rate_schedule(lr, schedule, warmup_steps, total_steps)
        tx = optax.adamw(
            sched,
            b1=0.9 if b1 is None else b1,
            b2=0.999 if b2 is None else b2,
            eps=1e-8 if eps is None else eps,
            weight_decay=weight_decay,
        )
    elif name == "sgd":
        lr = 1e-2 if learning_rate is None else learning_rate
        sched = learning_rate_schedule(lr, schedule, warmup_steps, total_steps)
        tx = optax.sgd(sched)
    else:
        raise UserError(
            f"create_optimizer: unknown optimizer {name!r}; use adafactor, adamw or sgd"
        )
    if grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
    return tx, sched


def _check_settings(name: str, *, weight_decay: float, **adam_settings: float | None) -> None:
    """Settings that `name` has no use for are errors (the user meant something by them)."""
    ignored = [f"{k}={v}" for k, v in adam_settings.items() if v is not None and name != "adamw"]
    if weight_decay and name == "sgd":
        ignored.append(f"weight_decay={weight_decay}")
    if ignored:
        raise UserError(
            f"create_optimizer: name={name!r} does not use {', '.join(ignored)}; "
            "remove the binding(s) or use name='adamw'"
        )
