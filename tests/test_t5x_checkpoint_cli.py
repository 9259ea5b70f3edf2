"""The T5X paths through the launchers: `convert native-to-t5x` / `t5x-to-native` round trip,
INITIAL_CHECKPOINT_PATH of `distill_sbs.train` on a T5X checkpoint (the run starts from its exact
parameters), and one-line errors for a path that is not a T5X checkpoint and for a gin model that
disagrees with the checkpoint. One subprocess per check (5-10 s of start-up each)."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest

from distill_sbs import checkpoints, t5x_checkpoint
from distill_sbs.models import EncoderDecoderModel
from distill_sbs.network import T5Config

# The shape of distill_sbs/gin/models/t5_1_1_tiny.gin
TINY_GIN_SHAPE = T5Config(
    vocab_size=32128,
    emb_dim=32,
    num_heads=4,
    num_encoder_layers=2,
    num_decoder_layers=2,
    head_dim=8,
    mlp_dim=64,
)
TRAIN = [
    "--gin_file=runs/train.gin",
    "--gin.MIXTURE_OR_TASK_NAME='arith_dss'",
    "--gin.TRAIN_STEPS=1",
    "--gin.BATCH_SIZE=4",
    "--gin.EVAL_PERIOD=0",
    "--gin.LEARNING_RATE=0.0",  # the step leaves the parameters as they were restored
    "--gin.train.eval_at_end=False",  # the checks read only the parameters: no decoding
]


def _run(module: str, args: list[str], env, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"distill_sbs.{module}", *args],
        env=env, cwd=str(cwd), capture_output=True, text=True, timeout=900,
    )  # fmt: skip


def _one_line_error(r: subprocess.CompletedProcess, message: str) -> None:
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    # one error line (orbax may still log its shutdown after it)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], r.stderr[-3000:]


def _leaves(tree) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


@pytest.fixture
def env(subprocess_env):
    return {k: v for k, v in subprocess_env.items() if k != "DISTILL_SBS_DEBUG"}


@pytest.mark.slow
def test_convert_round_trip_and_not_a_t5x_checkpoint(tmp_path, env, tiny_t5_config):
    params = EncoderDecoderModel(tiny_t5_config).init_params(jax.random.PRNGKey(1))
    checkpoints.save_native(str(tmp_path / "native"), params, tiny_t5_config, None)
    args = ["--checkpoint", str(tmp_path / "native"), "--out", str(tmp_path / "t5x")]
    r = _run("convert", ["native-to-t5x", *args], env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "t5x" / "checkpoint_0" / "checkpoint").is_file()
    args = ["--checkpoint", str(tmp_path / "t5x"), "--out", str(tmp_path / "back")]
    r = _run("convert", ["t5x-to-native", *args], env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    back = checkpoints.load_native(str(tmp_path / "back"))
    assert back.config == tiny_t5_config
    want, got = _leaves(params), _leaves(back.params)
    assert sorted(want) == sorted(got)
    assert all(got[k].tobytes() == want[k].tobytes() for k in want)
    # a native checkpoint is not a T5X one
    args = ["--checkpoint", str(tmp_path / "native"), "--out", str(tmp_path / "x")]
    _one_line_error(_run("convert", ["t5x-to-native", *args], env, tmp_path), "not a T5X")


@pytest.fixture
def tiny_t5x(tmp_path) -> tuple[str, dict]:
    params = EncoderDecoderModel(TINY_GIN_SHAPE).init_params(jax.random.PRNGKey(2))
    t5x_checkpoint.save(str(tmp_path / "t5x"), params, TINY_GIN_SHAPE, step=5, dtype="bfloat16")
    return str(tmp_path / "t5x"), params


@pytest.mark.slow
def test_initial_checkpoint_path_reads_a_t5x_checkpoint(tmp_path, env, tiny_t5x):
    path, _ = tiny_t5x

    def train(model_gin: str, run: str) -> subprocess.Popen:
        args = [
            *TRAIN,
            f"--gin_file=models/{model_gin}",
            f"--gin.MODEL_DIR='{tmp_path}/{run}'",
            f"--gin.INITIAL_CHECKPOINT_PATH='{path}'",
        ]
        return subprocess.Popen(
            [sys.executable, "-m", "distill_sbs.train", *args], env=env, cwd=str(tmp_path),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
        stdout, stderr = proc.communicate(timeout=900)
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    # both runs at once (start-up is mostly one thread)
    runs = [train("t5_1_1_tiny.gin", "run"), train("t5_1_0_tiny.gin", "run2")]
    try:
        r, r2 = (finish(p) for p in runs)
    finally:
        for p in runs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"initialised from {path}" in r.stdout
    # bfloat16 on disk, float32 in the run, unchanged by a step at learning rate 0
    want = _leaves(t5x_checkpoint.load(path)[1])
    got = _leaves(checkpoints.load_native(f"{tmp_path}/run").params)
    assert sorted(want) == sorted(got)
    assert all(got[k].tobytes() == want[k].tobytes() for k in want)
    # the same checkpoint under a gin model of another shape: one line naming what disagrees
    _one_line_error(r2, "the gin model says")
    assert "logits_via_embedding=True" in r2.stderr and "mlp_activations=('relu',)" in r2.stderr
