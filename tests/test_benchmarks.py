"""The benchmarks and the train step on a host without TensorFlow or SeqIO (issue 23): each runs
in a subprocess where importing them fails (tests/_no_tensorflow.py). The step's losses on numpy
batches there equal its losses on SeqIO's batches here; the training benchmark's mode (a) and the
device check's dry run (CPU, tiny shapes) complete and write their figures."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from _no_tensorflow import random_examples, train_losses

LENGTHS = {"inputs": 32, "targets": 16}


def _start(args: list[str], env: dict[str, str], cwd) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "_no_tensorflow", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> str:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    return stdout


def _seqio_batches(examples: list[dict]) -> list[dict]:
    from distill_sbs.data import ObjectiveEncDecFeatureConverter

    def gen():
        for e in examples:
            yield {**e, "objective_id": np.array([e["objective_id"]], np.int32)}

    spec = {
        "inputs": tf.TensorSpec([None], tf.int32),
        "targets": tf.TensorSpec([None], tf.int32),
        "objective_id": tf.TensorSpec([1], tf.int32),
    }
    ds = tf.data.Dataset.from_generator(gen, output_signature=spec)
    ds = ObjectiveEncDecFeatureConverter(pack=True)(ds, LENGTHS).batch(4, drop_remainder=True)
    return list(ds.as_numpy_iterator())


def test_step_without_tensorflow_gives_the_seqio_path_losses(subprocess_env, repo_dir):
    code = f"""
import json, sys
from _no_tensorflow import BLOCKED, random_examples, train_losses
from distill_sbs.data import batches
examples = random_examples(40, {LENGTHS!r})
losses = train_losses(batches.build_batches(examples, {LENGTHS!r}, batch_size=4))
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({{"losses": losses, "loaded": loaded}}))
"""
    proc = _start(["-c", code], subprocess_env, repo_dir)
    try:  # this side trains while the subprocess starts and trains (both cores)
        expected = train_losses(_seqio_batches(random_examples(40, LENGTHS)))
    except BaseException:
        proc.kill()
        raise
    out = json.loads(_finish(proc).strip().splitlines()[-1])
    assert out["loaded"] == []
    assert len(expected) >= 3
    assert len(set(expected)) == len(expected)  # the steps train: the loss moves
    np.testing.assert_allclose(out["losses"], expected, rtol=1e-6)


@pytest.fixture(scope="module")
def benchmark_runs(subprocess_env, repo_dir, tmp_path_factory):
    """The training benchmark's mode (a) and the device check's dry run, started together (most
    of each is start-up on one thread: together they use both cores); each test waits for its
    own. Output to files: one process blocked on a full pipe would wait for the other."""
    out = tmp_path_factory.mktemp("benchmarks")
    flags = "--mode a --steps 1 --warmup 1 --rounds 1 --batch 2 --input_length 16"
    flags += f" --label_length 4 --rationale_length 8 --threads 0 --json_out {out}/train.json"
    device = ["--dry_run", "--sizes", "small", "--json_out", f"{out}/device.json"]
    args = {
        "train": ["benchmarks/train_benchmark.py", *flags.split()],
        "device": ["benchmarks/device_check.py", *device],
    }
    runs = {}
    for name, run_args in args.items():
        stdout, stderr = (open(out / f"{name}.{n}", "w+") for n in ("out", "err"))  # noqa: SIM115
        cmd = [sys.executable, "-m", "_no_tensorflow", *run_args]
        proc = subprocess.Popen(
            cmd, env=subprocess_env, cwd=repo_dir, stdout=stdout, stderr=stderr, text=True
        )
        runs[name] = (proc, stdout, stderr)
    yield out, runs
    for proc, stdout, stderr in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stdout.close(), stderr.close()


def _finished(runs: dict, name: str) -> str:
    proc, stdout, stderr = runs[name]
    returncode = proc.wait(timeout=600)
    stdout.seek(0), stderr.seek(0)
    printed = stdout.read()
    assert returncode == 0, printed[-3000:] + stderr.read()[-5000:]
    return printed


def test_train_benchmark_fixed_shapes_without_tensorflow(benchmark_runs):
    out, runs = benchmark_runs
    _finished(runs, "train")
    a = json.loads((out / "train.json").read_text())["a"]
    assert a["ours"]["batch_shapes"]["encoder_input_tokens"] == [2, 32]
    assert a["ours"]["batch_shapes"]["decoder_target_tokens"] == [2, 12]
    for side in ("ours", "reference"):
        assert a[side]["examples_per_step"] == 2.0
        assert a[side]["padding_fraction"] == 0.0
    assert np.isfinite(a["ours"]["final_mean_loss"])


def test_device_check_dry_run(benchmark_runs):
    out, runs = benchmark_runs
    printed = _finished(runs, "device")
    result = json.loads((out / "device.json").read_text())
    assert "small ratio ours/reference" in printed and "small decode" in printed
    assert result["configs"]["small"]["emb_dim"] == 512
    assert result["peak_flops_per_s"] > 0
    train = result["train"]["small"]
    assert train["config"]["dtype"] == "bfloat16"
    assert train["reference"]["attention"] == "sdpa"
    for side in ("ours", "reference"):
        assert train[side]["examples_per_s"] > 0 and 0 < train[side]["mfu"] < 1
    assert train["memory"]["plan"]["total"] > train["memory"]["plan"]["params"] > 0
    assert train["memory"]["remat_plans"]["full"]["temporaries"] > 0
    decode = result["decode"]["small"]
    assert decode["ours_tokens_per_s"] > 0 and decode["hf_tokens_per_s"] > 0
    assert decode["token_agreement"] >= 0.5  # same weights, both bf16: greedy mostly agrees
