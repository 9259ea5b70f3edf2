"""Multi-host training, simulated on this machine: processes on 127.0.0.1, each with simulated CPU
devices, joined by jax.distributed the way a cluster is described to it (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID) and exchanging collectives over gloo.

The oracle is the same run in one process with as many devices: 2 processes x 4 devices must log
the same loss at every step as 1 process x 8 devices, write one checkpoint that both processes
restore, and, killed with SIGKILL and restarted, resume exactly. The bad-input cases (a
coordinator that never answers, a process count that does not divide the batch, malformed
settings) end with one error line naming the setting, in bounded time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from distill_sbs import partitioning

TINY = [
    "--gin_file=runs/train.gin",
    "--gin.MIXTURE_OR_TASK_NAME='arith_dss'",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 80}",
    "--gin.BATCH_SIZE=8",
    "--gin.TRAIN_STEPS=16",
    "--gin.CHECKPOINT_PERIOD=4",
    "--gin.LOG_PERIOD=1",
    "--gin.DROPOUT_RATE=0.1",
    "--gin.OPTIMIZER='adamw'",
    "--gin.LEARNING_RATE=0.01",
    "--gin.train.eval_at_end=False",
    "--gin.EVAL_PERIOD=0",
    "--gin.NUM_PARTITIONS=2",  # a (4 data x 2 model) mesh: both axes span the two processes
    "--gin.T5Config.vocab_size=256",
    "--gin.T5Config.emb_dim=32",
    "--gin.T5Config.num_heads=2",
    "--gin.T5Config.head_dim=16",
    "--gin.T5Config.mlp_dim=64",
    "--gin.T5Config.num_encoder_layers=1",
    "--gin.T5Config.num_decoder_layers=1",
]
STEPS = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(base: dict[str, str], devices: int, **cluster: str) -> dict[str, str]:
    env = dict(base, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    # No persistent compilation cache: only process 0 writes it, so a job's processes could start
    # their first collective far apart (one loads, the other compiles) and miss gloo's 30 s.
    cache = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", *cache):
        env.pop(k, None)
    env.update(cluster)
    return env


def _start(base_env: dict[str, str], model_dir: str, num_processes: int, devices: int, cwd):
    """`num_processes` train processes of one job, with a fresh coordinator port."""
    cmd = [sys.executable, "-m", "distill_sbs.train", *TINY, f"--gin.MODEL_DIR='{model_dir}'"]
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    for pid in range(num_processes):
        cluster = {}
        if num_processes > 1:
            cluster = {
                "JAX_COORDINATOR_ADDRESS": address,
                "JAX_NUM_PROCESSES": str(num_processes),
                "JAX_PROCESS_ID": str(pid),
            }
        env = _env(base_env, devices, **cluster)
        procs.append(
            subprocess.Popen(
                cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return procs


def _finish(procs, timeout: float = 400) -> list[str]:
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


def _metric_lines(model_dir: str) -> list[dict]:
    path = os.path.join(model_dir, "train_metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.endswith("\n")]


@pytest.mark.slow  # three jobs of tiny T5 (5 processes in all), the first two at once
def test_two_processes_equal_one_and_resume_after_sigkill(tmp_path, repo_dir, subprocess_env):
    one_dir, two_dir = str(tmp_path / "one"), str(tmp_path / "two")
    # The one-process reference trains while the two-process job is started and killed.
    one = _start(subprocess_env, one_dir, 1, 8, repo_dir)
    procs = _start(subprocess_env, two_dir, 2, 4, repo_dir)
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in procs):
        lines = _metric_lines(two_dir)
        if lines and lines[-1]["step"] >= 7:
            break
        time.sleep(0.02)
    assert all(p.poll() is None for p in procs), "a process ended before it could be killed"
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait()
    _finish(one)
    ref = {r["step"]: r["loss"] for r in _metric_lines(one_dir)}
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert len({round(v, 6) for v in ref.values()}) > STEPS - 3  # the loss moves: a real check
    first = _metric_lines(two_dir)
    killed_at = first[-1]["step"]
    assert killed_at < STEPS
    # The chief alone writes the metrics: one line per step, in order.
    assert [r["step"] for r in first] == list(range(1, killed_at + 1))

    from distill_sbs.checkpoints import step_dirs

    saved = max(step_dirs(two_dir))
    assert 4 <= saved <= killed_at and saved % 4 == 0
    outs = _finish(_start(subprocess_env, two_dir, 2, 4, repo_dir))
    for out in outs:  # both processes restored the one checkpoint
        assert f"resumed from {two_dir}/checkpoint_{saved}" in out, out[-2000:]

    got = {r["step"]: r["loss"] for r in _metric_lines(two_dir)}  # resumed lines replace killed
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(got[step] - ref[step]) <= 1e-6 * max(1.0, abs(ref[step])), (step, got, ref)
    # The processes wrote one MODEL_DIR laid out as the one-process run's: no per-process files,
    # no checkpoint left half-written by the kill next to the complete ones.
    assert max(step_dirs(two_dir)) == STEPS
    assert sorted(os.listdir(two_dir)) == sorted(os.listdir(one_dir))
    for step in step_dirs(two_dir):
        assert sorted(os.listdir(f"{two_dir}/checkpoint_{step}")) == sorted(
            os.listdir(f"{one_dir}/checkpoint_{step}")
        )


def test_host_shards_are_disjoint_rows_of_the_one_host_batch():
    """get_dataset(shard_id, num_shards): the hosts' batches stacked are the one-host batch."""
    import distill_sbs.tasks  # noqa: F401  (registers arith_dss)

    from distill_sbs import data

    kw = dict(task_feature_lengths={"inputs": 64, "targets": 80}, split="train", seed=3, pack=True)
    whole = data.get_dataset("arith_dss", batch_size=8, **kw).take(3)
    parts = [
        list(data.get_dataset("arith_dss", batch_size=4, shard_id=i, num_shards=2, **kw).take(3))
        for i in range(2)
    ]
    for step, batch in enumerate(whole):
        assert all(parts[i][step]["decoder_target_tokens"].shape[0] == 4 for i in range(2))
        for key, value in batch.items():
            stacked = np.concatenate([parts[0][step][key], parts[1][step][key]])
            np.testing.assert_array_equal(stacked, value.numpy(), err_msg=f"{key} at {step}")
        rows = [tuple(r) for r in batch["decoder_target_tokens"].numpy()]
        assert len(set(rows)) >= 6  # mostly distinct rows: the comparison is not vacuous
    with pytest.raises(ValueError, match="shard_id=2"):
        data.get_dataset("arith_dss", batch_size=4, shard_id=2, num_shards=2, **kw)


