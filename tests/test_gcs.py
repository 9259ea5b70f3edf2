"""gs:// everywhere, against a GCS emulator (gcp-storage-emulator) started on 127.0.0.1.

orbax/tensorstore reach it through TENSORSTORE_GCS_HTTP_URL, the project's own reads and writes
(etils.epath with EPATH_USE_TF=0, i.e. fsspec/gcsfs) through STORAGE_EMULATOR_HOST. What goes
through tf.io.gfile cannot reach an emulator: the project keeps those writes (TensorBoard event
files) in a local directory mirrored to the gs:// MODEL_DIR (storage.LocalMirror), which is tested
here through the files it uploads. The emulator runs through tests/gcs_emulator.py, which adds the
x-goog-generation header real GCS sends on downloads (tensorstore's OCDBT needs it).
"""

from __future__ import annotations

import json
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import jax
import numpy as np
import pytest
from _tiny_t5 import TRAIN_FLAGS

BUCKET = "dss-test"
STEPS = 20

TINY = [*TRAIN_FLAGS, "--gin.TRAIN_STEPS=20"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"emulator exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"emulator did not answer {url} within {timeout} s")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory, subprocess_env):
    """A GCS emulator with bucket BUCKET on a free loopback port; this process and the returned
    subprocess environment point at it. Stopped when the module's tests end."""
    port = _free_port()
    data = tmp_path_factory.mktemp("gcs")
    # tests/gcs_emulator.py: the emulator plus the x-goog-generation header it leaves out.
    emulator = [sys.executable, str(pathlib.Path(__file__).with_name("gcs_emulator.py"))]
    cmd = [*emulator, "-d", str(data), "start", "--host", "127.0.0.1", "--port", str(port)]
    # The emulator logs every request: to a file, since a full pipe would block its only thread.
    log = open(data / "emulator.log", "w")  # noqa: SIM115 - closed when the emulator stops
    proc = subprocess.Popen(
        [*cmd, "--default-bucket", BUCKET], stdout=log, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    env = {
        "EPATH_USE_TF": "0",  # epath through fsspec/gcsfs, which honours the emulator
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no gRPC bucket-type probe (60 s timeout)
        "GOOGLE_CLOUD_PROJECT": "test",
    }
    mp = pytest.MonkeyPatch()
    try:
        _wait_http(f"{url}/storage/v1/b", proc, timeout=60)
        for k, v in env.items():
            mp.setenv(k, v)
        _epath_backend_changed()
        yield dict(subprocess_env, **env, TF_CPP_MIN_LOG_LEVEL="3")
    finally:
        mp.undo()
        _epath_backend_changed()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _epath_backend_changed() -> None:
    """epath caches its first answer to "use tf.io.gfile for gs://?" (a functools.cache in
    etils.epath.gpath): once an earlier test in this process touched epath, EPATH_USE_TF set
    here would be ignored and gs:// would go to tf.io.gfile, which cannot reach the emulator."""
    from etils.epath import gpath

    gpath._is_tf_installed.cache_clear()


def _run(args: list[str], env: dict[str, str], cwd, timeout: float = 300):
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def _start(args: list[str], env: dict[str, str], cwd) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args], env=env, cwd=cwd, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _fresh() -> None:
    """Drops gcsfs's cached listings and sizes: files here are written by other processes."""
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()


def _losses(model_dir: str) -> dict[int, float]:
    from distill_sbs import storage

    _fresh()
    out = {}
    for line in storage.read_text(storage.join(model_dir, "train_metrics.jsonl")).splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def _last_logged_step(model_dir: str) -> int:
    from distill_sbs import storage

    path = storage.join(model_dir, "train_metrics.jsonl")
    _fresh()
    try:
        lines = storage.read_text(path).splitlines()
    except (FileNotFoundError, OSError):
        return 0
    return json.loads(lines[-1])["step"] if lines else 0


def _initial_checkpoint(path: str) -> None:
    import jax
    from _tiny_t5 import tiny_config

    from distill_sbs.checkpoints import save_native
    from distill_sbs.data.vocab import ARITH_SPM
    from distill_sbs.models import EncoderDecoderModel

    cfg = tiny_config()
    params = EncoderDecoderModel(cfg).init_params(jax.random.PRNGKey(7))
    save_native(path, params, cfg, ARITH_SPM, extra_ids=0)


def _serve_one_request(checkpoint: str, env: dict[str, str], cwd, log: pathlib.Path) -> dict:
    cmd = [sys.executable, "-m", "distill_sbs.serve", "--checkpoint", checkpoint, "--port", "0"]
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True
    )
    try:
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()))
        reader.start()
        reader.join(180)
        if not line or "serving" not in line[0]:
            proc.kill()
            raise AssertionError(f"server did not start: {log.read_text()[-3000:]}")
        base = line[0].split(" on ")[1].strip()
        models = json.loads(urllib.request.urlopen(f"{base}/models", timeout=60).read())
        name = models["data"][0]["id"]
        body = json.dumps({"model": name, "prompt": "1 + 2 =", "max_tokens": 4}).encode()
        req = urllib.request.Request(
            f"{base}/completions", body, headers={"Content-Type": "application/json"}
        )
        return json.loads(urllib.request.urlopen(req, timeout=120).read())
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow  # five CLI processes and three short trainings: a few minutes on 2 cores
def test_gs_cycle(gcs, tmp_path, repo_dir):
    """MODEL_DIR and INITIAL_CHECKPOINT_PATH on gs://: train, SIGKILL, resume with the losses of
    an uninterrupted run, load, eval, infer, native-to-hf and serve, all from gs://."""
    import distill_sbs
    from distill_sbs import checkpoints, storage

    init, run, ref = f"gs://{BUCKET}/init", f"gs://{BUCKET}/run", str(tmp_path / "ref")
    _initial_checkpoint(init)
    init_flag = f"--gin.INITIAL_CHECKPOINT_PATH='{init}'"
    train = ["-m", "distill_sbs.train", *TINY, init_flag]

    # An uninterrupted local run (the reference) while the gs:// run is started and killed.
    # stderr to files: a pipe nobody reads until the end could fill and block the run.
    logs = {name: tmp_path / f"{name}.log" for name in ("reference", "killed")}
    reference = subprocess.Popen(
        [sys.executable, *train, f"--gin.MODEL_DIR='{ref}'"],
        env=gcs, cwd=repo_dir, stdout=subprocess.DEVNULL, stderr=logs["reference"].open("w"),
    )  # fmt: skip
    killed = subprocess.Popen(
        [sys.executable, *train, f"--gin.MODEL_DIR='{run}'"],
        env=gcs, cwd=repo_dir, stdout=subprocess.DEVNULL, stderr=logs["killed"].open("w"),
    )  # fmt: skip
    # Killed well after the first saves (async: a save commits a few steps after it starts).
    deadline = time.time() + 400
    while _last_logged_step(run) < 13 and killed.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert killed.poll() is None, f"ended before the kill: {logs['killed'].read_text()[-3000:]}"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert reference.wait(timeout=400) == 0, logs["reference"].read_text()[-3000:]
    _fresh()
    saved = max(checkpoints.step_dirs(run), default=None)
    assert saved is not None and 4 <= saved < STEPS, saved

    resumed = _run([*train, f"--gin.MODEL_DIR='{run}'"], gcs, repo_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run}/checkpoint_{saved}" in resumed.stdout
    want, got = _losses(ref), _losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(got[step] - want[step]) <= 1e-6 * max(1.0, abs(want[step])), (step, got, want)
    assert len({round(v, 6) for v in want.values()}) > STEPS // 2  # losses move: it can fail
    _fresh()
    names = storage.listdir(run)
    assert "train" in names and storage.listdir(storage.join(run, "train"))  # TensorBoard, mirrored

    _fresh()
    model, params = distill_sbs.load(run)
    _, ref_params = distill_sbs.load(ref)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)

    # eval, infer and native-to-hf read the finished run at once (start-up is mostly one
    # thread: together they use both cores), and the server starts while they run
    out, hf = f"gs://{BUCKET}/infer/out.jsonl", f"gs://{BUCKET}/hf"
    procs = {
        "eval": ["-m", "distill_sbs.eval", "--gin_file=runs/eval.gin",
                 f"--gin.CHECKPOINT_PATH='{run}'", "--gin.MIXTURE_OR_TASK_NAME='arith_dss'",
                 "--gin.BATCH_SIZE=8", "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
                 f"--gin.OUTPUT_DIR='gs://{BUCKET}/eval'"],
        "infer": ["-m", "distill_sbs.infer", "--gin_file=runs/infer.gin",
                  f"--gin.CHECKPOINT_PATH='{run}'", "--gin.MIXTURE_OR_TASK_NAME='arith_dss'",
                  "--gin.INPUT_LENGTH=64", "--gin.MAX_DECODE_LENGTH=8", "--gin.BATCH_SIZE=8",
                  f"--gin.OUTPUT_FILE='{out}'"],
        "convert": ["-m", "distill_sbs.convert", "native-to-hf", "--checkpoint", run, "--out", hf],
    }  # fmt: skip
    procs = {name: _start(args, gcs, repo_dir) for name, args in procs.items()}
    try:
        answer = _serve_one_request(run, gcs, repo_dir, tmp_path / "serve.log")
        done = {name: _wait(proc) for name, proc in procs.items()}
    finally:  # a failed check leaves no process behind
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert answer["choices"][0]["text"] is not None
    assert answer["usage"]["completion_tokens"] >= 1

    for name, proc in done.items():
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
    _fresh()
    metrics = storage.read_json(f"gs://{BUCKET}/eval/metrics.json")
    assert metrics["checkpoint"] == run
    _fresh()
    rows = [json.loads(x) for x in storage.read_text(out).splitlines()]
    assert rows and all(isinstance(r["prediction"], str) for r in rows), rows[:2]
    _fresh()
    _, hf_params = distill_sbs.load(hf)
    for a, b in zip(jax.tree.leaves(hf_params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _timed(fn, limit_s: float = 30.0):
    """fn()'s exception, which must come within limit_s seconds."""
    start = time.time()
    with pytest.raises(Exception) as info:
        fn()
    assert time.time() - start < limit_s, f"took {time.time() - start:.0f} s"
    return info.value


def test_missing_path_and_bucket_are_clear_errors(gcs, tmp_path):
    """A gs:// path that does not exist and a bucket that does not exist (what a bucket without
    permission looks like to the emulator): one error naming the path, within seconds."""
    import distill_sbs
    from distill_sbs import storage
    from distill_sbs.convert import native_to_hf

    for path in (f"gs://{BUCKET}/no-such-run", "gs://no-such-bucket/run"):
        err = _timed(lambda p=path: distill_sbs.load(p))
        assert isinstance(err, FileNotFoundError) and path in str(err), err
    err = _timed(lambda: storage.makedirs("gs://no-such-bucket/run"))
    assert "gs://no-such-bucket/run" in str(err) and "does not exist" in str(err)
    err = _timed(lambda: storage.write_text("gs://no-such-bucket/x/metrics.json", "{}"))
    assert "gs://no-such-bucket/x/metrics.json" in str(err)

    # A conversion that fails leaves nothing that loads as a HF folder.
    native = f"gs://{BUCKET}/native"
    _initial_checkpoint(native)
    out = "gs://no-such-bucket/hf"
    err = _timed(lambda: native_to_hf(native, out))
    assert out in str(err)
    assert not storage.exists(f"{out}/model.safetensors")


def test_uncommitted_gcs_step_falls_back_to_the_newest_committed(gcs, caplog):
    """On GCS orbax marks a finished step with commit_success.txt; a step without it (a partial
    copy, or a save cut short) is skipped with a warning naming it."""
    import logging

    import optax
    from _tiny_t5 import tiny_config

    from distill_sbs import checkpoints, storage
    from distill_sbs.models import EncoderDecoderModel

    run = f"gs://{BUCKET}/partial-run"
    cfg = tiny_config()
    mgr = checkpoints.CheckpointManager(run, config=cfg, async_save=False)
    saved = {}
    for step in (2, 4):
        params = EncoderDecoderModel(cfg).init_params(jax.random.PRNGKey(step))
        # adam, not sgd: sgd's state has no arrays, hence no object, and gcsfs (unlike
        # tf.io.gfile) writes no placeholder for an empty "directory" that orbax then reads.
        opt_state = optax.adam(1e-3).init(params)
        mgr.save(step, params, opt_state, {"batches_consumed": step}, True)
        saved[step] = params
    mgr.close()
    marker = storage.Path(f"{run}/checkpoint_4/commit_success.txt")
    assert marker.exists()  # orbax's own marker: the test would prove nothing otherwise
    marker.unlink()
    with caplog.at_level(logging.WARNING):
        ckpt = checkpoints.load_native(run)
    assert ckpt.step == 2
    for a, b in zip(jax.tree.leaves(ckpt.params), jax.tree.leaves(saved[2]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert f"{run}/checkpoint_4" in caplog.text and "incomplete checkpoint" in caplog.text
    with pytest.raises(ValueError, match="incomplete checkpoint"):
        checkpoints.load_native(f"{run}/checkpoint_4")
