"""The server under malformed, hostile and concurrent requests (issue 11), in-process over the
fake generator on 127.0.0.1: every request gets an HTTP answer with an OpenAI-shaped JSON error,
and the server stays up."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import socket
import threading
import time

import pytest
import requests
from fakes import FakeGenerator

from distill_sbs.serve import Limits, Server, check_auth_settings

KEY = "sk-robust-test-key"


@pytest.fixture
def server():
    limits = Limits(
        max_body_bytes=4096, max_sequences_per_request=8, max_queued_sequences=32,
        header_timeout_s=0.5, body_timeout_s=0.5,
    )  # fmt: skip
    with Server(FakeGenerator(max_batch_size=4), model_name="tiny", limits=limits) as s:
        yield s


def _raw(server, data: bytes, timeout: float = 5) -> tuple[int, dict, bytes]:
    """Sends raw bytes; (status, headers, body) of the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(data)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, dict(resp.getheaders()), resp.read()


def _alive(server) -> None:
    assert requests.get(f"http://127.0.0.1:{server.port}/health", timeout=5).status_code == 200


def _post_raw(body: bytes, path: str = "/v1/completions", extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}"
    if "Content-Length" not in extra:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


@pytest.mark.parametrize(
    "data, status, needle",
    [
        (_post_raw(b"{not json"), 400, "not valid JSON"),
        (_post_raw(b'{"prompt": "\\ud800"}'), 400, "lone surrogate"),
        (_post_raw(b"\xff\xfe"), 400, "not valid JSON"),
        (_post_raw(b"[" * 100000), 413, "bytes"),
        (_post_raw(b'{"prompt": "x"}', extra="Content-Length: abc\r\n"), 400, ""),
        (_post_raw(b'{"prompt": ["a", "b", "c"], "n": 3}'), 400, "max_sequences_per_request"),
        (_post_raw(b'{"prompt": "x", "seed": 1e400}'), 400, "'seed'"),
        (_post_raw(b'{"prompt": "x", "model": "gpt-4"}'), 404, "does not exist"),
        (_post_raw(b'{"prompt": "x", "logprobs": 2, "echo": true}'), 400, "echo"),
        (b"PUT /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405, "PUT"),
        (b"DELETE /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 405, "DELETE"),
        (b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 404, "no route"),
        (b"GET /debug/requests HTTP/1.1\r\nHost: x\r\n\r\n", 404, "no route"),
        (b"BREW / HTCPCP/1.0\r\n\r\n", 400, ""),
    ],
)
def test_every_malformed_request_gets_a_json_error(server, data, status, needle):
    got, headers, body = _raw(server, data)
    assert got == status, body
    assert headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"
    _alive(server)


def test_huge_seed_and_keep_alive(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    for seed in (2**63, -(2**63), 2**64 - 1):
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "x", "seed": seed}))
        r = conn.getresponse()
        assert r.status == 200 and r.version == 11, r.read()
        r.read()  # the same connection serves the next request (HTTP/1.1 keep-alive)
    conn.close()


def test_slow_loris_connections_are_closed(server):
    silent = socket.create_connection(("127.0.0.1", server.port))
    dripping = socket.create_connection(("127.0.0.1", server.port))
    t0 = time.monotonic()
    dripping.sendall(b"POST /v1/completions HTTP/1.1\r\n")
    for sock in (silent, dripping):
        sock.settimeout(5)
        assert sock.recv(100) == b""  # closed by the server, headers never complete
    assert time.monotonic() - t0 < 3
    # A body that stops arriving: 408 once body_timeout_s has passed.
    status, _, body = _raw(server, _post_raw(b'{"prompt"', extra="Content-Length: 50\r\n"))
    assert status == 408, body
    _alive(server)


def test_queue_full_is_429_with_retry_after():
    gen = FakeGenerator(max_batch_size=1, delay=0.3)
    with Server(gen, limits=Limits(max_queued_sequences=2)) as s:
        url = s.base_url + "/completions"
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            rs = list(pool.map(lambda i: requests.post(url, json={"prompt": "q"}, timeout=10),
                               range(4)))  # fmt: skip
    codes = sorted(r.status_code for r in rs)
    assert codes.count(429) >= 1 and codes.count(200) >= 2, codes
    busy = next(r for r in rs if r.status_code == 429)
    assert busy.headers["Retry-After"] == "1"
    assert busy.json()["error"]["code"] == "rate_limit_exceeded"


