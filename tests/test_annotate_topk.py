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
from _serve_proc import in_process_server, save_tiny_checkpoint, serving, tiny_world_teacher

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


# ---- a teacher with another tokenizer: --pieces (distill_sbs/cross_tokenizer.py) -------------


@pytest.fixture(scope="module")
def world_teacher(tmp_path_factory):
    """A tiny T5 over the world's SentencePiece (709 ids): another vocabulary than arith's 256."""
    return tiny_world_teacher(str(tmp_path_factory.mktemp("world") / "teacher"))


@pytest.fixture(scope="module")
def world_server(world_teacher):
    with in_process_server(world_teacher, SECRET, KEY_ENV) as url:
        yield url


@pytest.fixture(scope="module")
def arith_examples():
    """Four label and four rationale examples of arith_dss's test split, as training reads them,
    whose texts the world vocabulary spells without <unk> (its pieces cover them)."""
    import distill_sbs.tasks  # noqa: F401
    import sentencepiece as spm

    from distill_sbs.data.world import VOCAB_FILE
    from distill_sbs.teachers.topk import task_examples

    world = spm.SentencePieceProcessor(model_file=VOCAB_FILE)
    examples = [
        e
        for e in task_examples("arith_dss", "test")
        if world.unk_id() not in world.encode(e["targets_text"])
    ]
    return [e for e in examples if e["objective"] == "label"][:4] + [
        e for e in examples if e["objective"] == "rationale"
    ][:4]


@pytest.fixture(scope="module")
def pieces_file(world_server, arith_examples, tmp_path_factory):
    from distill_sbs.teachers.topk import write_pieces_from_server

    out = str(tmp_path_factory.mktemp("pieces") / "arith.pieces.jsonl")
    n = write_pieces_from_server(_config(world_server), "arith_dss", out, k=4, batch_size=3,
                                 examples=arith_examples)  # fmt: skip
    assert n == len(arith_examples)
    return out


def test_pieces_of_a_teacher_with_another_vocabulary(pieces_file, world_teacher, arith_examples):
    """Each entry holds the teacher's own tokenization of the target text (EOS included), its
    pieces' character spans, and log-probs equal to the teacher's log_softmax (numpy oracle)."""
    import jax

    from distill_sbs import cross_tokenizer
    from distill_sbs.generation import token_text

    model, params = world_teacher
    logits_fn = jax.jit(model.logits)
    tok = model.vocabulary.tokenizer
    entries = cross_tokenizer.load(pieces_file)
    assert list(entries) == [(e["id"], e["objective"]) for e in arith_examples]
    differs = 0
    for e in arith_examples:
        entry = entries[(e["id"], e["objective"])]
        tgt = [*model.vocabulary.encode(e["targets_text"]), 1]
        assert entry.target == e["targets_text"]
        assert list(entry.tokens) == [token_text(tok, t) for t in tgt]
        assert "".join(entry.target[a:b] for a, b in entry.spans) == entry.target
        differs += tgt != e["targets"]  # the student's (arith) ids of the same text
        enc = np.zeros((1, 64), np.int32)  # one padded shape: one compilation
        dec = np.zeros((1, 64), np.int32)
        src = [*model.vocabulary.encode(e["inputs_text"]), 1]
        enc[0, : len(src)], dec[0, 1 : len(tgt)] = src, tgt[:-1]
        want = _log_softmax(np.asarray(logits_fn(params, enc, dec))[0, : len(tgt)])
        np.testing.assert_allclose(entry.logprobs, want[np.arange(len(tgt)), tgt], atol=1e-5)
        for j, top in enumerate(entry.top):
            best = np.argsort(-want[j], kind="stable")[:4]
            assert [p for p, _ in top] == [token_text(tok, int(i)) for i in best]
            np.testing.assert_allclose([lp for _, lp in top], want[j, best], atol=1e-5)
    assert differs == len(arith_examples)  # every target is tokenized otherwise by the teacher


