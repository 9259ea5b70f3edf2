"""Train a student, T5X style: `train()` (gin-configurable; the T5X macros) and `main`.

    python -m distill_sbs.train --gin_file=runs/train.gin --gin_file=models/t5_1_1_small.gin \
        --gin.MODEL_DIR="'/tmp/run'" --gin.MIXTURE_OR_TASK_NAME="'arith_dss'"
    python -m distill_sbs.train --gin_file=paper/base.gin --gin_file=paper/cqa.gin \
        --gin_file=models/t5_1_1_base.gin --gin.METHOD="'dss'" \
        --gin.MODEL_DIR="'/tmp/run'" --gin.PRETRAINED_DIR="'/ckpt/t5-v1_1-base'"

gin files by path or relative to the package's gin/ directory; `--gin.KEY=VALUE` binds a macro
or parameter. Rerunning with the same MODEL_DIR resumes from its latest checkpoint. Several
students side by side (the quickstart) are `python -m distill_sbs.compare`.

The loop, in MaxText's shape: setup -> loop -> iteration. `train` reads top to bottom: `setup`
builds the model, optimizer, Trainer and checkpoint manager; `restore_state` resumes from
MODEL_DIR's latest checkpoint, else starts from INITIAL_CHECKPOINT_PATH, else from a fresh init;
`train_batches` is this host's deterministic stream, skipped to the saved position. Then each
`train_iteration` runs one compiled step and adds its metric sums on device; every `log_period`
steps (clu's ReportProgress decides, and measures steps/s; the host counts each batch's real
tokens and model FLOPs, flops.py, for tokens/s and MFU) `log_train` fetches them, the loop's only
host synchronisation, and writes them through clu metric writers (TensorBoard under
MODEL_DIR/train, MODEL_DIR/train_metrics.jsonl); a checkpoint every `checkpoint_period` steps and
at the end; `PeriodicEval` every `eval_period` steps and at the end (TensorBoard under
MODEL_DIR/eval); `finish` writes final_metrics.json.
"""

from __future__ import annotations

if __name__ == "__main__":
    # `python -m distill_sbs.train` runs this file as __main__; hand over to the package's copy of
    # the module so that gin registers its configurables once (not also as __main__.*).
    from distill_sbs.train import main as _main

    _main()
    raise SystemExit(0)

import dataclasses
import json
from collections.abc import Iterator, Mapping
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio
import tensorflow as tf
from clu import metric_writers, periodic_actions

from distill_sbs import checkpoints, cli, distillation, flops, optimizers, partitioning, storage
from distill_sbs.errors import UserError
from distill_sbs.eval import TaskEvaluator
from distill_sbs.losses import summarize_metrics
from distill_sbs.network import T5Config
from distill_sbs.teachers import topk
from distill_sbs.trainer import Trainer, TrainState, add_metrics

METRICS_FILE = "train_metrics.jsonl"
FINAL_METRICS_FILE = "final_metrics.json"


