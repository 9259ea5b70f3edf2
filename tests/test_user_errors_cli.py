"""Issue 9 through the launchers: a user error is one line `error: ...` and exit status 2, the
traceback only with DISTILL_SBS_DEBUG=1; the DSS release trains offline with no variable but
DISTILL_SBS_DATA_DIR. Issue 19: every program, gin-configured or not, keeps that contract
(program.run), bad flags included. Each check is one subprocess (5-10 s of start-up each)."""

from __future__ import annotations

import subprocess
import sys

import pytest

TRAIN = [
    "--gin_file=runs/train.gin",
    "--gin_file=models/t5_1_1_tiny.gin",
    "--gin.MIXTURE_OR_TASK_NAME='arith_dss'",
]


def _run(module, args, env, cwd, **extra_env):
    out = subprocess.run(
        [sys.executable, "-m", f"distill_sbs.{module}", *args],
        env={**env, **extra_env},
        cwd=str(cwd),
        capture_output=True,
        text=True,
        timeout=600,
    )
    return out.returncode, out.stderr


def _one_line_error(rc, stderr, message):
    assert rc == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], stderr[-3000:]
    assert sum(line.startswith("error:") for line in lines) == 1, stderr[-3000:]


@pytest.fixture
def env(subprocess_env):
    return {k: v for k, v in subprocess_env.items() if k != "DISTILL_SBS_DEBUG"}


def test_misspelled_macro_one_line_and_traceback_with_debug(tmp_path, env):
    args = [*TRAIN, f"--gin.MODEL_DIR='{tmp_path}/run'", "--gin.TRAIN_STPES=2"]
    rc, stderr = _run("train", args, env, tmp_path)
    _one_line_error(rc, stderr, "gin macro TRAIN_STPES (did you mean TRAIN_STEPS?)")
    rc, stderr = _run("train", args, env, tmp_path, DISTILL_SBS_DEBUG="1")
    assert rc == 2 and "Traceback" in stderr and "UserError" in stderr, stderr[-3000:]


def test_unknown_task_in_eval_is_one_line(tmp_path, env):
    args = [
        "--gin_file=runs/eval.gin",
        f"--gin.CHECKPOINT_PATH='{tmp_path}/none'",
        "--gin.MIXTURE_OR_TASK_NAME='arith_dsss'",
    ]
    rc, stderr = _run("eval", args, env, tmp_path)
    _one_line_error(rc, stderr, "MIXTURE_OR_TASK_NAME='arith_dsss' is not a registered task")


def test_non_utf8_input_of_infer_is_one_line(tmp_path, env):
    (tmp_path / "in.jsonl").write_bytes(b'{"input": "a"}\n{"input": "caf\xe9"}\n')
    args = [
        "--gin_file=runs/infer.gin",
        f"--gin.CHECKPOINT_PATH='{tmp_path}/none'",
        f"--gin.INPUT_FILE='{tmp_path}/in.jsonl'",
        f"--gin.OUTPUT_FILE='{tmp_path}/out.jsonl'",
    ]
    rc, stderr = _run("infer", args, env, tmp_path)
    _one_line_error(rc, stderr, "in.jsonl:2: not valid UTF-8 (byte 0xe9")


@pytest.mark.slow
def test_dss_release_trains_offline_with_only_the_data_dir(tmp_path, env, dss_dir):
    env = {k: v for k, v in env.items() if not k.startswith("DISTILL_SBS_")}
    args = [
        "--gin_file=runs/train.gin",
        "--gin_file=models/t5_1_1_tiny.gin",
        "--gin.MIXTURE_OR_TASK_NAME='cqa_dss'",
        f"--gin.MODEL_DIR='{tmp_path}/run'",
        "--gin.TRAIN_STEPS=2",
        "--gin.BATCH_SIZE=2",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 32}",
        "--gin.EVAL_PERIOD=0",
        "--gin.LOG_PERIOD=1",
        "--gin.train.eval_at_end=False",
    ]
    rc, stderr = _run("train", args, env, tmp_path, DISTILL_SBS_DATA_DIR=str(dss_dir))
    assert rc == 0, stderr[-3000:]
    assert (tmp_path / "run" / "final_metrics.json").is_file()
    assert (tmp_path / "run" / "config.gin").is_file()


