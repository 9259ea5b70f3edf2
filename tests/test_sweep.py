"""distill_sbs.sweep: the grid, the checks made before any training (one clear error each), the
deterministic validation carve-out, the report, and (slow) a sweep killed mid-way and rerun."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import gin
import pytest

from distill_sbs import cli, sweep, sweep_report

MINI = "repro/arith_mini.gin"


@pytest.fixture(autouse=True)
def _clean_gin():
    cli.import_builtin_tasks()
    gin.clear_config()
    yield
    gin.clear_config()


def test_grid_is_the_product_of_the_axes_with_files_and_literals():
    axes = sweep.parse_axes(["dataset=cqa,svamp", "METHOD=dss", "TRAIN_FRACTION=0.125,1.0"])
    runs = sweep.grid(["paper/base.gin"], ["X = 1"], axes)
    assert [r.name for r in runs] == [
        "dataset=cqa,METHOD=dss,TRAIN_FRACTION=0.125",
        "dataset=cqa,METHOD=dss,TRAIN_FRACTION=1.0",
        "dataset=svamp,METHOD=dss,TRAIN_FRACTION=0.125",
        "dataset=svamp,METHOD=dss,TRAIN_FRACTION=1.0",
    ]
    assert runs[2].gin_files == ("paper/base.gin", "paper/svamp.gin")
    assert runs[2].bindings == ("X = 1", "METHOD = 'dss'", "TRAIN_FRACTION = 0.125")


def test_linked_axis_moves_a_model_with_its_checkpoint():
    axes = sweep.parse_axes(
        ["model+PRETRAINED_DIR=t5_1_1_base:/c/base,t5_1_1_large:gs://b/large", "SEED=0,1"]
    )
    runs = sweep.grid(["paper/base.gin"], [], axes)
    assert len(runs) == 4
    assert runs[3].axes == (
        ("model", "t5_1_1_large"),
        ("PRETRAINED_DIR", "gs://b/large"),
        ("SEED", "1"),
    )
    assert runs[3].gin_files == ("paper/base.gin", "models/t5_1_1_large.gin")
    assert runs[3].bindings == ("PRETRAINED_DIR = 'gs://b/large'", "SEED = 1")
    assert sweep.parse_axes(["PRETRAINED_DIR=gs://b/x"])[0][1] == [("gs://b/x",)]


@pytest.mark.parametrize(
    "spec,message",
    [
        ("model+PRETRAINED_DIR=t5_1_1_base", "each value needs 2 parts"),
        ("METHOD", "expected NAME=value1,value2"),
        ("METHOD=", "expected NAME=value1,value2"),
        ("SEED=1,1", "a value is repeated"),
    ],
)
def test_malformed_axis_is_one_error(spec, message):
    with pytest.raises(sweep.SweepError, match=message):
        sweep.parse_axes([spec])


def _plan(*bindings: str, files=(MINI,)):
    run = sweep.grid(list(files), list(bindings), [])[0]
    return sweep.plan(run, "test")


def test_default_metric_is_each_runs_own_across_datasets(tmp_path):
    """Issue 21: the first command of docs/reproduction.md (--axis=dataset=cqa,svamp, no --metric)
    exited 2 with "--metric=accuracy: run dataset=svamp,... reports only equation_accuracy": the
    default was the first run's metric."""
    from _shared_data import require_dss

    bindings = ["PRETRAINED_DIR = '/ckpt'", f"DATA_DIR = '{require_dss()}'"]
    axes = sweep.parse_axes(["dataset=cqa,svamp", "METHOD=dss"])
    runs = sweep.grid(["paper/base.gin", "models/t5_1_1_small.gin"], bindings, axes)
    plans = {}
    for run in runs:
        gin.clear_config()
        plans[run.name] = sweep.plan(run, "test")
    cqa, svamp = "dataset=cqa,METHOD=dss", "dataset=svamp,METHOD=dss"
    metrics = sweep.run_metrics(runs, plans, None)
    assert metrics == {cqa: "accuracy", svamp: "equation_accuracy"}
    with pytest.raises(sweep.SweepError, match=f"--metric=accuracy: run {svamp} reports only"):
        sweep.run_metrics(runs, plans, "accuracy")
    # the report of a grid with two metrics names each row's
    scores = [("cqa_dss_label", 61.0), ("svamp_dss_label", 42.0)]
    for run, (task, value) in zip(runs, scores, strict=True):
        metric = metrics[run.name]
        result = {"best_step": 3, "seconds": 1.0, "test": {f"{task}/{metric}": value},
                  "validation": {f"{task}/{metric}": value + 1}}  # fmt: skip
        (tmp_path / "runs" / run.name).mkdir(parents=True)
        (tmp_path / "runs" / run.name / sweep.RESULT).write_text(json.dumps(result))
    rows = sweep.collect(runs, tmp_path, metrics, "t")
    assert [(r["metric"], r["validation"], r["test"]) for r in rows] == [
        ("accuracy", 62.0, 61.0),
        ("equation_accuracy", 43.0, 42.0),
    ]
    with open(tmp_path / "results.csv") as f:
        assert next(csv.reader(f)) == [
            "run", "dataset", "METHOD", "best_step", "metric", "validation", "test", "seconds",
        ]  # fmt: skip


