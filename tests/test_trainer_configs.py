"""Every shipped run config parses and names a registered mixture, metric and model; the launcher
finds gin files by name and turns --gin.KEY=VALUE into bindings."""

from __future__ import annotations

import glob
import os

import gin
import pytest

from distill_sbs import launch_utils

GIN = str(launch_utils.GIN_DIR)


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_split_gin_args_and_resolve():
    files, bindings, rest = launch_utils.split_gin_args(
        ["--gin_file=quickstart.gin", "--gin.TRAIN_STEPS=5", "--gin_bindings", "a.b = 1", "-x"]
    )
    assert files == ["quickstart.gin"] and bindings == ["TRAIN_STEPS = 5", "a.b = 1"]
    assert rest == ["-x"]
    assert launch_utils.resolve_gin_file("quickstart") == os.path.join(GIN, "quickstart.gin")
    with pytest.raises(FileNotFoundError, match="nope.gin"):
        launch_utils.resolve_gin_file("nope.gin")


def test_gin_typo_is_one_clear_error():
    with pytest.raises(SystemExit, match="TRAIN_STEPZ|train_stepz"):
        launch_utils.parse_gin(["quickstart.gin"], ["train.train_stepz = 3"])


def _parse(path, extra=()):
    launch_utils.parse_gin([path], ["MODEL_DIR = '/tmp/x'", *extra])


def test_quickstart_config():
    import seqio

    _parse("quickstart.gin")
    runs = gin.query_parameter("compare.runs")
    assert set(runs) == {"dss", "finetune"}
    for mixture in runs.values():
        seqio.get_mixture_or_task(mixture)
    assert gin.query_parameter("T5Config.vocab_size") >= 256


PAPER = sorted(glob.glob(os.path.join(GIN, "paper", "*", "*.gin")))


def test_paper_grid_is_complete():
    names = {os.path.relpath(p, os.path.join(GIN, "paper")) for p in PAPER}
    assert len(names) == 4 * 4 * 3
    assert "cqa/dss_t5_1_1_xxl.gin" in names and "svamp/finetune_t5_1_1_base.gin" in names


@pytest.mark.parametrize("path", PAPER[::7], ids=lambda p: os.path.relpath(p, GIN))
def test_paper_config(path):
    import seqio

    _parse(path, ["PRETRAINED_DIR = '/ckpt'"])
    mixture = gin.query_parameter("%MIXTURE_OR_TASK_NAME")
    seqio.get_mixture_or_task(mixture)
    assert gin.query_parameter("%BATCH_SIZE") == 64
    assert gin.query_parameter("%TRAIN_STEPS") == 10000
    assert gin.query_parameter("%LEARNING_RATE") == 5e-5
    assert gin.query_parameter("%OPTIMIZER") == "adamw"
    assert gin.query_parameter("%ALPHA") == 0.5
    assert gin.query_parameter("%TASK_FEATURE_LENGTHS")["inputs"] == 1024
    best = gin.query_parameter("train.best_metric")
    provider = seqio.get_mixture_or_task(mixture)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    scored = [t for t in tasks if t.name == best.split("/")[0]]
    assert len(scored) == 1 and scored[0].metric_fns