def test_corrupt_checkpoint_in_infer_is_one_line(tmp_path, env):
    import jax
    from _tiny_t5 import tiny_config

    from distill_sbs import checkpoints, models
    from distill_sbs.data.vocab import ARITH_SPM

    cfg = tiny_config()
    params = models.EncoderDecoderModel(cfg).init_params(jax.random.PRNGKey(0))
    ck = str(tmp_path / "ck")
    checkpoints.save_native(ck, params, cfg, ARITH_SPM, extra_ids=0)
    for name in ("_METADATA", "manifest.ocdbt"):  # garbled as by a broken copy
        (tmp_path / "ck" / "params" / name).write_bytes(b"\x00garbage" * 50)
    (tmp_path / "in.jsonl").write_text('{"input": "1 + 2"}\n')
    args = [
        "--gin_file=runs/infer.gin",
        f"--gin.CHECKPOINT_PATH='{ck}'",
        f"--gin.INPUT_FILE='{tmp_path}/in.jsonl'",
        f"--gin.OUTPUT_FILE='{tmp_path}/out.jsonl'",
    ]
    rc, stderr = _run("infer", args, env, tmp_path)
    _one_line_error(rc, stderr, f"{ck}/params/_METADATA: truncated")  # named by its checksums
    assert "asyncio" not in stderr and "Task exception" not in stderr, stderr[-3000:]


def test_serve_refuses_a_checkpoint_without_vocabulary(tmp_path, env):
    import jax
    from _tiny_t5 import tiny_config

    from distill_sbs import checkpoints, models

    cfg = tiny_config()
    params = models.EncoderDecoderModel(cfg).init_params(jax.random.PRNGKey(0))
    checkpoints.save_native(str(tmp_path / "ck"), params, cfg, None)
    ck = str(tmp_path / "ck")
    cmd = [sys.executable, "-m", "distill_sbs.serve", "--checkpoint", ck, "--port", "0"]
    # without the check the server would start and serve (then every request fails): time out
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    rc, stderr = out.returncode, out.stderr
    assert rc != 0 and "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "the checkpoint has no vocabulary" in last, stderr


@pytest.mark.parametrize(
    "module,args,message",
    [
        (
            "convert",
            ["hf-to-native", "--hf_dir", "/nonexistent", "--out", "/tmp/x"],
            "/nonexistent/config.json: not found",
        ),
        ("convert", ["to-t5x", "--out", "/tmp/x"], "expected one command"),
        ("serve", ["--checkpoint", "/nonexistent"], "/nonexistent: no such checkpoint directory"),
        ("serve", [], "Flag --checkpoint must have a value"),
        ("serve", ["--checkpoint", "/x", "--port", "eighty"], "flag --port=eighty"),
        ("annotate", ["--input", "in.jsonl", "--output", "out.jsonl", "--api", "grpc"], "--api"),
        ("annotate", ["--output", "out.jsonl"], "give exactly one of --input and --dataset"),
        ("annotate_topk", ["--task=arith_dss", "--teacher=/x"], "--output is required"),
        ("annotate_topk", ["--task=nosuch", "--teacher=/x", "--output=o"], "'nosuch' was not"),
        ("data.report", ["--datasets=nosuch"], "dataset 'nosuch' is not registered"),
        ("infer", ["--gin_file=runs/infer.gin", "positional"], "unexpected argument(s)"),
        ("train", ["--no_such_flag=1"], "Unknown command line flag 'no_such_flag'"),
    ],
)
def test_every_program_reports_a_user_error_in_one_line(module, args, message, tmp_path, env):
    rc, stderr = _run(module, args, env, tmp_path)
    _one_line_error(rc, stderr, message)


def test_serve_on_a_busy_port_is_one_line_before_loading(tmp_path, env):
    """The port is checked before the model loads (it was a 33-line OSError after minutes of
    loading): with another server listening there, the checkpoint is never looked at."""
    import socket

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        args = ["--checkpoint", "/nonexistent", "--host", "127.0.0.1", "--port", str(port)]
        rc, stderr = _run("serve", args, env, tmp_path)
    _one_line_error(rc, stderr, f"--host 127.0.0.1 --port {port}: Address already in use")
