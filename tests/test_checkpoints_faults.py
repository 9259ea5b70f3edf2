"""Storage faults (issue 25): every kind of checkpoint file truncated, garbled or removed, a
read-only MODEL_DIR, a disk that fills mid-save, gs:// on the emulator. Each is one line naming
the file and the cause, never a config mismatch, never wrong numbers; training resumes from the
newest intact step (losses equal to an uninterrupted run) and says what it skipped.

The library cases run in this process on the tiny T5; the program cases (one line, exit 2, no
orbax noise at exit) share one uninterrupted training run, copied per test. A read-only disk is a
read-only bind mount and a full disk a small tmpfs (the tests run as root; a chmod'ed directory
would not stop root).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from _tiny_t5 import TRAIN_FLAGS, tiny_config
from test_gcs import BUCKET, gcs  # noqa: F401 - the emulator fixture

from distill_sbs import checkpoints, storage
from distill_sbs.errors import DEBUG_ENV, UserError

SMALL = tiny_config()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(seed: int):
    from distill_sbs.models import EncoderDecoderModel

    params = EncoderDecoderModel(SMALL).init_params(jax.random.PRNGKey(seed))
    return params, optax.adamw(1e-3).init(params)


def _abstract(tree):
    return jax.eval_shape(lambda: tree)


def _equal(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A MODEL_DIR with steps 1 and 2 saved asynchronously, and what was saved."""
    model_dir = str(tmp_path_factory.mktemp("faults") / "run")
    mgr = checkpoints.CheckpointManager(model_dir, config=SMALL, async_save=True)
    saved = {}
    for step in (1, 2):
        params, opt = _state(step)
        assert mgr.save(step, params, opt, {"batches_consumed": step}, force=True)
        saved[step] = (params, opt)
    mgr.close()
    return model_dir, saved