@pytest.mark.parametrize("loss", ["span", "uld"])
def test_a_student_trains_on_the_pieces_file(pieces_file, arith_examples, loss):
    """End to end: the served world-vocabulary teacher's pieces file distills an arith-vocabulary
    student for a few steps through losses.weighted_objective_loss: the divergence is in the
    metrics, finite, and falls."""
    import jax
    import optax
    import seqio
    from _tiny_t5 import tiny_config

    from distill_sbs import cross_tokenizer
    from distill_sbs.data.vocab import ARITH_SPM
    from distill_sbs.losses import weighted_objective_loss
    from distill_sbs.models import EncoderDecoderModel

    tok = seqio.SentencePieceVocabulary(ARITH_SPM, extra_ids=0).tokenizer
    entries = cross_tokenizer.load(pieces_file)
    length, k = 48, 4
    feats, enc, tgt = [], np.zeros((8, 48), np.int32), np.zeros((8, length), np.int32)
    for r, e in enumerate(arith_examples):
        entry = entries[(e["id"], e["objective"])]
        pieces = cross_tokenizer.sentencepiece_text(tok, e["targets"])
        lookup = cross_tokenizer.sentencepiece_lookup(tok)
        feats.append(cross_tokenizer.features(entry, e["targets"], pieces, lookup, k, length))
        enc[r, : len(e["inputs"])], tgt[r, : len(e["targets"])] = e["inputs"], e["targets"]
    feats = cross_tokenizer.batch_features(feats)
    assert (feats["xt_kind"] == cross_tokenizer.SPAN).any()  # spans of several tokens occur
    dec_in = np.concatenate([np.zeros_like(tgt[:, :1]), tgt[:, :-1]], axis=1)
    objectives = np.asarray([[0] * length] * 4 + [[1] * length] * 4, np.int32)
    model = EncoderDecoderModel(tiny_config())
    tx = optax.adam(3e-2)

    def loss_fn(p):
        logits = model.logits(p, enc, dec_in)
        div = cross_tokenizer.divergence(loss, logits, tgt, feats)
        weights = (tgt > 0).astype(np.float32)
        return weighted_objective_loss(logits, tgt, weights, objectives, (0.0, 0.0),
                                       divergence=div, divergence_weights=(1.0, 1.0))  # fmt: skip

    @jax.jit
    def step(p, opt):
        (value, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, value, metrics

    params = model.init_params(jax.random.PRNGKey(0))
    opt = tx.init(params)
    values = []
    for _ in range(8):
        params, opt, value, metrics = step(params, opt)
        values.append(float(value))
        assert np.all(np.isfinite(metrics["div_sum"])) and np.all(metrics["div_sum"] > 0)
    assert np.isfinite(values).all() and values[-1] < 0.8 * values[0], values


class _Canned:
    """An OpenAI-like server on 127.0.0.1 answering every POST with answer(body) (a dict); the
    bodies it received are kept."""

    def __init__(self, answer):
        import http.server
        import json
        import threading

        bodies = self.bodies = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                bodies.append(body)
                raw = json.dumps(answer(body)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _vllm_answer(body):
    """vLLM's echo answer for prompts "<input> <target>": a word a token (its leading space
    included), the first token without a logprob, one generated token "." after the text."""
    import re

    choices = []
    for i, prompt in enumerate(body["prompt"]):
        words = [*re.findall(r"\s*\S+", prompt), "."]
        offsets = [sum(len(w) for w in words[:j]) for j in range(len(words))]
        top = [None] + [{w: -0.25, " x": -2.0, " y": -3.0} for w in words[1:]]
        lps = [None] + [-0.25] * (len(words) - 1)
        logprobs = {"tokens": words, "token_logprobs": lps, "top_logprobs": top,
                    "text_offset": offsets}  # fmt: skip
        choices.append({"index": i, "text": prompt + ".", "logprobs": logprobs})
    return {"choices": choices, "usage": {"prompt_tokens": 1}}


EXAMPLES = [{"id": "q1", "objective": "label", "inputs_text": "3 + 4 =", "targets_text": "7"},
            {"id": "q2", "objective": "rationale", "inputs_text": "[rationale] 3 + 4 =",
             "targets_text": "3 + 4 = 7. So 7"}]  # fmt: skip


def test_pieces_from_a_decoder_only_server(tmp_path, monkeypatch):
    """A decoder-only (vLLM) teacher scores input + " " + target as one prompt; the target's
    tokens are those from the input's end to the generated one."""
    from distill_sbs import cross_tokenizer
    from distill_sbs.teachers.topk import write_pieces_from_server

    monkeypatch.setenv(KEY_ENV, SECRET)
    out = str(tmp_path / "p.jsonl")
    with _Canned(_vllm_answer) as s:
        write_pieces_from_server(_config(s.base_url), "t", out, k=3, decoder_only=True,
                                 examples=EXAMPLES)  # fmt: skip
    assert s.bodies[0]["prompt"] == ["3 + 4 = 7", "[rationale] 3 + 4 = 3 + 4 = 7. So 7"]
    assert "decoder_prompt" not in s.bodies[0] and s.bodies[0]["echo"] is True
    entries = cross_tokenizer.load(out)
    assert entries[("q1", "label")].tokens == (" 7",) and entries[("q1", "label")].spans == (
        (0, 1),
    )
    q2 = entries[("q2", "rationale")]
    assert q2.tokens == (" 3", " +", " 4", " =", " 7.", " So", " 7")
    assert q2.spans[0] == (0, 1) and q2.spans[-1] == (13, 15)
    assert q2.top[0] == ((" 3", -0.25), (" x", -2.0), (" y", -3.0))


@pytest.mark.parametrize(
    "change, k, needle",
    [
        (lambda lp: None, 3, r"example 'q1' \(label\): the server returned no logprobs"),
        (lambda lp: {**lp, "top_logprobs": [*lp["top_logprobs"][:-2], None, {}]}, 3,
         r"'q1' \(label\): the server gave no top log-probabilities at target token 0"),
        (None, 4, r"'q1' \(label\): the server gave 3 top log-probabilities at target token 0, "
                  r"k=4 were asked for"),
        (lambda lp: {**lp, "tokens": ["3", " +", " 4", " =", " 8", "."]}, 3,
         r"'q1' \(label\): the teacher's pieces do not cover the target text: piece 0 ' 8'"),
    ],
)  # fmt: skip
def test_bad_server_answers_name_the_example(tmp_path, monkeypatch, change, k, needle):
    from distill_sbs.errors import UserError  # one line in the program
    from distill_sbs.teachers.topk import write_pieces_from_server

    def answer(body):
        a = _vllm_answer(body)
        for c in a["choices"]:
            c["logprobs"] = change(c["logprobs"]) if change else c["logprobs"]
        return a

    monkeypatch.setenv(KEY_ENV, SECRET)
    with _Canned(answer) as s, pytest.raises(UserError, match=needle):
        write_pieces_from_server(_config(s.base_url), "t", str(tmp_path / "p.jsonl"), k=k,
                                 decoder_only=True, examples=EXAMPLES[:1])  # fmt: skip
    assert not (tmp_path / "p.jsonl").exists()


def test_pieces_k_above_the_servers_max_and_no_logprobs_are_one_line(
    world_server, tmp_path, subprocess_env
):
    """Our server refuses k = 21 (HTTP 400); a server answering without logprobs stops the
    program with one line naming the example, exit 2."""
    import distill_sbs.tasks  # noqa: F401

    from distill_sbs.teachers.topk import write_pieces_from_server

    with pytest.raises(RuntimeError, match=r"scoring examples .* failed: HTTP 400: .*'logprobs'"):
        write_pieces_from_server(_config(world_server), "arith_dss", str(tmp_path / "x.jsonl"),
                                 k=21, examples=EXAMPLES)  # fmt: skip

    def no_logprobs(body):
        return {"choices": [{"index": i, "text": "", "logprobs": None}
                            for i in range(len(body["prompt"]))]}  # fmt: skip

    out = str(tmp_path / "y.jsonl")
    with _Canned(no_logprobs) as s:
        cmd = [sys.executable, "-m", "distill_sbs.annotate_topk", f"--teacher_url={s.base_url}",
               "--model=m", "--pieces", "--task=arith_dss", "--split=test", "--k=4",
               f"--output={out}"]  # fmt: skip
        p = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert lines == [
        "error: example 'arith-test-0' (label): the server returned no logprobs: it must score "
        "the text (completions with 'echo' and 'logprobs', as vLLM and distill_sbs.serve do)"
    ], p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "y.jsonl").exists()