def test_small_request_does_not_wait_behind_a_huge_one():
    gen = FakeGenerator(max_batch_size=4, delay=0.1)  # 0.1 s per batch of 4 rows
    limits = Limits(max_sequences_per_request=64)
    with Server(gen, limits=limits, batch_window_ms=1) as s:
        url = s.base_url + "/completions"
        huge = threading.Thread(
            target=requests.post,
            args=(url,),
            kwargs={"json": {"prompt": ["h"] * 16, "n": 4}, "timeout": 30},
        )
        huge.start()  # 64 rows: 16 batches, 1.6 s alone
        time.sleep(0.15)
        t0 = time.monotonic()
        r = requests.post(url, json={"prompt": "small"}, timeout=30)
        small = time.monotonic() - t0
        huge.join()
    assert r.status_code == 200
    assert small < 0.5, f"the small request waited {small:.2f}s behind the huge one"


def test_client_that_goes_away_stops_its_generation():
    gen = FakeGenerator(max_batch_size=1, stream_delay=0.05)
    gen.respond = lambda p, params, seed: "word " * 200
    with Server(gen, limits=Limits(max_tokens_limit=200)) as s:
        body = json.dumps({"prompt": "x", "max_tokens": 200}).encode()
        for stream in (False, True):
            gen.tokens_made = 0
            payload = json.loads(body) | {"stream": stream}
            with socket.create_connection(("127.0.0.1", s.port)) as sock:
                sock.sendall(_post_raw(json.dumps(payload).encode()))
                time.sleep(0.5)  # about 10 tokens
            time.sleep(0.5)
            made = gen.tokens_made
            time.sleep(0.5)
            assert gen.tokens_made == made < 60, (stream, made)  # stopped, far short of 200
        _alive(s)


def test_auth_errors_metrics_and_debug():
    with Server(FakeGenerator(), api_key=KEY, debug_endpoints=True) as s:
        root = f"http://127.0.0.1:{s.port}"
        for path in ("/v1/models", "/metrics", "/debug/state"):
            r = requests.get(root + path, headers={"Authorization": "Bearer wrong"}, timeout=5)
            assert r.status_code == 401
            assert r.json()["error"]["type"] == "authentication_error"
            assert r.json()["error"]["code"] == "invalid_api_key"
        assert requests.get(root + "/health", timeout=5).status_code == 200
        auth = {"Authorization": f"Bearer {KEY}"}
        r = requests.post(root + "/v1/completions", json={"prompt": "q", "seed": 7}, headers=auth)
        assert r.status_code == 200
        metrics = requests.get(root + "/metrics", headers=auth, timeout=5).text
        assert 'distill_sbs_requests_total{path="/v1/completions",status="200"} 1.0' in metrics
        assert "distill_sbs_queued_sequences 0.0" in metrics
        state = requests.get(root + "/debug/state", headers=auth, timeout=5).json()
        assert state["count"] == 1 and set(state) == {
            "count", "in_flight", "max_in_flight", "queued_sequences", "batches", "rows",
        }  # counters only: no prompts, hashes or seeds  # fmt: skip


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.2", "example.org"])
def test_no_key_on_a_reachable_address_is_refused(host):
    with pytest.raises(ValueError, match="refusing to listen"):
        check_auth_settings(host, None, False)
    check_auth_settings(host, KEY, False)
    check_auth_settings(host, None, True)
    check_auth_settings("127.0.0.1", None, False)
    check_auth_settings("::1", None, False)


def test_a_generation_failure_is_a_500_without_its_traceback(caplog):
    """Issue 21: the body said "generation failed: JaxRuntimeError: ... Traceback ... File
    ".../distill_sbs/generation.py" ..."; now a stable message and a request id, whose log line
    holds the details."""
    secret = 'Traceback (most recent call last):\n  File "/srv/secret/generation.py", line 9'

    def respond(prompt, params, seed):
        raise RuntimeError(secret)

    with Server(FakeGenerator(respond)) as s:
        url = s.base_url + "/completions"
        for stream in (False, True):
            r = requests.post(url, json={"prompt": "q", "stream": stream}, timeout=10)
            if stream:  # the stream had started: the error comes in-band, then the body ends
                assert r.status_code == 200
                line = next(ln for ln in r.text.splitlines() if "error" in ln)
                error = json.loads(line.removeprefix("data: "))["error"]
            else:
                assert r.status_code == 500
                error = r.json()["error"]
                assert r.headers["x-request-id"] in error["message"]
            assert error["type"] == "server_error" and error["code"] == "internal_error"
            assert error["message"].startswith("generation failed (request id req_")
            for leak in ("Traceback", "/srv/secret", "RuntimeError", "line 9", ".py"):
                assert leak not in r.text, (stream, leak)
            rid = error["message"].split("request id ")[1].split(":")[0]
            logged = [rec for rec in caplog.records if rid in rec.getMessage()]
            assert logged and secret in str(logged[0].exc_info[1])  # the details, server-side
        _alive(s)
