"""A run killed with SIGKILL mid-training and restarted continues from its last checkpoint, and its
losses after the resume equal an uninterrupted run's (same batches, same dropout rngs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from _tiny_t5 import TRAIN_FLAGS

from distill_sbs.checkpoints import step_dirs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [*TRAIN_FLAGS, "--gin.TRAIN_STEPS=40"]


def _cmd(model_dir: str) -> list[str]:
    return [sys.executable, "-m", "distill_sbs.train", *TINY, f"--gin.MODEL_DIR='{model_dir}'"]


def _losses(model_dir: str) -> dict[int, float]:
    out = {}
    with open(os.path.join(model_dir, "train_metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            out[rec["step"]] = rec["loss"]  # a resumed run's entry replaces the killed run's
    return out


def _last_logged_step(model_dir: str) -> int:
    path = os.path.join(model_dir, "train_metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = [ln for ln in f if ln.endswith("\n")]
    return json.loads(lines[-1])["step"] if lines else 0


@pytest.mark.slow  # three training processes, two at a time
def test_sigkill_and_resume_matches_uninterrupted(tmp_path, subprocess_env):
    env = dict(subprocess_env, TF_CPP_MIN_LOG_LEVEL="3")  # one compilation cache for the three
    full_dir, killed_dir = str(tmp_path / "full"), str(tmp_path / "killed")
    # The uninterrupted run (the reference) trains while the other is started, killed and resumed.
    # stderr to a file: a pipe nobody reads until the end could fill and block the run.
    full_log = tmp_path / "full.log"
    with full_log.open("w") as log:
        full = subprocess.Popen(
            _cmd(full_dir), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log
        )
    proc = subprocess.Popen(
        _cmd(killed_dir), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        # killed after step 14 and once a save has committed (async saves lag on a loaded machine)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if _last_logged_step(killed_dir) >= 14 and step_dirs(killed_dir):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_at = _last_logged_step(killed_dir)
        assert killed_at < 40
        saved = max(step_dirs(killed_dir))
        assert 4 <= saved <= killed_at and saved % 4 == 0
        # resumed while the reference finishes
        resumed = subprocess.run(
            _cmd(killed_dir), env=env, cwd=ROOT, capture_output=True, text=True
        )
        assert full.wait(timeout=600) == 0, full_log.read_text()[-3000:]
    finally:  # a failed check leaves no training process behind
        for p in (full, proc):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {killed_dir}/checkpoint_{saved}" in resumed.stdout

    ref, got = _losses(full_dir), _losses(killed_dir)
    assert sorted(got) == list(range(1, 41))
    for step in range(saved + 1, 41):
        assert abs(got[step] - ref[step]) <= 1e-6 * max(1.0, abs(ref[step])), (step, got, ref)
    # The loss must actually vary over steps, or the comparison would prove nothing.
    assert len({round(v, 6) for v in ref.values()}) > 30
    assert max(step_dirs(killed_dir)) == 40
