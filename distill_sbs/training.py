"""The training loop: `train` (gin-configurable), resuming from MODEL_DIR."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import gin
import jax
import jax.numpy as jnp
import seqio

from distill_sbs import checkpoints, optimizers, partitioning
from distill_sbs.evaluation import TaskEvaluator
from distill_sbs.losses import summarize_metrics
from distill_sbs.network import T5Config
from distill_sbs.trainer import Trainer, TrainState, add_metrics

METRICS_FILE = "train_metrics.jsonl"


def task_vocabulary(mixture_or_task_name: str) -> seqio.Vocabulary:
    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    return provider.output_features["targets"].vocabulary


def objectives_of(mixture_or_task_name: str) -> list[tuple[str, float]]:
    """(name, weight) per objective id; a plain SeqIO task is one objective of weight 1."""
    from distill_sbs import data

    try:
        return [(o.name, o.weight) for o in data.get_objectives(mixture_or_task_name)]
    except KeyError:
        return [("targets", 1.0)]


def build_model(config: T5Config, vocabulary: seqio.Vocabulary | None) -> Any:
    from distill_sbs.models import EncoderDecoderModel

    if vocabulary is not None and config.vocab_size < vocabulary.vocab_size:
        raise ValueError(
            f"T5Config.vocab_size={config.vocab_size} is smaller than the task vocabulary "
            f"({vocabulary.vocab_size} ids); set T5Config.vocab_size >= {vocabulary.vocab_size}"
        )
    return EncoderDecoderModel(config, vocabulary)


def load_initial_params(path: str, abstract_params: Any) -> Any:
    """Parameters of a native checkpoint / MODEL_DIR / HF folder, checked against the model."""
    from distill_sbs import models

    _, params = models.load(path)
    want = jax.tree_util.tree_leaves_with_path(abstract_params)
    got = dict(jax.tree_util.tree_leaves_with_path(params))
    got = {jax.tree_util.keystr(k): v for k, v in got.items()}
    for k, a in want:
        key = jax.tree_util.keystr(k)
        if key not in got:
            raise ValueError(f"INITIAL_CHECKPOINT_PATH={path}: no parameter {key} (model mismatch)")
        if tuple(got[key].shape) != tuple(a.shape):
            raise ValueError(
                f"INITIAL_CHECKPOINT_PATH={path}: parameter {key} has shape {got[key].shape}, "
                f"the model (gin T5Config) wants {a.shape}"
            )
    return params


class _Progress:
    """steps/s, examples/s and ETA between two log points."""

    def __init__(self, start_step: int, total: int, batch_size: int) -> None:
        self.t, self.step, self.total, self.batch = time.time(), start_step, total, batch_size

    def line(self, step: int) -> tuple[str, dict[str, float]]:
        now = time.time()
        sps = (step - self.step) / max(now - self.t, 1e-9)
        self.t, self.step = now, step
        eta = (self.total - step) / max(sps, 1e-9)
        text = f"{sps:.2f} steps/s, {sps * self.batch:.1f} examples/s, ETA {eta / 60:.1f} min"
        return text, {
            "timing/steps_per_second": sps,
            "timing/examples_per_second": sps * self.batch,
        }


@gin.configurable(denylist=["partitioner"])
def train(
    *,
    model_dir: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    train_steps: int = gin.REQUIRED,
    batch_size: int = gin.REQUIRED,
    model_config: T5Config | None = None,
    initial_checkpoint_path: str | None = None,
    pack: bool = True,
    seed: int = 0,
    num_microbatches: int = 1,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    log_period: int = 50,
    checkpoint_period: int = 1000,
    keep_checkpoints: int | None = 3,
    async_checkpointing: bool = True,
    eval_period: int = 0,
    eval_split: str = "test",
    eval_num_examples: int | None = None,
    eval_batch_size: int = 32,
    max_decode_length: int | None = None,
    best_metric: str | None = None,
    eval_at_end: bool = True,
    eval_loss_batches: int = 0,
    stop_after_steps: int | None = None,
    partitioner: partitioning.Partitioner | None = None,
) -> dict[str, float]:
    """Trains until `train_steps` (resuming from MODEL_DIR); returns the final metrics.

    stop_after_steps: end this process after that many steps (for tests and time-sliced jobs);
    a later run resumes from the final save.
    eval_loss_batches: at each evaluation also report the teacher-forced loss and token accuracy
    per objective on that many batches of the eval split (0: predictions and metrics only).
    """
    import tensorflow as tf

    from distill_sbs import data

    try:  # the input pipeline must not take accelerator memory from JAX
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already initialised its devices
        pass
    if "://" not in model_dir:  # keep gs:// and other URLs as they are
        model_dir = os.path.abspath(os.path.expanduser(model_dir))
    tf.io.gfile.makedirs(model_dir)
    partitioner = partitioner or partitioning.create_partitioner()
    vocabulary = task_vocabulary(mixture_or_task_name)
    config = model_config or T5Config()
    model = build_model(config, vocabulary)
    objectives = objectives_of(mixture_or_task_name)
    names = [n for n, _ in objectives]
    optimizer, lr_schedule = optimizers.create_optimizer(total_steps=train_steps)
    trainer = Trainer(
        model,
        optimizer,
        partitioner,
        [w for _, w in objectives],
        num_microbatches=num_microbatches,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        dropout_seed=seed,
    )
    num_hosts = jax.process_count()
    if batch_size % partitioner.data_size or batch_size % num_hosts:
        raise ValueError(
            f"BATCH_SIZE={batch_size} must be divisible by the data-parallel size "
            f"{partitioner.data_size} and the number of hosts {num_hosts}"
        )
    ckpt = checkpoints.CheckpointManager(
        model_dir,
        config=config,
        vocab_file=getattr(vocabulary, "sentencepiece_model_file", None),
        extra_ids=getattr(vocabulary, "extra_ids", 0),
        save_interval_steps=checkpoint_period,
        max_to_keep=keep_checkpoints,
        async_save=async_checkpointing,
        best_metric=best_metric,
    )

    # ---- state: resume > initial checkpoint > fresh ---------------------------------------------
    abstract, shardings = trainer.abstract_state(trainer.abstract_params())
    latest = ckpt.latest_step()
    batches_consumed = 0
    if latest is not None:
        params, opt_state, data_state = ckpt.restore(latest, abstract.params, abstract.opt_state)
        state = TrainState(
            step=jax.device_put(jnp.asarray(latest, jnp.int32), shardings.step),
            params=params,
            opt_state=opt_state,
        )
        batches_consumed = int(data_state["batches_consumed"])
        print(f"resumed from {model_dir}/{checkpoints.STEP_PREFIX}_{latest}")
    elif initial_checkpoint_path:
        state = trainer.init_state(
            params=load_initial_params(initial_checkpoint_path, abstract.params)
        )
        print(f"initialised from {initial_checkpoint_path}")
    else:
        state = trainer.init_state(jax.random.PRNGKey(seed))
    start_step = int(latest or 0)

    # ---- data: this host's shard, deterministic, skipped to the saved position -----------------
    shard_id, num_shards = partitioning.host_shard_info()
    ds = data.get_dataset(
        mixture_or_task_name,
        task_feature_lengths=task_feature_lengths,
        split="train",
        batch_size=batch_size // num_shards,
        shuffle=True,
        seed=seed,
        pack=pack,
        shard_id=shard_id,
        num_shards=num_shards,
        repeat=True,
    )
    if batches_consumed:
        ds = ds.skip(batches_consumed)
    batches = ds.as_numpy_iterator()

    eval_metrics: dict[str, float] = {}
    do_eval = bool(eval_period or best_metric or eval_at_end)

    import tensorflow as tf

    is_chief = jax.process_index() == 0
    train_writer = (
        tf.summary.create_file_writer(os.path.join(model_dir, "train")) if is_chief else None
    )
    eval_writer = (
        tf.summary.create_file_writer(os.path.join(model_dir, "eval")) if is_chief else None
    )
    metrics_log = (
        tf.io.gfile.GFile(os.path.join(model_dir, METRICS_FILE), "a") if is_chief else None
    )

    def eval_loss(step: int) -> dict[str, float]:
        try:
            eval_ds = data.get_dataset(
                mixture_or_task_name,
                task_feature_lengths=task_feature_lengths,
                split=eval_split,
                batch_size=batch_size // num_shards,
                shuffle=False,
                pack=pack,
                shard_id=shard_id,
                num_shards=num_shards,
                repeat=False,
            )
        except ValueError as e:  # e.g. an objective without examples on the eval split
            print(f"step {step}: no eval loss: {e}")
            return {}
        sums = None
        for b in eval_ds.take(eval_loss_batches).as_numpy_iterator():
            if len(b["decoder_target_tokens"]) != batch_size // num_shards:
                continue  # a final partial batch would not split over the data axis
            sums = add_metrics(
                sums, trainer.eval_step(state.params, partitioner.host_batch_to_global(b))
            )
        if sums is None:
            return {}
        sums = jax.device_get(sums)
        out = summarize_metrics(sums, names)
        out["loss"] = float(sums["loss_sum"]) / float(sums["num_steps"])
        return {f"eval_loss/{k}": v for k, v in out.items()}

    task_evaluator: TaskEvaluator | None = None

    def evaluate(step: int) -> dict[str, float]:
        nonlocal task_evaluator
        if task_evaluator is None:  # built on first use: it caches the eval examples
            task_evaluator = TaskEvaluator(
                mixture_or_task_name,
                split=eval_split,
                task_feature_lengths=task_feature_lengths,
                num_examples=eval_num_examples,
            )
        results, _ = task_evaluator.evaluate(
            model,
            state.params,
            batch_size=eval_batch_size,
            max_decode_length=max_decode_length,
            step=step,
        )
        if eval_loss_batches:
            results.update(eval_loss(step))
        print(f"step {step} eval: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(results.items())))
        if eval_writer is not None:
            with eval_writer.as_default():
                for k, v in results.items():
                    tf.summary.scalar(k, v, step=step)
        ckpt.save_best(step, state.params, results)
        return results

    # ---- the loop ------------------------------------------------------------------------------
    progress = _Progress(start_step, train_steps, batch_size)
    acc = None
    train_summary: dict[str, float] = {}
    step = start_step
    end_step = (
        train_steps if stop_after_steps is None else min(train_steps, start_step + stop_after_steps)
    )
    while step < end_step:
        host_batch = next(batches)
        state, step_metrics = trainer.train_step(
            state, partitioner.host_batch_to_global(host_batch)
        )
        acc = add_metrics(acc, step_metrics)
        step += 1
        batches_consumed += 1
        if step % log_period == 0 or step == end_step:
            sums = jax.device_get(acc)  # the only host synchronisation of the loop
            acc = None
            n = float(sums["num_steps"])
            train_summary = {
                "loss": float(sums["loss_sum"]) / n,
                "grad_norm": float(sums["grad_norm_sum"]) / n,
                "learning_rate": float(lr_schedule(step - 1)),
                **summarize_metrics(sums, names),
            }
            timing, timing_metrics = progress.line(step)
            per_obj = " ".join(
                f"{k}={v:.4f}"
                for k, v in train_summary.items()
                if k.endswith(("/loss", "/accuracy"))
            )
            print(
                f"step {step}/{train_steps} loss={train_summary['loss']:.4f} {per_obj} | {timing}",
                flush=True,
            )
            if is_chief:
                with train_writer.as_default():
                    for k, v in {**train_summary, **timing_metrics}.items():
                        tf.summary.scalar(k, v, step=step)
                metrics_log.write(json.dumps({"step": step, **train_summary}) + "\n")
                metrics_log.flush()
        if ckpt.should_save(step) or step == end_step:
            ckpt.save(
                step,
                state.params,
                state.opt_state,
                {"batches_consumed": batches_consumed, "seed": seed},
                force=step == end_step,
            )
        if do_eval and eval_period and step % eval_period == 0:
            eval_metrics = evaluate(step)

    if do_eval and eval_at_end and step == train_steps and (not eval_period or step % eval_period):
        eval_metrics = evaluate(step)
    ckpt.wait_until_finished()
    ckpt.close()
    final = {**{f"train/{k}": v for k, v in train_summary.items()}, **eval_metrics}
    if is_chief:
        metrics_log.close()
        train_writer.flush()
        eval_writer.flush()
        with tf.io.gfile.GFile(os.path.join(model_dir, "final_metrics.json"), "w") as f:
            json.dump({"step": step, **final}, f, indent=2)
        print(f"final metrics (step {step}):")
        for k, v in sorted(final.items()):
            print(f"  {k}: {v:.4f}")
    return final
