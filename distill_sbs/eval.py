"""Evaluate a checkpoint on a task's split, T5X style: `evaluate()` (gin-configurable) and `main`.

    python -m distill_sbs.eval --gin_file=runs/eval.gin --gin.CHECKPOINT_PATH="'/tmp/run'" \
        --gin.MIXTURE_OR_TASK_NAME="'arith_dss'"

CHECKPOINT_PATH is a native checkpoint, a MODEL_DIR (latest step), a step directory or a Hugging
Face T5 folder. Prints the metrics; with OUTPUT_DIR set, writes metrics.json and one
predictions JSONL per evaluated task there.

Evaluation goes through seqio.Evaluator (predictions and metrics): `TaskEvaluator` (built once per
training run), `evaluate_tasks` (one-off) and `evaluate`.
"""

from __future__ import annotations

if __name__ == "__main__":
    # `python -m distill_sbs.eval` runs this file as __main__; hand over to the package's copy of
    # the module so that gin registers its configurables once (not also as __main__.*).
    from distill_sbs.eval import main as _main

    _main()
    raise SystemExit(0)

import json
import time
from collections.abc import Mapping
from typing import Any

import gin
import numpy as np
import seqio

from distill_sbs import cli, storage
from distill_sbs.errors import UserError
from distill_sbs.generation import generate_ids


class _Progress:
    """Prints `<what>: n/total examples` at most every `every_secs` and at the end, so a long
    evaluation (a test split of thousands) shows it is moving."""

    def __init__(self, what: str, total: int, every_secs: float = 30.0) -> None:
        self.what, self.total, self.every_secs = what, total, every_secs
        self.start = self.last = time.monotonic()

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if done < self.total and now - self.last < self.every_secs:
            return
        self.last = now
        print(f"{self.what}: {done}/{self.total} examples, {now - self.start:.0f}s", flush=True)


class TaskEvaluator:
    """seqio.Evaluator over the eval split of a task or mixture, predicting with model.generate.

    Built once per run (the Evaluator caches the eval examples and targets); every sub-task with
    metric_fns is scored by its own postprocess_fn and metric_fns, the others are skipped.
    """

    def __init__(
        self,
        mixture_or_task_name: str,
        *,
        split: str,
        task_feature_lengths: Mapping[str, int],
        num_examples: int | None = None,
    ) -> None:
        from distill_sbs.data import ObjectiveEncDecFeatureConverter

        self.split = split
        self.task_feature_lengths = dict(task_feature_lengths)
        self.evaluator = seqio.Evaluator(
            mixture_or_task_name,
            feature_converter=ObjectiveEncDecFeatureConverter(pack=False),
            eval_split=split,
            sequence_length=self.task_feature_lengths,
            num_examples=num_examples,
            use_memory_cache=True,
            async_compute_metrics=False,
        )

    def evaluate(
        self,
        model: Any,
        params: Any,
        *,
        batch_size: int = 32,
        max_decode_length: int | None = None,
        step: int | None = None,
    ) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
        """({"<task>/<metric>": value}, {task: [{"input", "target", "prediction"}, ...]})."""
        decode_length = max_decode_length or self.task_feature_lengths["targets"]

        def predict_fn(ds: Any) -> list[tuple[int, list[int]]]:  # ds: tf.data.Dataset
            # The Evaluator's datasets are enumerated: (index, model features) per example.
            indices, rows = [], []
            for index, features in ds.as_numpy_iterator():
                indices.append(int(index))
                rows.append(features["encoder_input_tokens"])
            ids = generate_ids(
                model,
                params,
                np.stack(rows),
                batch_size=batch_size,
                max_decode_length=decode_length,
                on_batch=_Progress(f"eval {self.split}", len(rows)),
            )
            return [(i, row.tolist()) for i, row in zip(indices, ids, strict=True)]

        metrics_future, all_output = self.evaluator.evaluate(
            compute_metrics=True, step=step, predict_fn=predict_fn
        )
        metrics: dict[str, float] = {}
        for task, task_metrics in metrics_future.result().items():
            for name, value in task_metrics.items():
                metrics[f"{task}/{name}"] = float(getattr(value, "value", value))
        outputs: dict[str, list[dict[str, Any]]] = {}
        for task in self.evaluator.eval_tasks:
            tokens = all_output[task.name].get(seqio.metrics.ModelOutputType.PREDICTION)
            if tokens is None:
                continue
            vocab = task.output_features["targets"].vocabulary
            examples = self.evaluator.cached_task_datasets[task.name].as_numpy_iterator()
            outputs[task.name] = [
                {
                    "input": ex["inputs_pretokenized"].decode("utf-8"),
                    "target": ex["targets_pretokenized"].decode("utf-8"),
                    "prediction": vocab.decode(list(t)),
                }
                for ex, t in zip(examples, tokens, strict=True)
            ]
        return metrics, outputs


