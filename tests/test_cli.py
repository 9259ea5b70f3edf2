"""The quickstart config parses and names registered mixtures (the paper's configs are tested in
test_paper_configs.py); the launchers find gin files by name from any working directory, turn
--gin.KEY=VALUE into bindings and report a typo or a missing file in one line."""

from __future__ import annotations

import os
import subprocess
import sys

import gin
import pytest

from distill_sbs import cli
from distill_sbs.errors import UserError

GIN = str(cli.GIN_DIR)


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_gin_flags_and_resolve(tmp_path, monkeypatch):
    from absl import flags

    argv = cli.rewrite_gin_args(
        ["prog", "--gin_file=quickstart.gin", "--gin.TRAIN_STEPS=5", "--gin_bindings", "a.b = 1"]
    )
    assert argv[2] == "--gin_bindings=TRAIN_STEPS = 5"
    assert "gin_file" not in flags.FLAGS  # importing cli defines no flag: cli.run does
    fv = flags.FlagValues()
    cli.define_flags(fv)  # the same flag definitions, parsed in isolation
    assert fv(argv) == ["prog"]
    assert fv.gin_file == ["quickstart.gin"] and fv.gin_bindings == ["TRAIN_STEPS = 5", "a.b = 1"]
    with pytest.raises(flags.UnrecognizedFlagError):
        fv(["prog", "-x"])
    with pytest.raises(UserError, match="--gin.KEY=VALUE"):
        cli.rewrite_gin_args(["prog", "--gin.TRAIN_STEPS"])

    monkeypatch.chdir(tmp_path)  # the configs travel with the package, not the working directory
    assert cli.resolve("quickstart") == os.path.join(GIN, "quickstart.gin")
    assert cli.resolve("quickstart.gin") == os.path.join(GIN, "quickstart.gin")
    assert cli.resolve("paper/base.gin") == os.path.join(GIN, "paper", "base.gin")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "quickstart.gin").write_text("")
    assert cli.resolve("quickstart", ["mine"]) == str(tmp_path / "mine" / "quickstart.gin")
    with pytest.raises(UserError, match="nope.gin"):
        cli.resolve("nope.gin")


def test_gin_typo_is_one_clear_error():
    with pytest.raises(UserError, match="TRAIN_STEPZ|train_stepz"):
        cli.parse_gin(["quickstart.gin"], ["train.train_stepz = 3"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gin_file=nope.gin"], "gin file 'nope.gin' not found"),
        (["--gin_file=quickstart.gin", "--gin.train.train_stepz=3"], "gin configuration error"),
        (["--gin_file=quickstart.gin"], "python -m distill_sbs.compare"),
    ],
    ids=["missing-file", "typo", "quickstart-to-train"],
)
def test_launcher_errors_are_one_line(tmp_path, subprocess_env, args, message):
    out = subprocess.run(
        [sys.executable, "-m", "distill_sbs.train", *args],
        env=subprocess_env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]


def _parse(path, extra=()):
    cli.parse_gin([path], ["MODEL_DIR = '/tmp/x'", *extra])


def test_quickstart_config():
    import seqio

    _parse("quickstart.gin")
    runs = gin.query_parameter("compare.runs")
    assert set(runs) == {"dss", "finetune"}
    for mixture in runs.values():
        seqio.get_mixture_or_task(mixture)
    assert gin.query_parameter("T5Config.vocab_size") >= 256
