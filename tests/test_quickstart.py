"""The README's main command: trains the DSS and the fine-tuning student on the embedded data and
prints the accuracy table (slow: about 4 minutes on 2 CPU cores).

The thresholds are the measured figures (see docs/training.md) less a safety margin: the run is
deterministic given the seed, but XLA's CPU numerics differ a little between machines."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Measured on 2 CPU cores: DSS 77.0 / fine-tuning 61.5 (seed 0, the default), 77.0 / 65.0
# (seed 1), 74.5 / 65.5 (seed 2); majority answer 37.0. Margins 15.5, 12.0 and 9.0 points; this
# test runs seed 0, so the bounds leave 7.5 points of slack for numeric differences.
MIN_MARGIN = 8.0  # DSS minus fine-tuning, in points of test accuracy
MIN_ABOVE_MAJORITY = 15.0  # each student minus the majority-answer baseline (measured >= 24.5)


def _value(rows: list[str], student: str, metric: str) -> float:
    hits = [r for r in rows if r.startswith(student + " ") and metric in r]
    assert len(hits) == 1, rows
    return float(hits[0].split()[-2])


@pytest.mark.slow
def test_quickstart_dss_beats_finetuning(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.time()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill_sbs.compare",
            "--gin_file=quickstart.gin",
            f"--gin.MODEL_DIR='{tmp_path}'",
        ],
        env=env,
        cwd=str(tmp_path),  # gin files are found relative to the package, not the cwd
        capture_output=True,
        text=True,
        timeout=900,
    )
    elapsed = time.time() - t0
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    header = [i for i, ln in enumerate(lines) if ln.startswith("student")]
    assert header, out.stdout[-3000:]
    rows = lines[header[-1] + 1 :]
    print("\n".join(lines[header[-1] :]))
    print(f"quickstart took {elapsed:.0f} s")
    dss = _value(rows, "dss", "arith_dss_label/numeric_accuracy")
    finetune = _value(rows, "finetune", "arith_finetune/numeric_accuracy")
    (majority_row,) = [r for r in rows if r.startswith("majority ")]
    majority = float(majority_row.split()[-2])
    for sub in ("dss", "finetune"):
        assert os.path.exists(os.path.join(tmp_path, sub, "final_metrics.json"))
    assert min(dss, finetune) >= majority + MIN_ABOVE_MAJORITY, (dss, finetune, majority)
    assert dss >= finetune + MIN_MARGIN, (dss, finetune)