def test_plan_of_the_miniature_selects_on_validation():
    p = _plan("METHOD = 'dss'")
    assert (p.mixture, p.best_metric, p.eval_split) == (
        "arith_dss",
        "arith_dss_label/numeric_accuracy",
        "validation",
    )


@pytest.mark.parametrize("method", ["finetune", "distill", "dss", "dss_llm", "cot"])
def test_plan_of_the_world_grid_starts_from_the_shipped_student(method):
    from distill_sbs import data
    from distill_sbs.data import world

    p = _plan(f"METHOD = '{method}'", files=("repro/world_traits_mini.gin",))
    task = f"world_traits_{method}" + ("_label" if method.startswith("dss") else "")
    assert (p.mixture, p.best_metric, p.eval_split) == (
        f"world_traits_{method}",
        f"{task}/accuracy",
        "validation",
    )
    assert str(gin.query_parameter("PRETRAINED_DIR/gin.macro.value")) == "%WORLD_STUDENT"
    assert gin.query_parameter("WORLD_STUDENT") == world.PRETRAINED_STUDENT
    # The validation split is 40 of the 400 labelled problems, as docs/world.md fixes it.
    assert len(data.load_records("world_traits", "validation")) == 40


@pytest.mark.parametrize(
    "bindings,message",
    [
        (["METHOD = 'dsss'"], "METHOD='dsss' is not one of: finetune, distill, dss"),
        (["METHOD = 'dss'", "TRAIN_FRACTION = 2.0"], r"train_fraction=2.0 not in \(0, 1\]"),
        (["METHOD = 'dss'", "METRIC = 'accuracy'"], "is not a result of this run"),
        (["METHOD = 'dss'", "train.eval_split = 'test'"], "select checkpoints on a validation"),
        (["METHOD = 'dss'", "VALIDATION_FRACTION = 0.0"], "has no validation split"),
    ],
)
def test_bad_run_config_is_one_error_naming_the_run(bindings, message):
    with pytest.raises(sweep.SweepError, match=message) as e:
        _plan(*bindings)
    assert str(e.value).startswith("run ") and "\n" not in str(e.value)


def test_axis_no_gin_file_defines_is_an_error():
    with pytest.raises(sweep.SweepError, match="no gin file defines the macro LERNING_RATE"):
        sweep.check_axes([MINI], [], sweep.parse_axes(["LERNING_RATE=1e-3"]))
    with pytest.raises(sweep.SweepError, match="not found"):  # a dataset without paper/<d>.gin
        sweep.parse(["paper/base.gin", "paper/imagenet.gin"], [])


