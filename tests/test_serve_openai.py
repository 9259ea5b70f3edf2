"""The official `openai` client against `python -m distill_sbs.serve` (a subprocess on 127.0.0.1)
running a tiny random-weight T5: completions and chat, streamed and not, logprobs checked against
the model's own teacher-forced log-probabilities, errors, and auth on and off."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import openai
import pytest
from _serve_proc import save_tiny_checkpoint, serving, start

KEY_ENV, SECRET = "DSS_TEST_SERVE_KEY", "sk-serve-e2e-5d4c3b2a"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from distill_sbs.data.vocab import ARITH_SPM

    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny"), ARITH_SPM)


@pytest.fixture(scope="module")
def server(checkpoint, subprocess_env):
    env = dict(subprocess_env, **{KEY_ENV: SECRET})
    limits = {"max_batch_size": 2, "max_input_length": 32, "max_tokens_limit": 16}
    with serving(checkpoint, env, KEY_ENV, **limits) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key=SECRET, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tiny_model(checkpoint):
    import distill_sbs

    return distill_sbs.load(checkpoint)


def _greedy(model, params, prompt: str, max_tokens: int) -> list[int]:
    """The oracle of a temperature-0 answer: the argmax of the model's teacher-forced logits, one
    token at a time, until EOS (id 1, not returned) or max_tokens."""
    enc = model.encode_texts([prompt], 32)
    ids: list[int] = []
    while len(ids) < max_tokens:
        logits = np.asarray(model.logits(params, enc, np.array([[0, *ids]], np.int32)))[0, -1]
        if int(logits.argmax()) == 1:
            break
        ids.append(int(logits.argmax()))
    return ids


def test_models(client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.code == "model_not_found"


def test_completion_logprobs_are_the_models(client, tiny_model):
    model, params = tiny_model
    prompt = "12 + 7 ="
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                  logprobs=3)  # fmt: skip
    choice = r.choices[0]
    lp = choice.logprobs
    n = r.usage.completion_tokens
    assert 1 <= n <= 8 and len(lp.tokens) == n and "".join(lp.tokens).strip() == choice.text.strip()
    # Oracle: teacher-forced log_softmax of the model at the tokens it generated.
    vocab = model.vocabulary
    ids = [vocab.tokenizer.piece_to_id(t.replace(" ", "\u2581")) for t in lp.tokens]
    enc = model.encode_texts([prompt], 32)
    dec_in = np.array([[0] + ids[:-1]], np.int32)
    logits = np.asarray(model.logits(params, enc, dec_in))[0]
    want = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    want -= logits.max(-1, keepdims=True)
    np.testing.assert_allclose(lp.token_logprobs, want[np.arange(n), ids], atol=2e-4)
    for i, top in enumerate(lp.top_logprobs):  # greedy: the chosen token is the best one
        assert len(top) == 3 and max(top.values()) == pytest.approx(lp.token_logprobs[i], abs=1e-5)
        best3 = np.sort(want[i])[::-1][:3]
        np.testing.assert_allclose(sorted(top.values(), reverse=True), best3, atol=2e-4)


def test_streamed_completion_equals_the_plain_one(client):
    kw = {"model": "tiny", "prompt": ["3 * 4 =", "9 - 2 ="], "max_tokens": 10, "temperature": 0}
    plain = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True}))  # fmt: skip
    texts = ["", ""]
    for c in chunks[:-1]:
        for ch in c.choices:
            texts[ch.index] += ch.text
    assert texts == [c.text for c in plain.choices]
    assert len(chunks) > 4  # token by token, not one chunk per choice
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens
    finish = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finish == [c.finish_reason for c in plain.choices]


def test_echo_and_stop(client):
    r = client.completions.create(model="tiny", prompt="5 + 5 =", max_tokens=8, temperature=0,
                                  echo=True)  # fmt: skip
    assert r.choices[0].text.startswith("5 + 5 =")
    full = r.choices[0].text[len("5 + 5 =") :]
    if len(full) > 2:
        cut = client.completions.create(model="tiny", prompt="5 + 5 =", max_tokens=8,
                                        temperature=0, stop=[full[2:4]])  # fmt: skip
        assert cut.choices[0].text == full[: full.index(full[2:4])]
        assert cut.usage.completion_tokens < r.usage.completion_tokens


def test_chat_streamed_and_not(client, tiny_model):
    msgs = [{"role": "user", "content": "2 + 2 ="}]  # one message: its content is the input
    r = client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    model, params = tiny_model
    want = _greedy(model, params, "2 + 2 =", 3)
    assert r.usage.completion_tokens == len(want)
    assert r.choices[0].message.content == model.decode_tokens([want])[0]
    assert r.choices[0].finish_reason == ("length" if len(want) == 3 else "stop")
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=3,
                                            temperature=0, stream=True)  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == r.choices[0].message.content


def test_errors(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="x", temperature=9)
    wrong = openai.OpenAI(base_url=server, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.completions.create(model="tiny", prompt="x")
    assert e.value.code == "invalid_api_key"


def test_refuses_to_start_unsafely(checkpoint, subprocess_env):
    base = [sys.executable, "-m", "distill_sbs.serve", "--checkpoint", checkpoint, "--port", "0"]
    env = {k: v for k, v in subprocess_env.items() if k != KEY_ENV} | {"EMPTY_KEY": ""}
    for extra, needle in [
        (["--api_key_env", "EMPTY_KEY"], "unset or empty"),
        (["--api_key_env", "NO_SUCH_VARIABLE_X"], "unset or empty"),
        (["--host", "0.0.0.0"], "refusing to listen"),
    ]:
        p = subprocess.run(base + extra, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode != 0 and needle in p.stderr, p.stderr[-500:]


@pytest.mark.slow  # a second model process (about 20 s); test_serve_robust covers auth off
def test_auth_off_on_loopback(checkpoint, subprocess_env, tiny_model):
    cmd = [
        sys.executable, "-m", "distill_sbs.serve", "--checkpoint", checkpoint, "--port", "0",
        "--max_batch_size", "1", "--max_input_length", "16", "--max_tokens_limit", "4",
    ]  # fmt: skip
    proc, base_url = start(cmd, subprocess_env)
    try:
        anyone = openai.OpenAI(base_url=base_url, api_key="anything", max_retries=0, timeout=120)
        r = anyone.completions.create(model=os.path.basename(checkpoint), prompt="1 =",
                                      max_tokens=4, temperature=0)  # fmt: skip
        # Any key is let in, and the answer is the model's: greedy, cut at the 4-token limit.
        model, params = tiny_model
        want = _greedy(model, params, "1 =", 4)
        assert len(want) == 4  # the seed-0 model does not end this answer early: "length"
        assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"
        assert r.choices[0].text == model.decode_tokens([want])[0]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
