"""The user's programs at real size (issue 21): a t5_1_1-small-shaped student with 3 layers and
the 32,128-id vocabulary (tests/_real_size.py, random weights, one checkpoint for the module),
served as the teacher of `annotate` on the DSS release's cqa, and the start of the paper's
pipeline on that release: `train` a few steps from it, `eval` a few examples, `infer` with
rationales. Every program runs as a user runs it (`python -m`, a subprocess).

Costs on 2 cores shared with other work (`pytest --durations=0`; wall time, the CPU time of the
subprocesses beside it): the checkpoint 13-19 s once, then each test's comment; the module in all
about 155 s wall and 105 s of CPU (`/usr/bin/time`, children included)."""

from __future__ import annotations

import http.client
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import urllib.parse

import pytest
from _real_size import save_real_size_checkpoint
from _serve_proc import start

pytestmark = pytest.mark.slow

KEY_ENV = "DSS_REAL_SIZE_TEACHER_KEY"
SECRET = "sk-real-size-7d1e9a0b3c5f"
LENGTHS = "{'inputs': 128, 'targets': 64}"
# Python's logging at INFO (absl's "I1203 12:00:00.000000 123 file.py:12]" or logging's
# "INFO:"): what a user did not ask for. XLA's and TensorFlow's C++ lines (file.cc) are not ours.
PY_INFO = re.compile(r"^(I\d{4} [\d:.]+ +\d+ \S+\.py:\d+\]|INFO:)", re.M)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return save_real_size_checkpoint(str(tmp_path_factory.mktemp("real") / "ckpt"))


@pytest.fixture(scope="module")
def env(subprocess_env, dss_dir) -> dict[str, str]:
    """The user's environment: the release as the data directory, the key in $KEY_ENV."""
    clean = {k: v for k, v in subprocess_env.items() if not k.startswith("DISTILL_SBS_")}
    return clean | {"DISTILL_SBS_DATA_DIR": str(dss_dir), KEY_ENV: SECRET}