def test_out_dir_and_run_dir_of_another_sweep_are_errors(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    manifest = {"gin_files": ["a.gin"], "bindings": [], "config_sha256": "f0"}
    (out / sweep.MANIFEST).write_text(json.dumps(manifest))
    sweep.check_manifest(out, ["a.gin"], [], "f0")  # the same sweep: fine
    with pytest.raises(sweep.SweepError, match="holds another sweep"):
        sweep.check_manifest(out, [MINI], [], "f0")
    run = sweep.grid([MINI], [], sweep.parse_axes(["SEED=0"]))[0]
    run_dir = out / "runs" / run.name
    run_dir.mkdir(parents=True)
    sweep.check_run_dir(run_dir, run)  # empty: fine
    (run_dir / "checkpoint_5").mkdir()
    with pytest.raises(sweep.SweepError, match="without sweep_run.json"):
        sweep.check_run_dir(run_dir, run)
    other = sweep.grid([MINI], ["LEARNING_RATE = 1.0"], sweep.parse_axes(["SEED=0"]))[0]
    (run_dir / sweep.RUN_MARKER).write_text(json.dumps(other.describe()))
    with pytest.raises(sweep.SweepError, match="belongs to another sweep"):
        sweep.check_run_dir(run_dir, run)


def test_edited_gin_file_is_another_sweep(tmp_path):
    """The same file names with other contents (e.g. TRAIN_STEPS edited) do not reuse OUT's runs."""
    gin_dir = tmp_path / "gin"
    gin_dir.mkdir()
    (gin_dir / "mini.gin").write_text(f"include '{MINI}'\nTRAIN_STEPS = 10\n")
    files = [str(gin_dir / "mini.gin")]
    before = sweep.config_fingerprint(files, [])
    assert sweep.config_fingerprint(files, []) == before  # deterministic
    assert sweep.config_fingerprint(files, ["SEED = 1"]) != before
    out = tmp_path / "out"
    out.mkdir()
    (out / sweep.MANIFEST).write_text(
        json.dumps({"gin_files": files, "bindings": [], "config_sha256": before})
    )
    sweep.check_manifest(out, files, [], before)
    (gin_dir / "mini.gin").write_text(f"include '{MINI}'\nTRAIN_STEPS = 20\n")
    after = sweep.config_fingerprint(files, [])
    with pytest.raises(sweep.SweepError, match="same gin files with other contents"):
        sweep.check_manifest(out, files, [], after)


def test_validation_is_carved_deterministically_from_train():
    from distill_sbs import data
    from distill_sbs.data import arith

    full = [r.id for r in arith.generate("train")]
    gin.parse_config(["DatasetOptions.validation_fraction = 0.1"])
    train = [r.id for r in data.load_records("arith", "train")]
    val = [r.id for r in data.load_records("arith", "validation")]
    assert len(val) == 40 and len(train) == 360
    assert set(train).isdisjoint(val) and sorted(train + val) == sorted(full)
    assert train == [i for i in full if i in set(train)]  # original order kept
    assert val == [r.id for r in data.load_records("arith", "validation")]  # deterministic
    # train_fraction subsamples what is left after the carve-out, never the validation records
    gin.parse_config(["DatasetOptions.train_fraction = 0.25"])
    sub = [r.id for r in data.load_records("arith", "train", subsample=True)]
    assert len(sub) == 90 and set(sub) <= set(train)
    gin.clear_config()
    with pytest.raises(ValueError, match="has no validation split"):
        data.load_records("arith", "validation")


def test_report_means_intervals_paired_differences_and_plots(tmp_path):
    rows = [
        {"METHOD": m, "TRAIN_FRACTION": f, "SEED": s, "test_acc": v}
        for m, f, s, v in [
            ("dss", "0.5", "0", 50.0),
            ("dss", "0.5", "1", 60.0),
            ("dss", "0.5", "2", 70.0),
            ("dss", "1.0", "0", 70.0),
            ("finetune", "0.5", "0", 40.0),
            ("finetune", "0.5", "1", 62.0),
            ("finetune", "0.5", "2", 60.0),
        ]
    ]
    axes = ["METHOD", "TRAIN_FRACTION", "SEED"]
    got = {tuple(c.values()): v for c, v in sweep_report.cells(rows, axes, "test_acc")}
    assert got == {
        ("dss", "0.5"): [50.0, 60.0, 70.0],
        ("dss", "1.0"): [70.0],
        ("finetune", "0.5"): [40.0, 62.0, 60.0],
    }
    # Student's t with 2 degrees of freedom, 97.5th percentile, from a printed table: 4.303.
    mean, half = sweep_report.mean_interval([50.0, 60.0, 70.0])
    assert mean == 60.0 and half == pytest.approx(4.303 * 10.0 / 3**0.5, rel=1e-4)
    diffs = {
        tuple(c.values()): v for c, v in sweep_report.paired_differences(rows, axes, "test_acc")
    }
    assert diffs == {("dss", "0.5"): [10.0, -2.0, 10.0]}  # dss 1.0 has no fine-tuning run to pair
    sweep_report.write_markdown(tmp_path / "r.md", rows, axes, "test_acc", "t")
    text = (tmp_path / "r.md").read_text()
    assert "| dss | 0.5 | 60.00 +- 24.84 | 10.00 | 3 |" in text
    assert "| dss | 1.0 | 70.00 | 0.00 | 1 |" in text  # one run: no interval
    # Differences 10, -2, 10: mean 6, std 6.93, half-width 4.303 * 6.93 / sqrt(3) = 17.21.
    assert "| dss | 0.5 | 6.00 +- 17.21 | 2 of 3 |" in text
    assert sweep_report.plot(tmp_path, rows, axes, "test_acc", "t") == ["accuracy_vs_fraction.png"]
    assert (tmp_path / "accuracy_vs_fraction.png").read_bytes()[:4] == b"\x89PNG"


def _sweep_cmd(out, *extra):
    return [
        sys.executable,
        "-m",
        "distill_sbs.sweep",
        f"--gin_file={MINI}",
        f"--out={out}",
        "--axis=METHOD=finetune,dss",
        "--axis=TRAIN_FRACTION=0.5,1.0",
        "--gin.TRAIN_STEPS=6",
        "--gin.EVAL_PERIOD=3",
        "--gin.CHECKPOINT_PERIOD=3",
        "--gin.BATCH_SIZE=8",
        *extra,
    ]


@pytest.mark.slow  # a subprocess: ~40 s on a shared machine; the checks themselves are tested above
def test_bad_input_stops_before_training_with_one_line(tmp_path, subprocess_env):
    out = tmp_path / "out"
    r = subprocess.run(
        _sweep_cmd(out, "--axis=SEED=0", "--metric=accuracy"),
        capture_output=True,
        text=True,
        env=subprocess_env,
        timeout=300,
    )
    assert r.returncode != 0
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "error: --metric=accuracy: run METHOD=finetune,TRAIN_FRACTION=0.5,SEED=0 reports only "
        "numeric_accuracy"
    )
    assert not out.exists()  # nothing was trained or written