@gin.configurable("train")
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run's options: the `train.*` gin parameters (runs/train.gin binds them to T5X's
    macros) and the keyword arguments of `train`; what is not given comes from gin.

    stop_after_steps: end this process after that many steps (for tests and time-sliced jobs);
    a later run resumes from the final save. kd: logit distillation (distillation.KD), or None.
    eval_loss_batches: at each evaluation also report the teacher-forced loss and token accuracy
    per objective on that many batches of the eval split (0: predictions and metrics only).
    """

    model_dir: str = gin.REQUIRED
    mixture_or_task_name: str = gin.REQUIRED
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED
    train_steps: int = gin.REQUIRED
    batch_size: int = gin.REQUIRED
    model_config: T5Config | None = None
    initial_checkpoint_path: str | None = None
    pack: bool = True
    seed: int = 0
    num_microbatches: int = 1
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    log_period: int = 50
    checkpoint_period: int = 1000
    keep_checkpoints: int | None = 3
    async_checkpointing: bool = True
    eval_period: int = 0
    eval_split: str = "test"
    eval_num_examples: int | None = None
    eval_batch_size: int = 32
    max_decode_length: int | None = None
    best_metric: str | None = None
    eval_at_end: bool = True
    eval_loss_batches: int = 0
    stop_after_steps: int | None = None
    kd: distillation.KD | None = None


def train(
    config: TrainConfig | None = None,
    *,
    partitioner: partitioning.Partitioner | None = None,
    **options: Any,
) -> dict[str, float]:
    """Trains until `train_steps` (resuming from MODEL_DIR); returns the final metrics.

    config: the run's options; without it they are `options` (TrainConfig's fields) over gin's
    `train.*` bindings, e.g. `train(model_dir=..., mixture_or_task_name=...)`.
    """
    cfg = config if config is not None else TrainConfig(**options)
    partitioner = partitioner or partitioning.create_partitioner()
    _hide_gpus_from_tensorflow()
    run = setup(cfg, partitioner)
    if (final := _final_metrics_of_finished_run(run, cfg.train_steps)) is not None:
        return final  # rerun of a finished run: nothing to restore or train
    state, start_step, consumed = restore_state(run, cfg)
    drop_metrics_after(run.model_dir, start_step)  # a resume re-logs the steps after its checkpoint
    batches = train_batches(cfg, skip=consumed)
    writers = create_writers(run.model_dir)
    save_operative_config(run.model_dir, writers.train, start_step)
    periodic_eval = PeriodicEval(cfg, run, writers.eval)
    end_step = cfg.train_steps
    if cfg.stop_after_steps is not None:
        end_step = min(cfg.train_steps, start_step + cfg.stop_after_steps)
    progress = _ReportProgress(
        num_train_steps=cfg.train_steps,
        every_steps=cfg.log_period,
        every_secs=None,  # log on fixed steps only, so the logged windows line up
        on_steps=[end_step],
        writer=writers.progress,
    )
    progress.throughput = throughput_counter(run)
    progress(start_step)  # the first call only starts the clock
    acc, train_summary, eval_metrics = None, {}, {}
    step = start_step
    for step in range(start_step + 1, end_step + 1):
        host_batch = next(batches)
        progress.throughput.add(host_batch)
        state, acc = train_iteration(run, state, host_batch, acc)
        run.ckpt.check()  # a background save that failed stops the run now, not a save later
        if progress(step):  # every log_period steps and at end_step
            train_summary = log_train(run, cfg, step, jax.device_get(acc), progress, writers.train)
            acc = None
        if run.ckpt.should_save(step) or step == end_step:
            data_state = {"batches_consumed": consumed + step - start_step, "seed": cfg.seed}
            force = step == end_step
            run.ckpt.save(step, state.params, state.opt_state, data_state, force=force)
        if cfg.eval_period and step % cfg.eval_period == 0:
            eval_metrics = periodic_eval(step, state.params)
    at_end = step == cfg.train_steps and (not cfg.eval_period or step % cfg.eval_period)
    at_end = at_end or start_step == cfg.train_steps  # a rerun repairing final_metrics.json
    if cfg.eval_at_end and at_end:
        eval_metrics = periodic_eval(step, state.params)
    return finish(run, writers, step, train_summary, eval_metrics)


@dataclasses.dataclass
class Run:
    """What `setup` builds for one training run."""

    model_dir: str  # absolute unless a URL (gs://...)
    model: Any  # models.EncoderDecoderModel
    objective_names: list[str]  # by objective id
    trainer: Trainer
    partitioner: partitioning.Partitioner
    lr_schedule: Any  # optax schedule: step -> learning rate
    ckpt: checkpoints.CheckpointManager


# ---- setup ------------------------------------------------------------------------------------


def _hide_gpus_from_tensorflow() -> None:
    try:  # the input pipeline must not take accelerator memory from JAX
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already initialised its devices
        pass


def setup(cfg: TrainConfig, partitioner: partitioning.Partitioner) -> Run:
    """Model, optimizer, Trainer and checkpoint manager of a run; checks BATCH_SIZE."""
    num_hosts = jax.process_count()
    if cfg.batch_size % partitioner.data_size or cfg.batch_size % num_hosts:
        raise ValueError(
            f"BATCH_SIZE={cfg.batch_size} must be divisible by the data-parallel size "
            f"{partitioner.data_size} and the number of processes {num_hosts} (JAX_NUM_PROCESSES)"
        )
    model_dir = storage.resolve(cfg.model_dir)  # gs:// and other URLs stay as they are
    storage.makedirs(model_dir)
    vocabulary = task_vocabulary(cfg.mixture_or_task_name)
    config = cfg.model_config or T5Config()
    model = build_model(config, vocabulary)
    objectives = objectives_of(cfg.mixture_or_task_name)
    optimizer, lr_schedule = optimizers.create_optimizer(total_steps=cfg.train_steps)
    kd_args = {}
    if cfg.kd is not None:
        kd_args = {
            "teacher": distillation.build_teacher(
                cfg.kd, config.vocab_size, partitioner, topk.score_samples
            ),
            "divergence": cfg.kd.loss_fields([n for n, _ in objectives]),
        }
    trainer = Trainer(
        model,
        optimizer,
        partitioner,
        [w for _, w in objectives],
        num_microbatches=cfg.num_microbatches,
        label_smoothing=cfg.label_smoothing,
        z_loss=cfg.z_loss,
        dropout_seed=cfg.seed,
        **kd_args,
    )
    ckpt = checkpoints.CheckpointManager(
        model_dir,
        config=config,
        vocab_file=getattr(vocabulary, "sentencepiece_model_file", None),
        extra_ids=getattr(vocabulary, "extra_ids", 0),
        save_interval_steps=cfg.checkpoint_period,
        max_to_keep=cfg.keep_checkpoints,
        async_save=cfg.async_checkpointing,
        best_metric=cfg.best_metric,
    )
    names = [n for n, _ in objectives]
    return Run(model_dir, model, names, trainer, partitioner, lr_schedule, ckpt)


def task_vocabulary(mixture_or_task_name: str) -> seqio.Vocabulary:
    from distill_sbs import eval as evaluation

    return evaluation.task_vocabulary(mixture_or_task_name)  # an unknown name: a UserError


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


# ---- state: resume > initial checkpoint > fresh -----------------------------------------------


def restore_state(run: Run, cfg: TrainConfig) -> tuple[TrainState, int, int]:
    """(state, its step, batches already consumed) from MODEL_DIR's latest checkpoint, else from
    INITIAL_CHECKPOINT_PATH (step 0), else freshly initialised from the seed."""
    abstract, shardings = run.trainer.abstract_state()
    newest = run.ckpt.restore_newest(abstract.params, abstract.opt_state)  # intact, with warnings
    if newest is not None:
        latest, params, opt_state, data_state = newest
        step = jax.device_put(jnp.asarray(latest, jnp.int32), shardings.step)
        print(f"resumed from {run.model_dir}/{checkpoints.STEP_PREFIX}_{latest}")
        state = TrainState(step=step, params=params, opt_state=opt_state)
        return state, latest, int(data_state["batches_consumed"])
    if cfg.initial_checkpoint_path:
        params = load_initial_params(cfg.initial_checkpoint_path, abstract.params)
        print(f"initialised from {cfg.initial_checkpoint_path}")
        return run.trainer.init_state(params=params), 0, 0
    return run.trainer.init_state(jax.random.PRNGKey(cfg.seed)), 0, 0


def load_initial_params(path: str, abstract_params: Any) -> Any:
    """Parameters of a native checkpoint / MODEL_DIR / HF folder (local or gs://), checked against
    the model from the checkpoint's config, then restored straight into the shardings of
    `abstract_params` (orbax for native checkpoints; slices of HF safetensors)."""
    from distill_sbs import models

    if not storage.exists(path):
        raise FileNotFoundError(f"INITIAL_CHECKPOINT_PATH={path}: no such checkpoint directory")
    config = models.read_config(path)
    stored = jax.eval_shape(models.EncoderDecoderModel(config).init_params, jax.random.PRNGKey(0))
    got = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(stored)}
    for k, a in jax.tree_util.tree_leaves_with_path(abstract_params):
        key = jax.tree_util.keystr(k)
        if key not in got:
            raise ValueError(f"INITIAL_CHECKPOINT_PATH={path}: no parameter {key} (model mismatch)")
        if tuple(got[key].shape) != tuple(a.shape):
            raise ValueError(
                f"INITIAL_CHECKPOINT_PATH={path}: parameter {key} has shape {got[key].shape}, "
                f"the model (gin T5Config) wants {a.shape}"
            )
    _, params = models.load(path, abstract_params=abstract_params)
    return params


# ---- data -------------------------------------------------------------------------------------


def host_dataset(cfg: TrainConfig, split: str, *, training: bool) -> tf.data.Dataset:
    """This host's shard of a split in batches of BATCH_SIZE / hosts: shuffled and repeated
    (deterministically, from the seed) for training, one ordered pass otherwise."""
    from distill_sbs import data

    shard_id, num_shards = partitioning.host_shard_info()
    return data.get_dataset(
        cfg.mixture_or_task_name,
        task_feature_lengths=cfg.task_feature_lengths,
        split=split,
        batch_size=cfg.batch_size // num_shards,
        shuffle=training,
        seed=cfg.seed,
        pack=cfg.pack,
        shard_id=shard_id,
        num_shards=num_shards,
        repeat=training,
    )


def train_batches(cfg: TrainConfig, skip: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """The train stream of this host, past the `skip` batches a resumed run already consumed."""
    ds = host_dataset(cfg, "train", training=True)
    if skip:
        ds = ds.skip(skip)
    return ds.as_numpy_iterator()


# ---- one iteration ----------------------------------------------------------------------------


def train_iteration(
    run: Run, state: TrainState, host_batch: dict[str, np.ndarray], acc: dict | None
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update; its metric sums are added to `acc` on device (no host sync)."""
    state, metrics = run.trainer.train_step(state, run.partitioner.host_batch_to_global(host_batch))
    return state, add_metrics(acc, metrics)


# ---- metrics: writers, logging, evaluation ----------------------------------------------------


class JsonlWriter(metric_writers.MetricWriter):
    """A clu MetricWriter appending one JSON line {"step", **scalars} per write_scalars call.
    Scalars only: images, audio, histograms and the like go to TensorBoard."""

    def __init__(self, path: str) -> None:
        # A local file (create_writers mirrors it when MODEL_DIR is remote): appends need one.
        self._file = storage.Path(path).open("a")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()  # readers (and a resume after SIGKILL) see whole lines

    def write_summaries(self, step, values, metadata=None) -> None:
        pass

    def write_images(self, step, images) -> None:
        pass

    def write_videos(self, step, videos) -> None:
        pass

    def write_audios(self, step, audios, *, sample_rate) -> None:
        pass

    def write_texts(self, step, texts) -> None:
        pass

    def write_histograms(self, step, arrays, num_buckets=None) -> None:
        pass

    def write_hparams(self, hparams) -> None:
        pass

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


@dataclasses.dataclass
class Writers:
    train: metric_writers.MetricWriter  # train summaries: TensorBoard train/ + train_metrics.jsonl
    progress: metric_writers.MetricWriter | None  # steps/s and uptime: TensorBoard train/
    eval: metric_writers.MetricWriter  # eval metrics: TensorBoard eval/


def create_writers(model_dir: str) -> Writers:
    """The run's metric writers; on hosts other than the first they write nothing."""
    if jax.process_index() != 0:
        return Writers(metric_writers.MultiWriter([]), None, metric_writers.MultiWriter([]))
    mirror = None
    root = model_dir
    if storage.is_remote(model_dir):
        # tf.summary writes through tf.io.gfile and object stores cannot append: for a remote
        # MODEL_DIR both writers write to a local directory, copied up after every write.
        mirror = storage.LocalMirror(model_dir, pull=(METRICS_FILE,))
        root = mirror.local
    # Synchronous writers: a logged line is on disk before the loop goes on (see JsonlWriter).
    tensorboard = metric_writers.SummaryWriter(storage.join(root, "train"))
    train = [tensorboard, JsonlWriter(storage.join(root, METRICS_FILE))]
    evals = [metric_writers.SummaryWriter(storage.join(root, "eval"))]
    if mirror is None:
        return Writers(metric_writers.MultiWriter(train), tensorboard, evals[0])
    progress = _Mirrored([tensorboard], mirror)
    return Writers(_Mirrored(train, mirror), progress, _Mirrored(evals, mirror))


class _Mirrored(metric_writers.MultiWriter):
    """Writers into a LocalMirror's directory, pushed to the remote MODEL_DIR after each scalar
    write and at flush/close (what a SIGKILL can lose is the last unpushed write)."""

    def __init__(self, writers: list[metric_writers.MetricWriter], mirror: Any) -> None:
        super().__init__(writers)
        self._mirror = mirror

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        super().write_scalars(step, scalars)
        self.flush()

    def flush(self) -> None:
        super().flush()
        self._mirror.push()

    def close(self) -> None:
        super().close()
        self._mirror.push()


class _ReportProgress(periodic_actions.ReportProgress):
    """clu's ReportProgress that also keeps the steps/s it measured last, for the log line, and
    the model FLOPs and tokens of the steps since the last log (for tokens/s and MFU)."""

    steps_per_sec = float("nan")
    throughput: flops.Throughput | None = None

    def _apply(self, step: int, t: float) -> None:
        self.steps_per_sec = (step - self._previous_step) / (t - self._previous_time)
        super()._apply(step, t)


def throughput_counter(run: Run) -> flops.Throughput:
    """Counts model FLOPs of this host's batches against the peak of the devices that run them:
    per-device peaks from the device kind; on CPU one measured matmul peak for the whole host
    (simulated CPU devices share its cores)."""
    peak, source = flops.peak_flops_per_device()
    if jax.local_devices()[0].platform != "cpu":
        peak *= jax.local_device_count()
    if jax.process_index() == 0:
        print(f"MFU peak: {peak / 1e12:.3f} TFLOP/s ({source})", flush=True)
    return flops.Throughput(run.model.config, peak)


def log_train(
    run: Run,
    cfg: TrainConfig,
    step: int,
    sums: dict[str, np.ndarray],
    progress: _ReportProgress,
    writer: metric_writers.MetricWriter,
) -> dict[str, float]:
    """Prints the log line of `step` and writes the train summary of the metric sums since the
    last log; returns that summary."""
    n = float(sums["num_steps"])
    summary = {
        "loss": float(sums["loss_sum"]) / n,
        "grad_norm": float(sums["grad_norm_sum"]) / n,
        "learning_rate": float(run.lr_schedule(step - 1)),
        **summarize_metrics(sums, run.objective_names),
    }
    sps = progress.steps_per_sec
    eta = (cfg.train_steps - step) / max(sps, 1e-9)
    per_obj = " ".join(
        f"{k}={v:.4f}" for k, v in summary.items() if k.endswith(("/loss", "/accuracy"))
    )
    rates = ""
    if progress.throughput is not None:  # the window's real tokens/s and model FLOPs utilisation
        summary.update(progress.throughput.summary(sps))
        rates = f" {summary['tokens_per_s']:.0f} tokens/s, MFU {100 * summary['mfu']:.1f}%,"
    print(
        f"step {step}/{cfg.train_steps} loss={summary['loss']:.4f} {per_obj} | "
        f"{sps:.2f} steps/s, {sps * cfg.batch_size:.1f} examples/s,{rates} "
        f"ETA {eta / 60:.1f} min",
        flush=True,
    )
    writer.write_scalars(step, summary)
    return summary


class PeriodicEval:
    """Evaluation during training: predictions and metrics through a TaskEvaluator (built on
    first use: it caches the eval examples), optionally the teacher-forced loss per objective;
    prints, writes to TensorBoard and keeps the best checkpoint."""

    def __init__(self, cfg: TrainConfig, run: Run, writer: metric_writers.MetricWriter) -> None:
        self.cfg, self.run, self.writer = cfg, run, writer
        self.task_evaluator: TaskEvaluator | None = None

    def __call__(self, step: int, params: Any) -> dict[str, float]:
        cfg = self.cfg
        if self.task_evaluator is None:
            self.task_evaluator = TaskEvaluator(
                cfg.mixture_or_task_name,
                split=cfg.eval_split,
                task_feature_lengths=cfg.task_feature_lengths,
                num_examples=cfg.eval_num_examples,
            )
        results, _ = self.task_evaluator.evaluate(
            self.run.model,
            params,
            batch_size=cfg.eval_batch_size,
            max_decode_length=cfg.max_decode_length,
            step=step,
        )
        if cfg.eval_loss_batches:
            results.update(self.loss(step, params))
        print(f"step {step} eval: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(results.items())))
        if cfg.best_metric and cfg.best_metric not in results:
            raise UserError(
                f"train.best_metric={cfg.best_metric!r} is not an eval metric of "
                f"{cfg.mixture_or_task_name}; use one of {sorted(results)}"
            )
        self.writer.write_scalars(step, results)
        self.run.ckpt.save_best(step, params, results)
        return results

    def loss(self, step: int, params: Any) -> dict[str, float]:
        """{"eval_loss/<metric>"} over `eval_loss_batches` full batches of the eval split."""
        try:
            ds = host_dataset(self.cfg, self.cfg.eval_split, training=False)
        except ValueError as e:  # e.g. an objective without examples on the eval split
            print(f"step {step}: no eval loss: {e}")
            return {}
        host_batch_size = self.cfg.batch_size // partitioning.host_shard_info()[1]
        sums = None
        for b in ds.take(self.cfg.eval_loss_batches).as_numpy_iterator():
            if len(b["decoder_target_tokens"]) != host_batch_size:
                continue  # a final partial batch would not split over the data axis
            batch = self.run.partitioner.host_batch_to_global(b)
            sums = add_metrics(sums, self.run.trainer.eval_step(params, batch))
        if sums is None:
            return {}
        sums = jax.device_get(sums)
        out = summarize_metrics(sums, self.run.objective_names)
        out["loss"] = float(sums["loss_sum"]) / float(sums["num_steps"])
        return {f"eval_loss/{k}": v for k, v in out.items()}


def _final_metrics_of_finished_run(run: Run, train_steps: int) -> dict[str, float] | None:
    """The final metrics a run that finished `train_steps` wrote (None if it wrote none); closes
    the checkpoints. Checked before anything is restored: a finished run's checkpoints are not
    read (a corrupt one does not matter)."""
    path = storage.join(run.model_dir, FINAL_METRICS_FILE)
    if not storage.exists(path):
        return None
    try:
        final = storage.read_json(path)
        done = int(final.get("step", -1)) >= train_steps
    except (ValueError, AttributeError, TypeError) as e:  # cut short or garbled: written anew
        print(f"warning: {path} is not readable ({e}); the run writes it again")
        return None
    if not done:
        return None  # TRAIN_STEPS raised since: the run goes on
    run.ckpt.close()
    print(f"{run.model_dir} has finished training (step {final.get('step')}): see {path}")
    return {k: v for k, v in final.items() if k != "step"}


def drop_metrics_after(model_dir: str, step: int) -> None:
    """Drops the train_metrics.jsonl lines of steps after `step` (logged after the checkpoint a
    run resumes from; the resumed run logs them again)."""
    path = storage.join(model_dir, METRICS_FILE)
    if jax.process_index() != 0 or not storage.exists(path):
        return
    lines = storage.read_text(path).splitlines(keepends=True)
    kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= step]
    if len(kept) != len(lines):
        storage.write_text(path, "".join(kept))


OPERATIVE_CONFIG_FILE = "config.gin"


def save_operative_config(model_dir: str, writer: metric_writers.MetricWriter, step: int) -> None:
    """As T5X: the operative gin config (what the run used) in MODEL_DIR/config.gin and as text
    in TensorBoard (train/, tag "gin/operative_config")."""
    if jax.process_index() != 0:
        return
    text = gin.operative_config_str()
    storage.write_text(storage.join(model_dir, OPERATIVE_CONFIG_FILE), text)
    # TensorBoard renders text as markdown: indent each line to keep the layout.
    markdown = "\n".join("    " + ln for ln in text.splitlines())
    writer.write_texts(step, {"gin/operative_config": markdown})
    writer.flush()


def finish(
    run: Run,
    writers: Writers,
    step: int,
    train_summary: dict[str, float],
    eval_metrics: dict[str, float],
) -> dict[str, float]:
    """Waits for the last checkpoint, closes the writers, writes final_metrics.json and prints
    the final metrics block; returns {"train/<metric>", <eval metric>}."""
    run.ckpt.wait_until_finished()
    run.ckpt.close()
    writers.train.close()
    writers.eval.close()
    train_summary = train_summary or logged_summary(run.model_dir, step)  # a rerun's repair
    final = {**{f"train/{k}": v for k, v in train_summary.items()}, **eval_metrics}
    if jax.process_index() == 0:
        storage.write_json(storage.join(run.model_dir, FINAL_METRICS_FILE), {"step": step, **final})
        print(f"final metrics (step {step}):")
        for k, v in sorted(final.items()):
            print(f"  {k}: {v:.4f}")
    return final


def logged_summary(model_dir: str, step: int) -> dict[str, float]:
    """The train summary train_metrics.jsonl holds for `step` ({} if none): what a run killed
    after its last checkpoint but before final_metrics.json logged, for the rerun to repair it."""
    path = storage.join(model_dir, METRICS_FILE)
    if not storage.exists(path):
        return {}
    rows = [json.loads(ln) for ln in storage.read_text(path).splitlines() if ln.strip()]
    row = next((r for r in reversed(rows) if r.get("step") == step), {})
    return {k: v for k, v in row.items() if k != "step"}


def _train() -> None:
    if cli.is_bound("compare.runs"):  # a config of several students, e.g. quickstart.gin
        raise SystemExit(
            "this gin config trains several students (compare.runs): run it with "
            "python -m distill_sbs.compare"
        )
    train()


def main() -> None:
    cli.run(_train)
