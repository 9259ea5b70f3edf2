"""OpenAI-compatible HTTP backend against distill_sbs.serve (fake generator) on 127.0.0.1."""

from __future__ import annotations

import logging
import time

import pytest
from fakes import FakeGenerator, fault_server

from distill_sbs.generation import GenerationParams
from distill_sbs.serve import Server
from distill_sbs.teachers.backends import (
    HTTPConfig,
    OpenAIBackend,
    RateLimiter,
    RequestFailed,
    TeacherRequest,
    parse_retry_after,
)

PARAMS = GenerationParams(max_tokens=32, temperature=0.0)


def _reqs(n):
    return [TeacherRequest(f"k{i}", f"Q: q{i}\nA:", PARAMS, seed=i) for i in range(n)]


def _run(backend, reqs):
    results = {}
    backend.run(reqs, lambda r, res: results.__setitem__(r.key, res))
    return results


def _stats(server):
    import requests

    return requests.get(f"http://127.0.0.1:{server.port}/debug/requests", timeout=5).json()


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_faults_are_retried_and_every_request_completes(api):
    plan = "429:retry_after=0.2@1,500@2,malformed@3,slow=1.5@4,503@5,drop@6"
    with fault_server(FakeGenerator(), plan, model_name="tiny") as s:
        cfg = HTTPConfig(
            s.base_url, "tiny", api=api, max_concurrency=3, timeout=0.5, backoff_base=0.05
        )
        backend = OpenAIBackend(cfg)
        results = _run(backend, _reqs(10))
        time.sleep(1.2)  # the slow request's late answer
        stats = _stats(s)
    assert sorted(results) == [f"k{i}" for i in range(10)]
    for i in range(10):
        assert results[f"k{i}"].text == "Reading 'A:'. So the answer is 42.", i
    st = backend.stats
    assert st.retries == 6 and st.failures == 0
    assert st.attempts == 16 == stats["count"]
    assert dict(st.errors) == {
        "429": 1,
        "500": 1,
        "503": 1,
        "malformed": 1,
        "timeout": 1,
        "connection": 1,
    }
    # Usage totals are summed from each answer's `usage`.
    assert st.completion_tokens == 10 * 7
    assert st.prompt_tokens == 10 * 3  # "Q:", "q<i>", "A:"


def test_retry_after_is_honoured_and_backoff_grows():
    sleeps = []
    with fault_server(FakeGenerator(), "429:retry_after=7@1,500@2-4", model_name="tiny") as s:
        cfg = HTTPConfig(s.base_url, "tiny", max_concurrency=1, backoff_base=1.0, max_retries=5)
        backend = OpenAIBackend(cfg, sleep=sleeps.append)
        results = _run(backend, _reqs(1))
    assert results["k0"].attempts == 5
    assert sleeps[0] == 7.0  # Retry-After, not the backoff
    # Attempts 2-4 failed: exponential backoff base·2^(attempt-1) with jitter in [0.5, 1].
    for delay, base in zip(sleeps[1:], [2, 4, 8], strict=True):
        assert 0.5 * base <= delay <= base


def test_gives_up_after_max_retries_and_on_client_errors():
    with fault_server(FakeGenerator(), "500@1-3", model_name="tiny") as s:
        backend = OpenAIBackend(
            HTTPConfig(s.base_url, "tiny", max_retries=2, max_concurrency=1), sleep=lambda _: None
        )
        res = _run(backend, _reqs(2))
        failed = [r for r in res.values() if isinstance(r, RequestFailed)]
        assert len(failed) == 1 and failed[0].attempts == 3
        assert "HTTP 500" in str(failed[0])
        # 404 is not retried.
        bad = OpenAIBackend(HTTPConfig(s.base_url + "/nope", "tiny"), sleep=lambda _: None)
        res = _run(bad, _reqs(1))
        assert isinstance(res["k0"], RequestFailed) and res["k0"].attempts == 1
        assert bad.stats.failures == 1 and bad.stats.retries == 0


def test_concurrency_limit_holds():
    gen = FakeGenerator(delay=0.05, max_batch_size=1)
    with fault_server(gen, None, batch_window_ms=0, model_name="tiny") as s:
        backend = OpenAIBackend(HTTPConfig(s.base_url, "tiny", max_concurrency=2))
        _run(backend, _reqs(8))
        assert _stats(s)["max_in_flight"] == 2