def _wait_for(predicate, proc, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.5)
    return False


@pytest.mark.slow
def test_sweep_killed_mid_way_and_rerun_has_every_run_once(tmp_path, subprocess_env):
    out = tmp_path / "out"
    runs = out / "runs"
    proc = subprocess.Popen(
        _sweep_cmd(out),
        env=subprocess_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        # Kill it once the first run is finished and the second has saved a checkpoint.
        second = runs / "METHOD=finetune,TRAIN_FRACTION=1.0"
        assert _wait_for(lambda: (second / "checkpoint_3").exists(), proc, 400)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (runs / "METHOD=finetune,TRAIN_FRACTION=0.5" / sweep.RESULT).exists()
    assert not (second / sweep.RESULT).exists()

    r = subprocess.run(
        _sweep_cmd(out), capture_output=True, text=True, env=subprocess_env, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "4 runs: 1 done, 3 to run" in r.stdout
    assert f"resumed from {second}/checkpoint_" in r.stdout  # the interrupted run resumed
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["run"] for row in rows) == sorted(
        f"METHOD={m},TRAIN_FRACTION={f}" for m in ("finetune", "dss") for f in ("0.5", "1.0")
    )
    assert (out / "accuracy_vs_fraction.png").read_bytes()[:4] == b"\x89PNG"
    for row in rows:  # the test score is the one of the checkpoint selected on validation
        result = json.loads((runs / row["run"] / sweep.RESULT).read_text())
        assert result["selected_on"] == "validation" and result["test_split"] == "test"
        assert float(row["test_numeric_accuracy"]) == pytest.approx(
            next(iter(result["test"].values()))
        )
        assert int(row["best_step"]) in (3, 6)

    again = subprocess.run(
        _sweep_cmd(out), capture_output=True, text=True, env=subprocess_env, timeout=300
    )
    assert again.returncode == 0 and "4 runs: 4 done, 0 to run" in again.stdout
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
