"""The training loop's metric writing through clu: train summaries go to TensorBoard and to
train_metrics.jsonl, progress (steps/s) to TensorBoard only, eval metrics to TensorBoard eval/."""

from __future__ import annotations

import glob
import json

import pytest


def _tags(directory) -> set[tuple[int, str]]:
    import tensorflow as tf

    out = set()
    for f in glob.glob(str(directory / "events.out.tfevents*")):
        for event in tf.compat.v1.train.summary_iterator(f):
            out |= {(event.step, v.tag) for v in event.summary.value}
    return out


def test_writers_split_train_progress_and_eval(tmp_path):
    from distill_sbs.training import METRICS_FILE, _ReportProgress, create_writers

    writers = create_writers(str(tmp_path))
    progress = _ReportProgress(every_steps=2, every_secs=None, writer=writers.progress)
    assert not progress(0, t=10.0)  # the first call starts the clock
    assert not progress(1, t=11.0)
    assert progress(2, t=14.0)
    assert progress.steps_per_sec == pytest.approx(0.5)  # 2 steps in 4 s
    writers.train.write_scalars(2, {"loss": 1.5, "label/loss": 0.5})
    writers.eval.write_scalars(2, {"arith_dss_label/numeric_accuracy": 40.0})
    writers.train.close()
    writers.eval.close()

    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"step": 2, "loss": 1.5, "label/loss": 0.5}]
    assert {(2, "loss"), (2, "label/loss"), (2, "steps_per_sec")} <= _tags(tmp_path / "train")
    assert _tags(tmp_path / "eval") == {(2, "arith_dss_label/numeric_accuracy")}
