"""End to end on 127.0.0.1: `python -m distill_sbs.annotate` against `distill_sbs.serve` (with the
fault injection of tests/fault_server.py) running a tiny random T5 (subprocesses): injected
faults, a SIGKILL and restart, and the API key never written anywhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "sk-e2e-0c9d8e7f6a5b4c3d"
KEY_ENV = "DSS_TEST_TEACHER_KEY"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env[KEY_ENV] = SECRET
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import jax
    import seqio
    from _tiny_t5 import tiny_config

    from distill_sbs.checkpoints import save_native
    from distill_sbs.data.vocab import ARITH_SPM
    from distill_sbs.models import EncoderDecoderModel

    cfg = tiny_config()
    model = EncoderDecoderModel(cfg, seqio.SentencePieceVocabulary(ARITH_SPM, extra_ids=0))
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    save_native(path, model.init_params(jax.random.PRNGKey(0)), cfg, ARITH_SPM, extra_ids=0)
    return path


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("server")
    log = open(logdir / "server.log", "w")
    # One shape only (batch 1, inputs truncated to 256 tokens, 16 new tokens): a single compile,
    # done by the warm-up request, so that no test request waits on the compiler.
    # distill_sbs.serve with fault injection (POST /debug/faults): tests/fault_server.py.
    cmd = [
        sys.executable, os.path.join(REPO, "tests", "fault_server.py"), "--checkpoint", checkpoint,
        "--port", "0", "--host", "127.0.0.1", "--max_batch_size", "1", "--max_input_length", "256",
        "--max_tokens_limit", "16", "--api_key_env", KEY_ENV,
        "--request_log", str(logdir / "requests.jsonl"),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=log, text=True
    )
    first_line: list[str] = []
    reader = threading.Thread(target=lambda: first_line.append(proc.stdout.readline()))
    reader.start()
    reader.join(timeout=180)
    try:
        if not first_line or "serving" not in first_line[0]:
            raise RuntimeError(
                f"server did not start: {open(logdir / 'server.log').read()[-2000:]}"
            )
        base_url = first_line[0].split(" on ")[1].strip()
        headers = {"Authorization": f"Bearer {SECRET}"}
        warm = requests.post(
            base_url + "/completions",
            json={"prompt": "warm up " * 40, "max_tokens": 16, "temperature": 0},
            headers=headers,
            timeout=120,
        )
        assert warm.status_code == 200, warm.text
        yield {"base_url": base_url, "logdir": logdir, "headers": headers}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _debug(server) -> dict:
    root = server["base_url"].rsplit("/v1", 1)[0]
    return requests.get(root + "/debug/requests", timeout=10).json()


def _set_faults(server, plan: str) -> None:
    root = server["base_url"].rsplit("/v1", 1)[0]
    r = requests.post(root + "/debug/faults", json={"plan": plan}, timeout=10)
    assert r.status_code == 200, r.text


def _write_records(path, n: int) -> list[str]:
    from distill_sbs.data.arith import generate
    from distill_sbs.data.records import write_jsonl

    records = generate("train", n=n)
    write_jsonl(path, records)
    return [r.id for r in records]


def _annotate_cmd(server, inp, out, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "distill_sbs.annotate", "--input", str(inp), "--output", str(out),
        "--teacher", "tiny", "--base_url", server["base_url"], "--model", "tiny",
        "--api_key_env", KEY_ENV, "--exemplars", "arith", "--max_tokens", "16",
        "--metric", "numeric", "--max_concurrency", "1", "--backoff_base", "0.1", *extra,
    ]  # fmt: skip


def _run(cmd, tmp_path, name: str, timeout: float = 240) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    (tmp_path / f"{name}.stdout").write_text(p.stdout)
    (tmp_path / f"{name}.stderr").write_text(p.stderr)
    return p


def _completed_at_server(entries, after: int) -> list[tuple[str, int]]:
    """(prompt hash, seed) of the requests numbered > `after` that the server answered normally
    (numbers count arrivals; the log is in order of completion)."""
    return [
        (e["prompt_sha256"][0], e["seed"])
        for e in entries
        if e["n"] > after and e["status"] == 200 and not e["fault"]
    ]


def _assert_no_secret(*dirs) -> int:
    scanned = 0
    for d in dirs:
        for root, _, files in os.walk(d):
            for f in files:
                with open(os.path.join(root, f), "rb") as fh:
                    assert SECRET.encode() not in fh.read(), os.path.join(root, f)
                scanned += 1
    return scanned


def test_faults_every_example_annotated_or_failed_once(server, tmp_path):
    ids = _write_records(tmp_path / "in.jsonl", 6)
    out = tmp_path / "out.jsonl"
    start = _debug(server)["count"]
    # The first example's request meets all four faults and, with 3 retries, fails for good.
    # A timeout with room for a loaded machine to answer normal requests in time.
    _set_faults(server, "429:retry_after=1@1,500@2,slow=7@3,malformed@4")
    cmd = _annotate_cmd(server, tmp_path / "in.jsonl", out, "--timeout", "4", "--max_retries", "3")
    p = _run(cmd, tmp_path, "run1")
    assert p.returncode == 2, p.stderr[-3000:]
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())["summary"]
    t = summary["teachers"]["tiny"]
    assert t["requests"] == 6 == t["cached"] + t["completed"] + t["failed"]
    assert (t["cached"], t["completed"], t["failed"]) == (0, 5, 1)
    assert t["errors"] == {"429": 1, "500": 1, "timeout": 1, "malformed": 1}
    assert t["retries"] == 3 and t["attempts"] == 9
    assert t["samples"] == 5 and 0 <= t["parsed"] <= 5
    assert t["completion_tokens"] > 0 and t["prompt_tokens"] > 0
    annotated = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    failed = [
        json.loads(x)["id"] for x in (tmp_path / "out.jsonl.failed.jsonl").read_text().splitlines()
    ]
    assert failed == [ids[0]] and annotated == ids[1:]
    assert "requests 6 = 0 cached + 5 completed + 1 failed" in p.stdout
    # The server saw every attempt.
    stats = _debug(server)
    assert stats["count"] - start == 9

    # A rerun retries only the failed request; then every example is annotated, none twice.
    p = _run(_annotate_cmd(server, tmp_path / "in.jsonl", out), tmp_path, "run2")
    assert p.returncode == 0, p.stderr[-3000:]
    t = json.loads((tmp_path / "out.jsonl.summary.json").read_text())["summary"]["teachers"]["tiny"]
    assert (t["requests"], t["cached"], t["completed"], t["failed"]) == (6, 5, 1, 0)
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ids
    assert all(
        len(r["teachers"]["tiny"]) == 1 and set(r["teachers"]) >= {"alpha", "tiny"} for r in records
    )
    assert (tmp_path / "out.jsonl.failed.jsonl").read_text() == ""
    done = _completed_at_server(_debug(server)["requests"], after=start)
    assert len(done) == len(set(done)) == 6

    # The key was sent (the server demands it) but is written nowhere.
    config = json.loads((tmp_path / "out.jsonl.summary.json").read_text())["config"]
    assert config["teachers"][0]["api_key_env"] == KEY_ENV
    assert _assert_no_secret(tmp_path, server["logdir"]) >= 8


def test_sigkill_then_restart_repeats_no_finished_request(server, tmp_path):
    n = 12
    ids = _write_records(tmp_path / "in.jsonl", n)
    out = tmp_path / "out.jsonl"
    cache = tmp_path / "out.jsonl.cache.jsonl"
    _set_faults(server, "")
    start = _debug(server)["count"]
    # Rate-limited so that the kill lands mid-run.
    cmd = _annotate_cmd(server, tmp_path / "in.jsonl", out, "--requests_per_minute", "300")
    stderr = open(tmp_path / "killed.stderr", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if cache.exists() and len(cache.read_bytes().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the annotator ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    stderr.close()
    from distill_sbs.teachers.cache import RequestCache

    with RequestCache(str(cache)) as c:
        finished = {int(k[:8], 16) for k in c._entries}  # the seeds of finished requests
    assert 3 <= len(finished) < n
    mid = _debug(server)["count"]

    p = _run(_annotate_cmd(server, tmp_path / "in.jsonl", out), tmp_path, "restart")
    assert p.returncode == 0, p.stderr[-3000:]
    t = json.loads((tmp_path / "out.jsonl.summary.json").read_text())["summary"]["teachers"]["tiny"]
    assert t["cached"] == len(finished) and t["completed"] == n - len(finished)
    after = _debug(server)["requests"]
    resent = {e["seed"] for e in after if e["n"] > mid}
    assert not resent & finished, "a finished request was sent again"
    done = _completed_at_server(after, after=start)
    # At most the one request in flight at the kill (max_concurrency 1) reached the server twice.
    assert len(done) - len(set(done)) <= 1 and len(set(done)) == n
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ids
    _assert_no_secret(tmp_path)


def test_local_teacher_backend(checkpoint, tmp_path):
    from distill_sbs.data.arith import generate
    from distill_sbs.teachers import RequestCache, TeacherConfig, annotate, make_backend

    records = generate("train", n=3)
    cfg = TeacherConfig("local", backend="local", checkpoint=checkpoint, max_tokens=8, batch_size=4)
    with RequestCache(str(tmp_path / "c.jsonl")) as cache:
        result = annotate(
            records, [(cfg, make_backend(cfg))], cache, dataset="arith", metric="numeric"
        )
    t = result.teachers["local"]
    assert (t.requests, t.completed, t.failed, t.samples) == (3, 3, 0, 3)
    assert 0 < t.completion_tokens <= 3 * 8
    assert all(len(r.teachers["local"]) == 1 for r in result.records)