def _run(module: str, args: list[str], env: dict[str, str], cwd) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS`; its output is kept beside the run for a failure."""
    p = subprocess.run(
        [sys.executable, "-m", module, *args],
        env=env, cwd=str(cwd), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    name = module.rsplit(".", 1)[-1]
    (cwd / f"{name}.stdout").write_text(p.stdout)
    (cwd / f"{name}.stderr").write_text(p.stderr)
    return p


def _release(env: dict[str, str]) -> pathlib.Path:
    return pathlib.Path(env["DISTILL_SBS_DATA_DIR"])


def _clean_exit(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert not PY_INFO.search(p.stderr), PY_INFO.findall(p.stderr)


def test_annotate_cqa_with_the_served_student_as_teacher(checkpoint, env, tmp_path):
    """`serve` behind a key, then `annotate --dataset cqa` (the release's train split, 3 records,
    few-shot prompts of about 320 tokens) against it: every request answered, the records
    written with the student's raw text, the key in no file (25-30 s)."""
    cmd = [
        sys.executable, "-m", "distill_sbs.serve", "--checkpoint", checkpoint,
        "--host", "127.0.0.1", "--port", "0", "--api_key_env", KEY_ENV,
        "--model_name", "student", "--max_tokens_limit", "16",
    ]  # fmt: skip
    proc, base_url = start(cmd, env)
    try:
        # the key is demanded: a request without it is refused
        url = urllib.parse.urlsplit(base_url)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        conn.request("GET", url.path + "/models")
        assert conn.getresponse().status == 401

        out = tmp_path / "ann" / "cqa_train.jsonl"
        args = [
            "--dataset", "cqa", "--split", "train", "--limit", "3", "--output", str(out),
            "--teacher", "student", "--base_url", base_url, "--model", "student",
            "--api_key_env", KEY_ENV, "--max_tokens", "16", "--max_concurrency", "3",
            "--noprogress",
        ]  # fmt: skip
        p = _run("distill_sbs.annotate", args, env, tmp_path)
    finally:
        proc.terminate()
        _, server_stderr = proc.communicate(timeout=60)
    (tmp_path / "serve.stderr").write_text(server_stderr)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr + server_stderr, (p.stderr + server_stderr)[-3000:]
    assert "examples: 3 = 3 annotated + 0 failed" in p.stdout, p.stdout

    records = [json.loads(line) for line in out.read_text().splitlines()]
    gold = [json.loads(line) for line in (_release(env) / "cqa" / "cqa_train.json").open()][:3]
    assert [r["id"] for r in records] == [g["id"] for g in gold]
    for r in records:
        (sample,) = r["teachers"]["student"]
        assert sample["raw"].strip()  # the served student answered (a 500 was no text)
        assert "palm" in r["teachers"]  # the release's own rationales are kept beside it
    summary = json.loads(out.with_name(out.name + ".summary.json").read_text())
    teacher = summary["summary"]["teachers"]["student"]
    assert (teacher["completed"], teacher["failed"]) == (3, 0)
    assert teacher["completion_tokens"] == 3 * 16  # random weights: no early EOS
    assert summary["config"]["teachers"][0]["api_key_env"] == KEY_ENV

    from distill_sbs.data.records import read_jsonl

    assert len(read_jsonl(out)) == 3  # what annotate writes, the data layer reads
    scanned = 0
    for root, _, files in os.walk(tmp_path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert SECRET.encode() not in f.read(), os.path.join(root, name)
            scanned += 1
    assert scanned >= 6  # records, cache, failed, summary, logs


@pytest.fixture(scope="module")
def trained(checkpoint, env, tmp_path_factory):
    """`train` 3 steps on cqa_dss (label and rationale objectives) at batch 2, inputs 128 and
    targets 64, from the real-size checkpoint with t5_1_1_small.gin cut to its 3 layers."""
    cwd = tmp_path_factory.mktemp("train")
    model_dir = cwd / "run"
    args = [
        "--gin_file=runs/train.gin",
        "--gin_file=models/t5_1_1_small.gin",
        "--gin.T5Config.num_encoder_layers=3",
        "--gin.T5Config.num_decoder_layers=3",
        "--gin.MIXTURE_OR_TASK_NAME='cqa_dss'",
        f"--gin.MODEL_DIR='{model_dir}'",
        f"--gin.INITIAL_CHECKPOINT_PATH='{checkpoint}'",
        "--gin.TRAIN_STEPS=3",
        "--gin.BATCH_SIZE=2",
        f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
        "--gin.EVAL_PERIOD=0",
        "--gin.LOG_PERIOD=1",
        "--gin.train.eval_at_end=False",  # eval runs below, as its own program
    ]
    return _run("distill_sbs.train", args, env, cwd), model_dir


def test_train_a_few_steps_on_cqa_dss(trained, checkpoint):
    """Exit 0, initialised from the checkpoint, a finite loss per step for both objectives, a
    checkpoint at the last step (the training fixture: 55-110 s, about 45 s of CPU)."""
    p, model_dir = trained
    _clean_exit(p)
    assert f"initialised from {checkpoint}" in p.stdout, p.stdout[-3000:]
    steps = [json.loads(line) for line in (model_dir / "train_metrics.jsonl").open()]
    assert [s["step"] for s in steps] == [1, 2, 3]
    for s in steps:
        assert math.isfinite(s["loss"]) and s["loss"] > 0, s
        assert math.isfinite(s["grad_norm"]) and s["grad_norm"] > 0, s
    # each objective is seen and its loss near log(32128) = 10.4 at random weights
    for objective in ("label", "rationale"):
        losses = [s[f"{objective}/loss"] for s in steps if f"{objective}/loss" in s]
        assert losses and all(5 < x < 20 for x in losses), (objective, steps)
    final = json.loads((model_dir / "final_metrics.json").read_text())
    assert final["step"] == 3 and math.isfinite(final["train/loss"])
    assert (model_dir / "checkpoint_3" / "commit_success.txt").is_file()


def test_eval_and_infer_with_rationales(trained, env):
    """`eval` on the first 4 test examples, then `infer` with RATIONALE=True on 3 test questions
    formatted as the task does: metrics and one row per example (50 s, about 35 s of CPU)."""
    import numpy as np

    from distill_sbs.data.dss import format_cqa

    p, model_dir = trained
    assert p.returncode == 0, p.stderr[-3000:]
    cwd = model_dir.parent
    out_dir = cwd / "eval"
    args = [
        "--gin_file=runs/eval.gin",
        f"--gin.CHECKPOINT_PATH='{model_dir}'",
        "--gin.MIXTURE_OR_TASK_NAME='cqa_dss'",
        f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
        "--gin.EVAL_NUM_EXAMPLES=4",
        "--gin.BATCH_SIZE=4",
        f"--gin.OUTPUT_DIR='{out_dir}'",
    ]
    e = _run("distill_sbs.eval", args, env, cwd)
    _clean_exit(e)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    accuracy = metrics["cqa_dss_label/accuracy"]
    assert np.isfinite(accuracy) and 0 <= accuracy <= 1, metrics
    test = [json.loads(line) for line in (_release(env) / "cqa" / "cqa_test.json").open()][:4]
    rows = [json.loads(line) for line in (out_dir / "cqa_dss_label.test.jsonl").open()]
    assert [r["target"] for r in rows] == [t["answer"] for t in test]
    assert all(isinstance(r["prediction"], str) for r in rows)

    questions = cwd / "questions.jsonl"
    questions.write_text(
        "".join(
            json.dumps({"id": t["id"], "input": format_cqa(t, "t")[0]}) + "\n" for t in test[:3]
        )
    )
    preds = cwd / "predictions.jsonl"
    args = [
        "--gin_file=runs/infer.gin",
        f"--gin.CHECKPOINT_PATH='{model_dir}'",
        f"--gin.INPUT_FILE='{questions}'",
        f"--gin.OUTPUT_FILE='{preds}'",
        "--gin.RATIONALE=True",
        "--gin.INPUT_LENGTH=128",
        "--gin.MAX_DECODE_LENGTH=16",
        "--gin.BATCH_SIZE=4",
    ]
    i = _run("distill_sbs.infer", args, env, cwd)
    _clean_exit(i)
    rows = [json.loads(line) for line in preds.open()]
    assert [r["id"] for r in rows] == [t["id"] for t in test[:3]]
    for r in rows:
        assert isinstance(r["prediction"], str) and r["rationale"].strip(), r