def evaluate_tasks(
    model: Any,
    params: Any,
    mixture_or_task_name: str,
    *,
    split: str,
    task_feature_lengths: Mapping[str, int],
    batch_size: int = 32,
    max_decode_length: int | None = None,
    num_examples: int | None = None,
) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
    """One-off evaluation with a new TaskEvaluator (see there)."""
    evaluator = TaskEvaluator(
        mixture_or_task_name,
        split=split,
        task_feature_lengths=task_feature_lengths,
        num_examples=num_examples,
    )
    return evaluator.evaluate(
        model, params, batch_size=batch_size, max_decode_length=max_decode_length
    )


def task_vocabulary(mixture_or_task_name: str) -> seqio.Vocabulary:
    """The targets vocabulary of a registered task or mixture; an unknown name is a UserError."""
    try:
        provider = seqio.get_mixture_or_task(mixture_or_task_name)
    except ValueError as e:
        raise UserError(
            f"MIXTURE_OR_TASK_NAME={mixture_or_task_name!r} is not a registered task or mixture "
            "(register it, or import its module with MIXTURE_OR_TASK_MODULE)"
        ) from e
    return provider.output_features["targets"].vocabulary


def _same_vocabulary(a: seqio.Vocabulary, b: seqio.Vocabulary) -> bool:
    """Equal vocabularies; SentencePiece ones by model content and extra ids, not by file path."""
    spm = seqio.SentencePieceVocabulary
    if isinstance(a, spm) and isinstance(b, spm):
        return a.sp_model == b.sp_model and a.extra_ids == b.extra_ids
    return a == b


def check_vocabulary(model: Any, mixture_or_task_name: str, checkpoint_path: str) -> None:
    """The checkpoint's vocabulary must be the task's (else every prediction decodes to other
    words and the metrics are silently 0); its model must have room for every task id."""
    vocab = task_vocabulary(mixture_or_task_name)
    size = model.config.vocab_size
    if size < vocab.vocab_size:
        raise UserError(
            f"{checkpoint_path}: the model has {size} token ids, the vocabulary of "
            f"{mixture_or_task_name} has {vocab.vocab_size}; use a checkpoint trained on this "
            "task's vocabulary"
        )
    if model.vocabulary is not None and not _same_vocabulary(model.vocabulary, vocab):
        raise UserError(
            f"{checkpoint_path}: its vocabulary ({model.vocabulary.vocab_size} ids) is not the "
            f"vocabulary of {mixture_or_task_name} ({vocab.vocab_size} ids); use a checkpoint "
            "trained with this task's vocabulary"
        )


@gin.configurable
def evaluate(
    checkpoint_path: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    split: str = "test",
    batch_size: int = 32,
    max_decode_length: int | None = None,
    num_examples: int | None = None,
    output_dir: str | None = None,
) -> dict[str, float]:
    """Prints the metrics of a checkpoint on a split; with `output_dir`, also writes metrics.json
    and one predictions JSONL per evaluated task there."""
    from distill_sbs import models

    task_vocabulary(mixture_or_task_name)  # an unknown name fails before the model loads
    model, params = models.load(checkpoint_path)
    check_vocabulary(model, mixture_or_task_name, checkpoint_path)
    metrics, outputs = evaluate_tasks(
        model,
        params,
        mixture_or_task_name,
        split=split,
        task_feature_lengths=task_feature_lengths,
        batch_size=batch_size,
        max_decode_length=max_decode_length,
        num_examples=num_examples,
    )
    if not metrics:
        raise UserError(f"{mixture_or_task_name}: no task with metrics has split {split!r}")
    for k, v in sorted(metrics.items()):
        print(f"{k}: {v:.4f}")
    if output_dir:
        summary = {"checkpoint": checkpoint_path, "split": split, **metrics}
        storage.write_json(storage.join(output_dir, "metrics.json"), summary)
        for task, rows in outputs.items():
            text = "".join(json.dumps(r) + "\n" for r in rows)
            storage.write_text(storage.join(output_dir, f"{task}.{split}.jsonl"), text)
    return metrics


def main() -> None:
    cli.run(lambda: evaluate())