def _init_only(env: dict[str, str]) -> subprocess.Popen:
    code = "from distill_sbs.partitioning import maybe_initialize_distributed as m; m()"
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True
    )


def test_coordinator_that_never_answers_is_one_error_line_in_bounded_time(subprocess_env):
    """Process 1 with no coordinator, and process 0 whose peer never comes: both give up after
    DISTILL_SBS_INIT_TIMEOUT with one line naming the settings (not jax's C++ abort)."""
    # Two separate jobs: process 1 dials a port nobody binds; process 0 binds its own and waits
    # for a peer that never comes.
    addresses = [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]
    procs = [
        _init_only(
            _env(
                subprocess_env,
                1,
                JAX_COORDINATOR_ADDRESS=address,
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(pid),
                DISTILL_SBS_INIT_TIMEOUT="3",
            )
        )
        for pid, address in zip((1, 0), addresses, strict=True)
    ]
    start = time.time()
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert time.time() - start < 60
    for p, err, address in zip(procs, errs, addresses, strict=True):
        assert p.returncode == 1, err[-2000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: jax.distributed did not start within 3 s"), err[-2000:]
        assert f"JAX_COORDINATOR_ADDRESS={address}" in last and "JAX_NUM_PROCESSES=2" in last
        assert "Check failure" not in err


def test_cluster_settings_are_checked():
    assert partitioning.cluster_spec({}) is None
    spec = partitioning.cluster_spec(
        {
            "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
            "JAX_NUM_PROCESSES": "4",
            "JAX_PROCESS_ID": "3",
            "DISTILL_SBS_INIT_TIMEOUT": "20",
        }
    )
    assert spec == partitioning.ClusterSpec("10.0.0.1:1234", 4, 3, 20)
    # jax detects SLURM / TPU layouts by itself: the variables stay unset.
    assert partitioning.cluster_spec({"DISTILL_SBS_MULTIHOST": "1"}) == partitioning.ClusterSpec(
        None, None, None, partitioning.DEFAULT_INIT_TIMEOUT
    )
    bad = {
        "JAX_PROCESS_ID": ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID='2'"),
        "count": ({"JAX_NUM_PROCESSES": "zero", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES='zero'"),
        "port": ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1"}, "must be host:port"),
        "missing": ({}, "JAX_NUM_PROCESSES .* and JAX_PROCESS_ID .* must be set"),
        "timeout": ({"DISTILL_SBS_INIT_TIMEOUT": "-1"}, "DISTILL_SBS_INIT_TIMEOUT='-1'"),
    }
    for case, (extra, message) in bad.items():
        env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", **extra}
        if case == "timeout":
            env.update(JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="0")
        with pytest.raises(ValueError, match=message):
            partitioning.cluster_spec(env)


def test_a_process_count_that_does_not_divide_the_batch_is_refused(monkeypatch, tmp_path):
    """3 processes, BATCH_SIZE=4: refused before anything is written to MODEL_DIR."""
    from distill_sbs import train as training

    fields = {f.name: None for f in dataclasses.fields(training.TrainConfig)}
    cfg = training.TrainConfig(**{**fields, "batch_size": 4, "model_dir": str(tmp_path / "m")})
    part = partitioning.Partitioner(partitioning.create_mesh(devices=jax.devices()[:1]))
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    with pytest.raises(ValueError, match=r"BATCH_SIZE=4 .* processes 3 \(JAX_NUM_PROCESSES\)"):
        training.setup(cfg, part)
    assert not (tmp_path / "m").exists()