def test_requests_per_minute_limit():
    """5 requests at 600/min from 4 threads under a clock frozen at t=100: each takes the next
    slot 0.1 s after the last, so the backend asks to wait 0.1, 0.2, 0.3 and 0.4 s."""
    sleeps: list[float] = []
    with Server(FakeGenerator(), model_name="tiny") as s:
        cfg = HTTPConfig(s.base_url, "tiny", max_concurrency=4, requests_per_minute=600)
        backend = OpenAIBackend(cfg, sleep=sleeps.append, clock=lambda: 100.0)
        results = _run(backend, _reqs(5))
    assert len(results) == 5 and backend.stats.attempts == 5 and backend.stats.retries == 0
    assert sorted(sleeps) == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_rate_limiter_spaces_calls_and_never_bursts():
    now, waits = [0.0], []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(120, clock=lambda: now[0], sleep=sleep)  # 0.5 s apart
    for _ in range(3):
        limiter.acquire()
    assert waits == pytest.approx([0.5, 0.5]) and now[0] == pytest.approx(1.0)
    now[0] += 10.0  # idle: the next call goes at once...
    limiter.acquire()
    assert len(waits) == 2
    limiter.acquire()  # ...but the idle time is not saved up for a burst
    assert waits[2:] == pytest.approx([0.5])


def test_rate_limiter_off_never_waits():
    def never(*_: float) -> float:
        raise AssertionError("a limiter without requests_per_minute read the clock or slept")

    limiter = RateLimiter(None, clock=never, sleep=never)
    for _ in range(1000):
        limiter.acquire()


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


def test_api_key_from_env_is_sent_and_never_leaks(monkeypatch, caplog):
    secret = "sk-unit-7f3a9c1e5b"
    monkeypatch.setenv("TEACHER_KEY", secret)
    caplog.set_level(logging.DEBUG)
    with fault_server(FakeGenerator(), "500@1", api_key=secret, model_name="tiny") as s:
        backend = OpenAIBackend(
            HTTPConfig(s.base_url, "tiny", api_key_env="TEACHER_KEY"), sleep=lambda _: None
        )
        res = _run(backend, _reqs(2))
        assert all(not isinstance(r, RequestFailed) for r in res.values())
        monkeypatch.setenv("TEACHER_KEY", "sk-wrong")
        wrong = OpenAIBackend(HTTPConfig(s.base_url, "tiny", api_key_env="TEACHER_KEY"))
        res = _run(wrong, _reqs(1))
        assert isinstance(res["k0"], RequestFailed) and "401" in str(res["k0"])
    assert secret not in repr(backend) and secret not in caplog.text
    assert "sk-wrong" not in str(res["k0"])
    monkeypatch.delenv("TEACHER_KEY")
    with pytest.raises(ValueError, match="TEACHER_KEY") as e:
        OpenAIBackend(HTTPConfig("http://127.0.0.1:1/v1", "m", api_key_env="TEACHER_KEY"))
    assert "is not set" in str(e.value)


def test_retry_after_and_total_backoff_are_capped():
    sleeps = []
    with fault_server(FakeGenerator(), "429:retry_after=86400@1-9", model_name="tiny") as s:
        cfg = HTTPConfig(s.base_url, "tiny", max_retries=8, retry_after_max=30,
                         max_total_backoff=100)  # fmt: skip
        res = _run(OpenAIBackend(cfg, sleep=sleeps.append), _reqs(1))
    assert sleeps == [30, 30, 30]  # a day's Retry-After waits 30 s; a 4th wait would pass 100 s
    assert isinstance(res["k0"], RequestFailed) and "max_total_backoff" in str(res["k0"])


def test_timeout_bounds_the_whole_answer_not_each_read():
    """A server that answers at once but drips its body a byte per 0.1 s (each read well within
    the 1 s timeout): with a clock that moves 0.3 s per reading, the attempt's deadline passes
    at the 4th piece of body, and the client gives up before the server has sent it all."""
    import itertools
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    sent_all = threading.Event()

    def drip() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        body = b'{"choices": [{"text": "' + b"x" * 50 + b'"}]}'
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        for i in range(len(body)):
            try:
                conn.sendall(body[i : i + 1])
            except OSError:
                break
            time.sleep(0.1)
        else:
            sent_all.set()
        conn.close()

    threading.Thread(target=drip, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    ticks = itertools.count(0.0, 0.3)
    backend = OpenAIBackend(
        HTTPConfig(url, "m", timeout=1.0, max_retries=0), clock=lambda: next(ticks)
    )
    res = _run(backend, _reqs(1))
    assert not sent_all.is_set()
    assert next(ticks) == pytest.approx(1.5)  # read at 0 (deadline 1.0), 0.3, 0.6, 0.9, 1.2
    assert isinstance(res["k0"], RequestFailed) and "no full answer within 1.0s" in str(res["k0"])
    listener.close()


def test_a_key_echoed_in_a_completion_is_redacted(monkeypatch):
    secret = "sk-echo-1a2b3c4d5e"
    monkeypatch.setenv("TEACHER_KEY", secret)
    gen = FakeGenerator(respond=lambda p, params, seed: f"your key is {secret} ok")
    with Server(gen, api_key=secret, model_name="tiny") as s:
        backend = OpenAIBackend(HTTPConfig(s.base_url, "tiny", api_key_env="TEACHER_KEY"))
        res = _run(backend, _reqs(1))
    assert res["k0"].text == "your key is *** ok"