def _fault(path: str, kind: str) -> None:
    size = os.path.getsize(path)
    if kind == "truncated":
        os.truncate(path, size // 2)
    elif kind == "garbled":  # same size, 8 bytes flipped in the middle
        with open(path, "r+b") as f:
            f.seek(size // 2)
            piece = f.read(8)
            f.seek(size // 2)
            f.write(bytes(b ^ 0x5A for b in piece))
    elif kind == "missing":
        os.remove(path)
    elif kind == "unreadable":  # a directory where the file was: reading it is an OS error
        os.remove(path)
        os.mkdir(path)


def _step_files(step_dir: str) -> list[str]:
    """Every file of a step that a restore may read (orbax's commit bookkeeping aside)."""
    out = []
    for dirpath, _, names in os.walk(step_dir):
        for name in names:
            if name not in ("_CHECKPOINT_METADATA", "commit_success.txt"):
                out.append(os.path.relpath(os.path.join(dirpath, name), step_dir))
    return sorted(out)


_CAUSE = {"truncated": "truncated", "garbled": "corrupt", "missing": "missing"}


def test_every_file_truncated_garbled_removed(two_steps, tmp_path):
    """Each file of the newest step, truncated, garbled or removed: restoring that step is one
    CorruptCheckpoint naming the file and the cause; a resume takes step 1 (exactly what was
    saved) and warns naming step 2's file."""
    model_dir, saved = two_steps
    files = _step_files(os.path.join(model_dir, "checkpoint_2"))
    # params, opt_state and data_state each with their metadata, data and checksum record
    assert any(f.startswith("params/ocdbt.process_0/d/") for f in files)
    assert any(f.startswith("opt_state/") for f in files) and "data_state/metadata" in files
    assert checkpoints.CHECKSUMS_FILE in files
    abstract = _abstract(saved[1])
    checked = 0
    for rel in files:
        for kind in ("truncated", "garbled", "missing"):
            copy = str(tmp_path / f"c{checked}")
            shutil.copytree(model_dir, copy)
            target = os.path.join(copy, "checkpoint_2", rel)
            _fault(target, kind)
            mgr = checkpoints.CheckpointManager(copy)
            try:
                if rel == checkpoints.CHECKSUMS_FILE and kind == "missing":
                    # a step without checksums (an older save) is read, and checked as it is
                    params, opt, _ = mgr.restore(2, *abstract)
                    assert _equal((params, opt), saved[2])
                    continue
                with pytest.raises(checkpoints.CorruptCheckpoint) as e:
                    mgr.restore(2, *abstract)
                line = str(e.value)
                assert "\n" not in line
                cause = "corrupt" if rel == checkpoints.CHECKSUMS_FILE else _CAUSE[kind]
                assert line.startswith(f"{target}: {cause}"), (rel, kind, line)
            finally:
                mgr.close()
                checked += 1
    # the fallback, for one file of each item
    for rel in ("params/ocdbt.process_0/d", "opt_state/_METADATA", "data_state/metadata"):
        copy = str(tmp_path / f"r{rel.replace('/', '_')}")
        shutil.copytree(model_dir, copy)
        target = os.path.join(copy, "checkpoint_2", rel)
        if os.path.isdir(target):
            target = os.path.join(target, max(os.listdir(target), key=lambda n: n))
        _fault(target, "garbled")
        mgr = checkpoints.CheckpointManager(copy)
        with _warnings() as logged:
            step, params, opt, data = mgr.restore_newest(*abstract)
        mgr.close()
        assert step == 1 and data == {"batches_consumed": 1}
        assert _equal((params, opt), saved[1])
        assert any(target in w and "corrupt" in w for w in logged), logged
        assert any("skipped 1 newer" in w for w in logged), logged
        # moved aside, so that the resumed run can save step 2 again
        assert sorted(checkpoints.step_dirs(copy)) == [1]
        assert os.listdir(os.path.join(copy, "corrupt"))[0].startswith("checkpoint_2-")


@contextlib.contextmanager
def _warnings():
    """The absl warnings logged inside the block, as text."""
    logged: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                logged.append(record.getMessage())

    handler = Catch()
    logging.getLogger("absl").addHandler(handler)
    try:
        yield logged
    finally:
        logging.getLogger("absl").removeHandler(handler)


def test_unreadable_file_and_no_intact_step(two_steps, tmp_path):
    model_dir, saved = two_steps
    copy = str(tmp_path / "run")
    shutil.copytree(model_dir, copy)
    target = os.path.join(copy, "checkpoint_2", "params", "_METADATA")
    _fault(target, "unreadable")
    mgr = checkpoints.CheckpointManager(copy)
    with pytest.raises(checkpoints.CorruptCheckpoint, match=f"^{target}: unreadable .*directory"):
        mgr.restore(2, *_abstract(saved[1]))
    # every step unreadable: an error, never a silent fresh start
    _fault(os.path.join(copy, "checkpoint_1", "data_state", "metadata"), "truncated")
    with pytest.raises(checkpoints.CorruptCheckpoint, match="no older intact step"):
        mgr.restore_newest(*_abstract(saved[1]))
    mgr.close()


def test_unverified_step_is_not_a_config_mismatch(two_steps, tmp_path):
    """A step without checksums (saved before they existed): a failed read is still named as
    the file's fault, not as a different config; a real mismatch still says so."""
    model_dir, saved = two_steps
    abstract = _abstract(saved[1])
    cases = {
        "params/_METADATA": ("truncated", "corrupt"),
        "params/manifest.ocdbt": ("truncated", "corrupt"),
        "opt_state/d": ("truncated", "truncated"),
    }
    for rel, (kind, cause) in cases.items():
        copy = str(tmp_path / rel.replace("/", "_"))
        shutil.copytree(model_dir, copy)
        os.remove(os.path.join(copy, "checkpoint_2", checkpoints.CHECKSUMS_FILE))
        target = os.path.join(copy, "checkpoint_2", rel)
        if os.path.isdir(target):
            target = os.path.join(target, os.listdir(target)[0])
        _fault(target, kind)
        mgr = checkpoints.CheckpointManager(copy)
        with pytest.raises(checkpoints.CorruptCheckpoint) as e:
            mgr.restore(2, *abstract)
        mgr.close()
        assert f": {cause}" in str(e.value) and "different config" not in str(e.value), e.value
    mgr = checkpoints.CheckpointManager(model_dir)
    other = _abstract({"x": np.zeros((3,), np.float32)})
    with pytest.raises(UserError, match="checkpoint_1: does not match") as e:
        mgr.restore(1, other, other)
    assert not isinstance(e.value, checkpoints.CorruptCheckpoint)
    mgr.close()


def test_load_native_model_dir_falls_back_explicit_step_fails(two_steps, tmp_path):
    model_dir, saved = two_steps
    copy = str(tmp_path / "run")
    shutil.copytree(model_dir, copy)
    manifest = os.path.join(copy, "checkpoint_2", "params", "manifest.ocdbt")
    with open(manifest, "wb") as f:
        f.write(b"0123456789")
    with _warnings() as logged:
        got = checkpoints.load_native(copy)
    assert got.step == 1 and _equal(got.params, saved[1][0])
    assert any(manifest in w for w in logged)
    with pytest.raises(checkpoints.CorruptCheckpoint, match=f"^{manifest}: truncated"):
        checkpoints.load_native(os.path.join(copy, "checkpoint_2"))
    # a native checkpoint carries checksums of its params too
    native = str(tmp_path / "native")
    checkpoints.save_native(native, saved[1][0], SMALL, None)
    data = os.path.join(native, "params", "ocdbt.process_0", "d")
    data = os.path.join(data, max(os.listdir(data), key=lambda n: os.path.getsize(f"{data}/{n}")))
    _fault(data, "garbled")
    with pytest.raises(checkpoints.CorruptCheckpoint, match=f"^{data}: corrupt"):
        checkpoints.load_native(native)


def test_interrupted_save_removed_at_start(two_steps, tmp_path):
    model_dir, _ = two_steps
    copy = str(tmp_path / "run")
    shutil.copytree(model_dir, copy)
    tmp = os.path.join(copy, "checkpoint_3.orbax-checkpoint-tmp-1234")
    shutil.copytree(os.path.join(copy, "checkpoint_2"), tmp)
    with _warnings() as logged:
        checkpoints.CheckpointManager(copy).close()
    assert not os.path.exists(tmp)
    assert any(tmp in w and "removed" in w for w in logged), logged


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@contextlib.contextmanager
def tmpfs(path: str, size: str):
    """A tmpfs of `size` at `path` (root only: the test fails elsewhere rather than skip)."""
    os.makedirs(path, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", path)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


@contextlib.contextmanager
def read_only(source: str, path: str):
    """`source` seen read-only at `path` (a read-only bind mount)."""
    os.makedirs(path, exist_ok=True)
    _mount("--bind", source, path)
    try:
        _mount("-o", "remount,ro,bind", path)
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


def test_disk_full_mid_save_stops_at_once(tmp_path):
    """The second step's background save hits a full disk: the very next check raises one
    SaveFailed naming the step and the OS error (not one save later); the first step is intact
    and the interrupted temporary folder is removed by the next start."""
    params, opt = _state(0)
    with tmpfs(str(tmp_path / "disk"), "400k") as disk:
        model_dir = os.path.join(disk, "run")
        mgr = checkpoints.CheckpointManager(model_dir, config=SMALL, async_save=True)
        assert mgr.save(1, params, opt, {"batches_consumed": 1}, force=True)
        mgr.wait_until_finished()
        free = shutil.disk_usage(disk).free
        with open(os.path.join(disk, "filler"), "wb") as f:  # leave half a step's room
            f.write(b"\0" * max(0, free - 150_000))
        with pytest.raises(checkpoints.SaveFailed) as e:
            mgr.save(2, params, opt, {"batches_consumed": 2}, force=True)
            mgr.wait_until_finished()
        line = str(e.value)
        assert "\n" not in line and "No space left on device" in line, line
        assert line.startswith(os.path.join(model_dir, "checkpoint_2")), line
        with contextlib.suppress(checkpoints.SaveFailed):
            mgr.close()
        os.remove(os.path.join(disk, "filler"))
        with _warnings() as logged:
            mgr = checkpoints.CheckpointManager(model_dir)
        assert sorted(os.listdir(model_dir)) == ["checkpoint_1", "config.json"], logged
        step, got_params, got_opt, _ = mgr.restore_newest(*_abstract((params, opt)))
        mgr.close()
        assert step == 1 and _equal((got_params, got_opt), (params, opt))


def test_closed_event_loop_callbacks_are_not_printed(tmp_path):
    """After a failed background save, tensorstore's remaining writes finish on orbax's closed
    event loop and each reports "Event loop is closed" as an unraisable exception (a traceback
    on stderr, seen on CI at exit). Those are dropped; any other unraisable is still printed,
    and DISTILL_SBS_DEBUG prints them all."""
    script = (
        "import _testcapi\n"
        "import distill_sbs.checkpoints\n"
        "for msg in ('Event loop is closed', 'another failure'):\n"
        "    try:\n"
        "        raise RuntimeError(msg)\n"
        "    except RuntimeError as e:\n"
        "        _testcapi.write_unraisable_exc(e, None, None)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    quiet = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert "Event loop is closed" not in quiet.stderr, quiet.stderr
    assert "RuntimeError: another failure" in quiet.stderr, quiet.stderr
    env[DEBUG_ENV] = "1"
    loud = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert "RuntimeError: Event loop is closed" in loud.stderr, loud.stderr


def test_read_only_model_dir_is_one_line(two_steps, tmp_path):
    model_dir, _ = two_steps
    with read_only(model_dir, str(tmp_path / "ro")) as ro:
        with pytest.raises(checkpoints.SaveFailed) as e:
            checkpoints.CheckpointManager(ro, config=SMALL)
    assert str(e.value) == f"{ro}: cannot be written ([Errno 30] Read-only file system)"


# --------------------------------------------------------------------------------------------------
# The programs: one line and exit 2, resumes with the losses of an uninterrupted run, no noise

TINY = TRAIN_FLAGS
STEPS = 12
NOISE = ("Traceback", "sys.meta_path is None", "Event loop is closed", "Exception ignored")


def _train(model_dir: str, env: dict[str, str], steps: int = STEPS) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "distill_sbs.train", *TINY, f"--gin.TRAIN_STEPS={steps}"]
    cmd.append(f"--gin.MODEL_DIR='{model_dir}'")
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _env(subprocess_env: dict[str, str]) -> dict[str, str]:
    return dict(subprocess_env, TF_CPP_MIN_LOG_LEVEL="3")


def _losses(model_dir: str) -> dict[int, float]:
    rows = [json.loads(ln) for ln in open(os.path.join(model_dir, "train_metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows}


def _quiet(proc: subprocess.CompletedProcess) -> None:
    """No traceback and none of orbax's shutdown noise, on either stream."""
    for noise in NOISE:
        assert noise not in proc.stdout + proc.stderr, (noise, proc.stderr[-3000:])


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The run's `error:` line: exit 2, exactly one such line, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    _quiet(proc)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, subprocess_env):
    """One uninterrupted run of STEPS steps (checkpoints 4, 8, 12), copied by each test."""
    model_dir = str(tmp_path_factory.mktemp("finished") / "run")
    proc = _train(model_dir, _env(subprocess_env))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _quiet(proc)
    return model_dir


def _copy(finished: str, dest: str) -> str:
    shutil.copytree(finished, dest)
    return dest


def _largest(directory: str) -> str:
    return max(
        (os.path.join(d, n) for d, _, names in os.walk(directory) for n in names),
        key=os.path.getsize,
    )


def _assert_resumed_like_uninterrupted(run: str, finished: str, resumed_from: int, proc) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    _quiet(proc)
    assert f"resumed from {run}/checkpoint_{resumed_from}" in proc.stdout
    ref, got = _losses(finished), _losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert len({round(v, 6) for v in ref.values()}) > STEPS // 2  # the losses do vary
    for step in range(resumed_from + 1, STEPS + 1):
        assert abs(got[step] - ref[step]) <= 1e-6 * max(1.0, abs(ref[step])), (step, got, ref)
    assert checkpoints.verify_checksums(os.path.join(run, f"checkpoint_{STEPS}"))


def test_resume_skips_a_corrupt_newest_step(finished, tmp_path, subprocess_env):
    """The newest step's parameter data cut in half (issue 25 item 1): the run warns naming the
    file, resumes from the step before, and its losses equal the uninterrupted run's."""
    run = _copy(finished, str(tmp_path / "run"))
    data = _largest(os.path.join(run, "checkpoint_12", "params", "ocdbt.process_0", "d"))
    _fault(data, "truncated")
    os.remove(os.path.join(run, "final_metrics.json"))  # the run has not finished
    proc = _train(run, _env(subprocess_env))
    assert f"{data}: truncated" in proc.stderr, proc.stderr[-3000:]
    assert "newest intact step" in proc.stderr
    _assert_resumed_like_uninterrupted(run, finished, 8, proc)


def test_finished_run_is_not_restored(finished, tmp_path, subprocess_env):
    """Rerunning a finished run whose newest step is corrupt (item 3): nothing is restored."""
    run = _copy(finished, str(tmp_path / "run"))
    _fault(_largest(os.path.join(run, "checkpoint_12", "opt_state")), "truncated")
    proc = _train(run, _env(subprocess_env))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _quiet(proc)
    assert f"{run} has finished training (step 12)" in proc.stdout


def test_final_metrics_repaired_on_rerun(finished, tmp_path, subprocess_env):
    """Killed after the last checkpoint, before final_metrics.json (item 6): the rerun writes it
    whole, its train/* from what the run logged."""
    run = _copy(finished, str(tmp_path / "run"))
    os.remove(os.path.join(run, "final_metrics.json"))
    proc = _train(run, _env(subprocess_env))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _quiet(proc)
    with open(os.path.join(finished, "final_metrics.json")) as f:
        want = json.load(f)
    with open(os.path.join(run, "final_metrics.json")) as f:
        got = json.load(f)
    assert any(k.startswith("train/") for k in want) and got == want


def test_eval_on_a_corrupt_checkpoint_is_one_line(finished, tmp_path, subprocess_env):
    """A 10-byte manifest.ocdbt (item 7): one line naming it, exit 2, no event-loop noise."""
    run = _copy(finished, str(tmp_path / "run"))
    manifest = os.path.join(run, "checkpoint_12", "params", "manifest.ocdbt")
    with open(manifest, "wb") as f:
        f.write(b"0123456789")
    cmd = [
        sys.executable,
        "-m",
        "distill_sbs.eval",
        "--gin_file=runs/eval.gin",
        f"--gin.CHECKPOINT_PATH='{run}/checkpoint_12'",
        "--gin.MIXTURE_OR_TASK_NAME='arith_dss'",
    ]
    proc = subprocess.run(
        cmd, env=_env(subprocess_env), cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert _one_error_line(proc).startswith(f"error: {manifest}: truncated")


def test_read_only_model_dir_stops_in_one_line(finished, tmp_path, subprocess_env):
    """MODEL_DIR on a read-only file system (item 4)."""
    run = _copy(finished, str(tmp_path / "run"))
    with read_only(run, str(tmp_path / "ro")) as ro:
        proc = _train(ro, _env(subprocess_env), steps=STEPS + 4)
    line = _one_error_line(proc)
    assert line == f"error: {ro}: cannot be written ([Errno 30] Read-only file system)", line


def _allocated(path: str) -> int:
    out = subprocess.run(["du", "-s", "--block-size=1", path], capture_output=True, text=True)
    return int(out.stdout.split()[0])


def test_disk_full_mid_training_stops_at_once_and_resumes(finished, tmp_path, subprocess_env):
    """MODEL_DIR on a tmpfs with room for one step (item 5): the save of step 8 fails, the run
    stops in one line before its next save, and once there is room again the rerun removes the
    interrupted save (saying so), resumes from step 4 and matches the uninterrupted run."""
    step_size = _allocated(os.path.join(finished, "checkpoint_4"))
    rest = _allocated(finished) - 3 * step_size
    with tmpfs(str(tmp_path / "disk"), str(rest + step_size * 3 // 2)) as disk:
        run = os.path.join(disk, "run")
        proc = _train(run, _env(subprocess_env))
        line = _one_error_line(proc)
        assert line.startswith(f"error: {run}/checkpoint_8: the checkpoint cannot be written")
        assert line.endswith("No space left on device)"), line
        # Stopped no later than its next save (the final one, at STEPS), which was never begun.
        # How many steps ran in between depends on when the background write hit the full disk
        # (under load, after the last step); the very next check raising is
        # test_disk_full_mid_save_stops_at_once's, in process.
        assert max(_losses(run)) <= STEPS
        assert not [n for n in os.listdir(run) if n.startswith(f"checkpoint_{STEPS}")]
        _mount("-o", "remount,size=16m", disk)
        proc = _train(run, _env(subprocess_env))
        assert f"{run}/checkpoint_8.orbax-checkpoint-tmp" in proc.stderr, proc.stderr[-3000:]
        assert "removed (a save that was interrupted" in proc.stderr
        _assert_resumed_like_uninterrupted(run, finished, 4, proc)


# --------------------------------------------------------------------------------------------------
# gs:// on the emulator: the same verification and fallback, and uncommitted steps cleared. (A
# read-only or full disk has no GCS equivalent the emulator can play: its errors are HTTP
# answers, which orbax reports through the same SaveFailed path.)


def test_gcs_corrupt_object_falls_back_and_uncommitted_step_is_cleared(gcs):  # noqa: F811
    run = f"gs://{BUCKET}/faults-run"
    mgr = checkpoints.CheckpointManager(run, config=SMALL, async_save=True)
    saved = {}
    for step in (1, 2):
        params, opt = _state(step)
        assert mgr.save(step, params, opt, {"batches_consumed": step}, force=True)
        saved[step] = (params, opt)
    mgr.close()
    assert checkpoints.verify_checksums(f"{run}/checkpoint_2")  # written before the commit
    data = f"{run}/checkpoint_2/params/ocdbt.process_0/d"
    name = max(storage.listdir(data), key=lambda n: storage.Path(f"{data}/{n}").stat().length)
    target = f"{data}/{name}"
    blob = bytearray(storage.read_bytes(target))
    blob[len(blob) // 2] ^= 0x5A
    storage.write_bytes(target, bytes(blob))

    mgr = checkpoints.CheckpointManager(run)
    abstract = _abstract(saved[1])
    with pytest.raises(checkpoints.CorruptCheckpoint, match=f"^{target}: corrupt"):
        mgr.restore(2, *abstract)
    with _warnings() as logged:
        step, params, opt, data_state = mgr.restore_newest(*abstract)
    mgr.close()
    assert step == 1 and data_state == {"batches_consumed": 1}
    assert _equal((params, opt), saved[1])
    assert any(target in w for w in logged), logged
    assert sorted(checkpoints.step_dirs(run)) == [1]

    # a step orbax never committed (no commit_success.txt) is cleared at the next start
    mgr = checkpoints.CheckpointManager(run, async_save=False)
    mgr.save(3, *saved[2], {"batches_consumed": 3}, force=True)
    mgr.close()
    storage.Path(f"{run}/checkpoint_3/commit_success.txt").unlink()
    with _warnings() as logged:
        checkpoints.CheckpointManager(run).close()
    assert any(f"{run}/checkpoint_3: removed" in w for w in logged), logged
    assert not storage.exists(f"{run}/checkpoint_3/params")
