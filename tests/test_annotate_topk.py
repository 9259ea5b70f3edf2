"""Teacher-forced scoring in `python -m distill_sbs.serve` (completions with `echo`, `max_tokens:
0`, `logprobs: k` and a `decoder_prompt`) checked against the model's own log_softmax, and the top-k
file `python -m distill_sbs.annotate_topk --teacher_url=...` writes from it checked against
`teachers.topk.write_topk` run locally on the same checkpoint; bad input gives one clear error."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import openai
import pytest
import requests
from _serve_proc import save_tiny_checkpoint, serving

from distill_sbs.teachers.backends import HTTPConfig

KEY_ENV, SECRET = "DSS_TEST_TOPK_KEY", "sk-topk-e2e-7f6e5d4c"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from distill_sbs.data.vocab import ARITH_SPM

    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny"), ARITH_SPM)


@pytest.fixture(scope="module")
def server(checkpoint, subprocess_env):
    env = dict(subprocess_env, **{KEY_ENV: SECRET})
    limits = {"max_batch_size": 8, "max_input_length": 128, "max_tokens_limit": 128}
    with serving(checkpoint, env, KEY_ENV, **limits) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def tiny_model(checkpoint):
    import distill_sbs

    return distill_sbs.load(checkpoint)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_echo_scoring_is_the_teacher_forced_log_softmax(server, tiny_model):
    model, params = tiny_model
    client = openai.OpenAI(base_url=server, api_key=SECRET, max_retries=0, timeout=120)
    prompts, targets = ["12 + 7 =", "[rationale] 3 * 4 ="], ["19", "3 * 4 = 12. So 12"]
    r = client.completions.create(model="tiny", prompt=prompts, echo=True, max_tokens=0,
                                  logprobs=5, extra_body={"decoder_prompt": targets})  # fmt: skip
    vocab = model.vocabulary
    assert [c.index for c in r.choices] == [0, 1]
    want_usage = 0
    for prompt, target, choice in zip(prompts, targets, r.choices, strict=True):
        assert choice.text == target and choice.finish_reason == "length"
        enc = [*vocab.encode(prompt), 1]
        tgt = [*vocab.encode(target), 1]  # EOS scored too, as training has it
        want_usage += len(enc) + len(tgt)
        lp = choice.logprobs
        ids = [vocab.tokenizer.piece_to_id(t.replace(" ", "\u2581")) for t in lp.tokens]
        assert ids == tgt and lp.tokens[-1] == "</s>"
        # Oracle: numpy log_softmax of the model's logits, one unpadded row, teacher forcing.
        logits = model.logits(params, np.array([enc], np.int32), np.array([[0, *tgt[:-1]]]))
        want = _log_softmax(np.asarray(logits)[0])
        np.testing.assert_allclose(lp.token_logprobs, want[np.arange(len(tgt)), tgt], atol=1e-5)
        for j, top in enumerate(lp.top_logprobs):
            best = np.argsort(-want[j], kind="stable")[:5]
            assert [vocab.tokenizer.piece_to_id(t.replace(" ", "\u2581")) for t in top] == list(
                best
            )
            np.testing.assert_allclose(list(top.values()), want[j, best], atol=1e-5)
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert r.usage.prompt_tokens == want_usage and r.usage.completion_tokens == 0


def _post(server: str, body: dict, key: str = SECRET) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"}
    return requests.post(f"{server}/completions", json=body, headers=headers, timeout=60)


@pytest.mark.parametrize(
    "extra, status, needle",
    [
        ({}, 200, ""),
        ({"decoder_prompt": None}, 400, "needs 'decoder_prompt'"),
        ({"decoder_prompt": ["1", "2"]}, 400, "2 text(s) for 1 prompt(s)"),
        ({"logprobs": 21}, 400, "'logprobs' must be a number in [0, 20]"),
        ({"echo": False}, 400, "needs 'echo': true"),
        ({"n": 2}, 400, "n = 1"),
        ({"stream": True}, 400, "no streaming"),
        ({"decoder_prompt": "1 " * 200}, 400, "--max_tokens_limit=128"),
        ({"prompt": "1 " * 200}, 400, "--max_input_length=128"),
        ({"max_tokens": 4}, 400, "'echo' with 'logprobs' scores a text"),
        ({"max_tokens": 4, "echo": False, "logprobs": None}, 400, "read only when scoring"),
    ],
)
def test_scoring_requests_are_checked(server, extra, status, needle):
    body = {"model": "tiny", "prompt": "1 + 1 =", "decoder_prompt": "2", "echo": True,
            "max_tokens": 0, "logprobs": 3, **extra}  # fmt: skip
    r = _post(server, {k: v for k, v in body.items() if v is not None})
    assert r.status_code == status, r.text
    if status != 200:
        assert needle in r.json()["error"]["message"]
    else:
        assert len(r.json()["choices"][0]["logprobs"]["top_logprobs"][0]) == 3
    assert _post(server, body, key="sk-wrong").status_code == 401  # scoring is behind the key


@pytest.mark.slow  # scores the 400 examples of arith_dss's test split twice (server and local)
def test_annotate_topk_from_the_server_equals_local_write_topk(
    server, checkpoint, tiny_model, tmp_path, subprocess_env
):
    import distill_sbs.tasks  # noqa: F401  registers arith

    from distill_sbs.data import topk
    from distill_sbs.teachers import topk as topk_writer

    out = str(tmp_path / "server.topk.npz")
    cmd = [
        sys.executable, "-m", "distill_sbs.annotate_topk", f"--teacher_url={server}",
        "--model=tiny", f"--api_key_env={KEY_ENV}", "--task=arith_dss", "--split=test", "--k=8",
        "--batch_size=16", f"--output={out}",
    ]  # fmt: skip
    p = subprocess.run(cmd, env=dict(subprocess_env, **{KEY_ENV: SECRET}), capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert "bytes per target token" in p.stdout
    local = str(tmp_path / "local.topk.npz")
    model, params = tiny_model
    topk_writer.write_topk(model, params, "arith_dss", local, k=8, split="test")
    a, b = topk.load(out), topk.load(local)
    assert a.keys == b.keys and len(a.keys) == 400 and a.vocab_size == b.vocab_size == 256
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.targets, b.targets)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.logprobs.astype(np.float32), b.logprobs.astype(np.float32),
                               rtol=2e-3, atol=1e-3)  # fmt: skip
    assert topk.bytes_per_token(out) == pytest.approx(topk.bytes_per_token(local), rel=0.01)


def _config(url: str, **kw) -> HTTPConfig:
    return HTTPConfig(url, "tiny", api_key_env=KEY_ENV, max_retries=0, **kw)


def test_k_above_the_servers_max_is_one_error(server, tmp_path, monkeypatch):
    import distill_sbs.tasks  # noqa: F401

    from distill_sbs.teachers.topk import write_topk_from_server

    monkeypatch.setenv(KEY_ENV, SECRET)
    with pytest.raises(RuntimeError, match=r"scoring examples .* failed: HTTP 400: .*'logprobs'"):
        write_topk_from_server(_config(server), "arith_dss", str(tmp_path / "x.npz"), k=21,
                               split="test", batch_size=64)  # fmt: skip
    assert not (tmp_path / "x.npz").exists()


def test_server_errors_are_retried_then_one_error(tmp_path, monkeypatch):
    import distill_sbs.tasks  # noqa: F401
    from fakes import FakeGenerator, fault_server

    from distill_sbs.teachers.topk import write_topk_from_server

    monkeypatch.setenv(KEY_ENV, SECRET)
    # A fake model cannot score: every request gets 500 from the plan before reaching it.
    config = HTTPConfig("", "tiny", api_key_env=KEY_ENV, max_retries=1, backoff_base=0.01)
    with fault_server(FakeGenerator(), "500@1-100", api_key=SECRET) as s:
        config = dataclasses.replace(config, base_url=s.base_url)
        with pytest.raises(
            RuntimeError, match=r"failed: HTTP 500: .*injected fault 500.*\(after 2 attempt"
        ):
            write_topk_from_server(config, "arith_dss", str(tmp_path / "x.npz"), k=4,
                                   split="test", batch_size=64)  # fmt: skip
        assert s.handler.faults.by_status["500"] == 2 * 7  # 7 requests of 64, each tried twice
    assert not (tmp_path / "x.npz").exists()


def test_mismatched_tokenizer_names_the_example(tmp_path, monkeypatch):
    """A teacher served with the T5 SentencePiece model scores arith's targets as other tokens."""
    import distill_sbs.tasks  # noqa: F401
    from _shared_data import T5_VOCAB

    import distill_sbs
    from distill_sbs.generation import ModelGenerator
    from distill_sbs.serve import Server
    from distill_sbs.teachers.topk import ServerTopKError, write_topk_from_server

    model, params = distill_sbs.load(save_tiny_checkpoint(str(tmp_path / "t5"), str(T5_VOCAB),
                                                vocab_size=32128))  # fmt: skip
    monkeypatch.setenv(KEY_ENV, SECRET)
    gen = ModelGenerator(model, params, max_input_length=128, max_batch_size=8)
    with Server(gen, api_key=SECRET, model_name="tiny") as s:
        with pytest.raises(ServerTopKError, match=r"example 'arith-test-\d+' .*tokenizer differs"):
            write_topk_from_server(_config(s.base_url), "arith_dss", str(tmp_path / "x.npz"),
                                   k=4, split="test", batch_size=8)  # fmt: skip


def test_token_text_names_ids_without_a_piece(t5_vocab):
    """Generation's and scoring's one spelling of a token (tokens and top_logprobs): the piece
    with "\u2581" as a space, `token_id:N` for T5's sentinel and padding ids past the pieces."""
    import sentencepiece as spm

    from distill_sbs.generation import token_text

    tokenizer = spm.SentencePieceProcessor(model_file=str(t5_vocab))
    the = tokenizer.piece_to_id("\u2581the")
    assert token_text(tokenizer, the) == " the"
    assert token_text(tokenizer, 1) == "</s>"
    assert token_text(tokenizer, 32005) == "token_id:32005"
    assert token_text(tokenizer, 32127) == "token_id:32127"
