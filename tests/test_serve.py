"""The OpenAI-compatible server (distill_sbs.serve) over a fake generator, on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures
import json
import time

import pytest
import requests
from fakes import FakeGenerator, FaultPlan, fault_server

from distill_sbs.serve import Server


@pytest.fixture
def server():
    gen = FakeGenerator(max_batch_size=8, delay=0.05)
    with Server(gen, model_name="tiny", batch_window_ms=30) as s:
        yield s


def _post(server, path, body, timeout=10):
    return requests.post(server.base_url + path, json=body, timeout=timeout)


def test_models(server):
    r = requests.get(server.base_url + "/models", timeout=5)
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["tiny"]


def test_completions_n_stop_and_usage(server):
    r = _post(
        server,
        "/completions",
        {"prompt": "Q: one\nA:", "max_tokens": 50, "n": 3, "stop": ["So the"], "temperature": 0},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for c in body["choices"]:
        assert c["text"] == "Reading 'A:'. "  # cut at the stop string, as OpenAI does
        assert c["finish_reason"] == "stop"
    # 3 samples of one 3-word prompt: prompt tokens counted once, completion tokens per sample,
    # and only those returned: the 2 words before the stop string, not the 7 generated (issue 11).
    assert body["usage"]["prompt_tokens"] == 3
    assert body["usage"]["completion_tokens"] == 3 * 2
    assert body["usage"]["total_tokens"] == 3 + 6


def test_max_tokens_gives_length_finish(server):
    r = _post(server, "/completions", {"prompt": "x", "max_tokens": 2})
    c = r.json()["choices"][0]
    assert c["text"] == "Reading 'x'. " and c["finish_reason"] == "length"


def test_chat_joins_message_contents(server):
    seen = []
    server.engine.generator.respond = lambda p, params, seed: seen.append(p) or "ok"
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "[label] 2+2?"}]},
    ]
    r = _post(server, "/chat/completions", {"messages": msgs, "max_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "ok"}
    assert seen == ["Be brief.\n\n[label] 2+2?"]


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"prompt": 3}, "'prompt'"),
        ({"prompt": "x", "temperature": 9}, "'temperature'"),
        ({"prompt": "x", "stop": [1]}, "'stop'"),
        ({"messages": []}, "'messages'"),
        # issue 21: fields this server cannot honour were ignored; each is now named
        ({"prompt": "x", "logit_bias": {"50256": -100}}, "'logit_bias'"),
        ({"prompt": "x", "best_of": 3}, "'best_of'"),
        ({"prompt": "x", "suffix": " end"}, "'suffix'"),
        ({"prompt": "x", "presence_penalty": 1.5}, "'presence_penalty'"),
        (
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            "'tools'",
        ),  # fmt: skip
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_object"},
            },
            "'response_format'",
        ),  # fmt: skip
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is this?"},
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/png;base64,AA=="},
                            },
                        ],
                    }
                ]
            },
            "messages[0].content[1] is of type 'image_url'",
        ),  # fmt: skip
    ],
)
def test_bad_requests_are_400_with_a_reason(server, body, needle):
    path = "/chat/completions" if "messages" in body else "/completions"
    r = _post(server, path, body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert needle in error["message"]
    if "'" in needle and "[" not in needle:
        assert error["param"] == needle.strip("'")


def test_neutral_values_of_unsupported_fields_are_accepted_and_top_p_0_is_kept():
    seen = []

    def respond(prompt, params, seed):
        seen.append(params.top_p)
        return "ok"

    with Server(FakeGenerator(respond)) as s:
        body = {"prompt": "x", "logit_bias": {}, "best_of": 2, "n": 2, "suffix": None,
                "response_format": {"type": "text"}, "top_p": 0}  # fmt: skip
        r = requests.post(s.base_url + "/completions", json=body, timeout=10)
        assert r.status_code == 200, r.text
    assert seen == [0.0, 0.0]  # was sampled as top_p 1: the nucleus of 0 is the best token


def test_concurrent_requests_are_batched(server):
    def one(i):
        return _post(server, "/completions", {"prompt": f"q{i}", "max_tokens": 8}).json()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    # Every request got its own answer back, not a neighbour's.
    assert [r["choices"][0]["text"] for r in results] == [
        f"Reading 'q{i}'. So the answer is 42." for i in range(8)
    ]
    calls = server.engine.generator.calls
    assert sum(calls) == 8
    assert len(calls) < 8, f"no batching happened: {calls}"


def test_fault_injection_and_request_count():
    plan = "429:retry_after=2@1,500@2,malformed@3,slow=0.3@4,drop@5"
    with fault_server(FakeGenerator(), plan) as s:
        url = s.base_url + "/completions"
        r = requests.post(url, json={"prompt": "a"}, timeout=5)
        assert r.status_code == 429 and r.headers["Retry-After"] == "2"
        assert requests.post(url, json={"prompt": "a"}, timeout=5).status_code == 500
        r = requests.post(url, json={"prompt": "a"}, timeout=5)
        assert r.status_code == 200
        with pytest.raises(json.JSONDecodeError):
            json.loads(r.text)
        with pytest.raises(requests.Timeout):
            requests.post(url, json={"prompt": "a"}, timeout=0.1)
        with pytest.raises((requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
            requests.post(url, json={"prompt": "a"}, timeout=5)
        assert requests.post(url, json={"prompt": "a"}, timeout=5).status_code == 200
        time.sleep(0.5)  # let the slow request finish its (unread) answer
        stats = requests.get(f"http://127.0.0.1:{s.port}/debug/requests", timeout=5).json()
    assert stats["count"] == 6
    assert [e["fault"] for e in stats["requests"][:3]] == ["429", "500", "malformed"]
    assert stats["by_status"]["200"] == 3  # malformed, slow (answered late) and the last one


def test_api_key_required_when_configured():
    with Server(FakeGenerator(), api_key="sk-test-secret") as s:
        url = s.base_url + "/completions"
        assert requests.post(url, json={"prompt": "a"}, timeout=5).status_code == 401
        ok = requests.post(
            url, json={"prompt": "a"}, headers={"Authorization": "Bearer sk-test-secret"}, timeout=5
        )
        assert ok.status_code == 200


@pytest.mark.parametrize(
    "spec, error",
    [
        ("429@x", "bad request number"),
        ("slow@3", "slow needs seconds"),
        ("418@1", "unknown fault kind"),
        ("500@1,429@1", "two faults"),
        ("500:retry_after=1@1", "unknown option"),
    ],
)
def test_fault_plan_errors(spec, error):
    with pytest.raises(ValueError, match=error):
        FaultPlan.parse(spec)


def test_fault_plan_ranges():
    plan = FaultPlan.parse("503:retry_after=1.5@2-3, slow=3@7")
    assert plan.for_request(1) is None
    assert plan.for_request(3).kind == "503" and plan.for_request(3).seconds == 1.5
    assert plan.for_request(7).seconds == 3.0


def test_unseeded_samples_vary_and_a_seed_reproduces_under_load():
    """Issue 21: every unseeded request sampled with seed 0 (the same text each time); and a
    seeded request shared its batch's seed with whatever it was batched with."""
    gen = FakeGenerator(lambda p, params, seed: f"seed {seed}", max_batch_size=8, delay=0.05)
    with Server(gen, batch_window_ms=30) as s:
        url = s.base_url + "/completions"

        def text(body):
            return requests.post(url, json=body, timeout=10).json()["choices"][0]["text"]

        unseeded = {text({"prompt": "q", "temperature": 1.0}) for _ in range(3)}
        assert len(unseeded) == 3, unseeded
        bodies = [{"prompt": f"q{i}", "temperature": 1.0, "seed": 100 + i} for i in range(6)]
        bodies += [{"prompt": "u", "temperature": 1.0}] * 4
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            got = list(pool.map(text, bodies))
        assert got[:6] == [f"seed {100 + i}" for i in range(6)]
        assert len(set(got[6:]) & set(got[:6])) == 0
