"""On-policy distillation (GKD) from a teacher behind a server, with another tokenizer
(distillation.ServedTeacher, docs/distillation.md "On-policy distillation (GKD)"): a T5 student
over the arith vocabulary samples half of each batch's targets, our server over a tiny T5 of the
world vocabulary scores them on 127.0.0.1, and the step's loss equals a numpy computation from the
same samples and the server's answer (read here with a plain HTTP request); a trainer rebuilt
from the state after step 1 repeats step 2; the jitted step is the pieces file's program; a
server that is down or answers without logprobs, and bad settings, are one line each."""

from __future__ import annotations

import socket

import jax
import numpy as np
import optax
import pytest
import requests
import seqio
from _serve_proc import in_process_server, tiny_world_teacher
from _tiny_t5 import tiny_config

from distill_sbs import cross_tokenizer, distillation
from distill_sbs.data.feature_converter import PIECES_MODEL_FEATURE
from distill_sbs.data.vocab import ARITH_SPM
from distill_sbs.errors import UserError
from distill_sbs.generation import token_text
from distill_sbs.losses import SAMPLED_FEATURE
from distill_sbs.models import EncoderDecoderModel
from distill_sbs.partitioning import STANDARD_RULES, Partitioner, create_mesh
from distill_sbs.teachers.topk import score_samples as SCORER
from distill_sbs.trainer import SAMPLING_STREAM, Trainer, TrainState

KEY_ENV, SECRET = "DSS_TEST_GKD_SERVER_KEY", "sk-gkd-server-5b1e"
K, LENGTH, INPUTS = 4, 24, 64
# train.seed: its step-1 samples are one the world teacher spells and one it does not (an "x",
# which the world vocabulary lacks), so both kinds of sampled row are checked
SEED, TEMPERATURE, LR = 0, 1.0, 0.5
WEIGHTS, GAMMAS = (0.5, 0.5), (0.5, 0.5)
ROWS = [1, 3]  # OnPolicy(0.5).rows(4): rows 0 and 2 keep their gold targets


@pytest.fixture(scope="module")
def world_server(tmp_path_factory):
    """Our server over a tiny T5 of the world vocabulary (609 pieces, not the student's 256)."""
    teacher = tiny_world_teacher(str(tmp_path_factory.mktemp("world") / "teacher"))
    with in_process_server(teacher, SECRET, KEY_ENV) as url:
        yield url


@pytest.fixture(scope="module")
def vocab():
    return seqio.SentencePieceVocabulary(ARITH_SPM, extra_ids=0)


def _raw_score(url: str, prompts: list[str], targets: list[str]) -> list[dict]:
    """The server's logprobs objects, asked with a plain POST (not the project's client)."""
    body = {"model": "tiny", "prompt": prompts, "decoder_prompt": targets, "echo": True,
            "max_tokens": 0, "logprobs": K, "temperature": 0}  # fmt: skip
    r = requests.post(f"{url}/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {SECRET}"})  # fmt: skip
    assert r.status_code == 200, r.text
    return [c["logprobs"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]


def _teacher_side(logprobs: dict, target: str):
    """(pieces, spans, own log-probs, top-K [(piece, lp)] best first), or None where the
    teacher's pieces do not spell the target."""
    tokens = logprobs["tokens"]
    try:
        spans = cross_tokenizer.piece_spans(tokens, target, "reference")
    except UserError:
        return None
    tops = [sorted(t.items(), key=lambda kv: -kv[1])[:K] for t in logprobs["top_logprobs"]]
    return tokens, spans, logprobs["token_logprobs"], tops


@pytest.fixture(scope="module")
def batch(world_server, vocab):
    """Four unpacked rows of arith_dss (two label, two rationale targets, cut to LENGTH) with
    the gold rows' pieces features as a pieces file gives them (rows 1 and 3 hold features too:
    the step must replace them); and the gold rows' teacher side."""
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
    chosen = [e for e in examples if e["objective"] == "label"][:2]
    chosen += [e for e in examples if e["objective"] == "rationale"][:2]
    chosen = [chosen[0], chosen[2], chosen[1], chosen[3]]  # label, rationale, label, rationale
    b = {k: np.zeros((4, INPUTS if k == "encoder_input_tokens" else LENGTH), np.int32)
         for k in ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                   "decoder_objective_ids")}  # fmt: skip
    b["decoder_loss_weights"] = np.zeros((4, LENGTH), np.float32)
    answers = _raw_score(world_server, [e["inputs_text"] for e in chosen],
                         [e["targets_text"] for e in chosen])  # fmt: skip
    lookup = cross_tokenizer.sentencepiece_lookup(vocab.tokenizer)
    feats, gold = [], {}
    for r, (e, lp) in enumerate(zip(chosen, answers, strict=True)):
        t = e["targets"][:LENGTH]
        b["encoder_input_tokens"][r, : len(e["inputs"])] = e["inputs"]
        b["decoder_target_tokens"][r, : len(t)] = t
        b["decoder_input_tokens"][r, 1 : len(t)] = t[:-1]
        b["decoder_loss_weights"][r, : len(t)] = 1
        b["decoder_objective_ids"][r] = int(e["objective"] == "rationale")
        side = _teacher_side(lp, e["targets_text"])
        assert side is not None  # the world teacher spells these targets
        gold[r] = (side, e["targets"], e["targets_text"])
        tokens, spans, own, tops = side
        entry = cross_tokenizer.Entry(
            e["id"], e["objective"], e["targets_text"], tuple(tokens), tuple(spans), tuple(own),
            tuple(map(tuple, tops)),
        )  # fmt: skip
        ids = e["targets"]
        pieces = cross_tokenizer.sentencepiece_text(vocab.tokenizer, ids)
        f = cross_tokenizer.features(entry, ids, pieces, lookup, K, LENGTH)
        feats.append(cross_tokenizer.encode(f).reshape(-1))
    b[PIECES_MODEL_FEATURE] = np.stack(feats)
    return b, gold


def _kd(url: str, **server) -> distillation.KD:
    return distillation.KD(
        weights={"label": GAMMAS[0], "rationale": GAMMAS[1]},
        cross_tokenizer="span",
        on_policy_fraction=0.5,
        sample_temperature=TEMPERATURE,
        server=distillation.TeacherServer(url, "tiny", api_key_env=KEY_ENV, k=K, **server),
    )


def _partitioner() -> Partitioner:
    return Partitioner(create_mesh(1, 1, devices=jax.devices()[:1]), STANDARD_RULES)


def _trainer(url: str, vocab, teacher=None) -> Trainer:
    part = _partitioner()
    kd = _kd(url)
    return Trainer(
        EncoderDecoderModel(tiny_config(dropout_rate=0.0), vocab),
        optax.sgd(LR),
        part,
        WEIGHTS,
        dropout_seed=SEED,
        teacher=teacher or distillation.build_teacher(kd, 256, part, SCORER),
        divergence=kd.loss_fields(["label", "rationale"]),
    )


@pytest.fixture(scope="module")
def run(world_server, batch, vocab):
    """Two steps of one trainer: initial parameters, losses, and the state after step 1."""
    tr = _trainer(world_server, vocab)
    state = tr.init_state(jax.random.PRNGKey(0))
    params0 = jax.device_get(state.params)
    losses, after_one = [], None
    for _ in range(2):
        state, metrics = tr.train_step(state, batch[0])
        losses.append(float(metrics["loss_sum"]))
        after_one = after_one or jax.device_get(state)
    return params0, losses, after_one, jax.device_get(state.params)


# ---- the reference: numpy from the samples decoded here and the server's answer ---------------


def _kl(p, q):
    m = p > 0
    return float(np.sum(p[m] * (np.log(p[m]) - np.log(q[m]))))


def _span_kl(side, ids, s_spans, target, q, lookup) -> np.ndarray:
    """Forward KL per student token (docs/distillation.md's span alignment), float64."""
    tokens, t_spans, own, tops = side
    out = np.zeros(LENGTH)
    for t0, t1, s0, s1 in cross_tokenizer.align(t_spans, s_spans, len(target)):
        if s1 > LENGTH:
            break
        if t1 - t0 == 1 and s1 - s0 == 1:
            cls = {lookup(p): np.exp(lp) for p, lp in tops[t0] if lookup(p) is not None}
            cls.setdefault(int(ids[s0]), np.exp(own[t0]))
            p = np.array([*cls.values(), max(1 - sum(cls.values()), 1e-6)])
            qs = q[s0, list(cls)]
            out[s0] = _kl(p, np.array([*qs, 1 - qs.sum()]))
        else:
            big_p = np.exp(sum(own[t0:t1]))
            big_q = np.prod([q[j, ids[j]] for j in range(s0, s1)])
            out[s0] = _kl(np.array([big_p, 1 - big_p]), np.array([big_q, 1 - big_q]))
    return out


def test_the_served_step_equals_numpy(world_server, batch, run, vocab):
    b, gold = batch
    params0, (loss, _), _, _ = run
    student = EncoderDecoderModel(tiny_config(dropout_rate=0.0), vocab)
    step_rng = jax.random.fold_in(jax.random.PRNGKey(SEED), 0)
    samples = np.asarray(student.generate(
        params0, b["encoder_input_tokens"][ROWS], max_decode_length=LENGTH, method="sample",
        temperature=TEMPERATURE, rng=jax.random.fold_in(step_rng, SAMPLING_STREAM)))  # fmt: skip
    want = {k: np.array(v) for k, v in b.items()}
    sampled = np.zeros((4, LENGTH))
    prompts, texts, student_side = [], [], {}
    for r, s in zip(ROWS, samples, strict=True):
        eos = np.flatnonzero(s == 1)
        n = eos[0] + 1 if eos.size else LENGTH
        want["decoder_target_tokens"][r] = np.where(np.arange(LENGTH) < n, s, 0)
        want["decoder_input_tokens"][r] = [0, *want["decoder_target_tokens"][r][:-1]]
        want["decoder_loss_weights"][r] = sampled[r] = np.arange(LENGTH) < n
        ids = s[:n].tolist()
        text = vocab.decode([i for i in ids if i != 1])  # the student's text of its sample
        got_text, _, spans = cross_tokenizer.sample_pieces(vocab.tokenizer, ids)
        assert got_text == text
        inputs = b["encoder_input_tokens"][r].tolist()
        prompts.append(vocab.decode(inputs[: inputs.index(1)]))
        texts.append(text)
        student_side[r] = (ids, spans, text)
    answers = _raw_score(world_server, prompts, texts)
    x = np.asarray(jax.jit(student.logits)(params0, want["encoder_input_tokens"],
                                           want["decoder_input_tokens"]), np.float64)  # fmt: skip
    q = np.exp(x - x.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    lookup = cross_tokenizer.sentencepiece_lookup(vocab.tokenizer)
    div = np.zeros((4, LENGTH))
    for r, (side, ids, target) in gold.items():
        if r in ROWS:
            continue
        pieces = [token_text(vocab.tokenizer, i) for i in ids]
        s_spans = cross_tokenizer.piece_spans(pieces, target, "gold")
        div[r] = _span_kl(side, ids, s_spans, target, q[r], lookup)
    scored = []
    for r, lp in zip(ROWS, answers, strict=True):
        ids, s_spans, text = student_side[r]
        side = _teacher_side(lp, text)
        scored.append(side is not None)
        if side is not None:
            div[r] = _span_kl(side, ids, s_spans, text, q[r], lookup)
    assert scored == [True, False]  # see SEED: one sample spelled, one not
    tgt, w = want["decoder_target_tokens"], want["decoder_loss_weights"]
    ce = -np.log(np.take_along_axis(q, tgt[..., None], -1)[..., 0])
    total = 0.0
    for k in (0, 1):
        mask = w * (want["decoder_objective_ids"] == k)
        total += (WEIGHTS[k] * (mask * (1 - sampled) * ce).sum()
                  + GAMMAS[k] * (mask * div).sum()) / mask.sum()  # fmt: skip
    assert div[ROWS[0]].sum() > 0 and div[[0, 2]].sum() > 0
    np.testing.assert_allclose(loss, total, rtol=1e-5)


def test_a_trainer_resumed_after_step_one_repeats_step_two(world_server, batch, run, vocab):
    """A new trainer (new teacher, new client) from the state after step 1 draws the same
    samples, gets the same pieces and takes the same step 2 (the key is the step's)."""
    _, (_, loss2), after_one, params2 = run
    tr = _trainer(world_server, vocab)
    state = jax.device_put(after_one, tr.state_shardings)
    assert isinstance(state, TrainState) and int(state.step) == 1
    state, metrics = tr.train_step(state, batch[0])
    np.testing.assert_allclose(float(metrics["loss_sum"]), loss2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(params2),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_the_jitted_step_is_the_pieces_files(batch, vocab):
    """What runs jitted is the step of a pieces file (CrossTokenizerPieces, no sampling in it):
    only sampling and the server's round trip come before it."""
    b = dict(batch[0], **{SAMPLED_FEATURE: np.zeros((4, LENGTH), np.float32)})

    def program(tr: Trainer) -> str:
        state = tr.abstract_state()[0]
        with tr.partitioner.activation_context():
            return jax.jit(tr._step).lower(state, b, None).as_text()

    served = _trainer("http://127.0.0.1:9/v1", vocab)
    assert isinstance(served.teacher, distillation.ServedTeacher)
    plain = _trainer("-", vocab, teacher=distillation.CrossTokenizerPieces("span"))
    assert program(served) == program(plain)


# ---- one line each ----------------------------------------------------------------------------


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def _no_logprobs_server():
    import http.server
    import json
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            choices = [
                {"index": i, "text": "", "logprobs": None} for i in range(len(body["prompt"]))
            ]
            raw = json.dumps({"choices": choices}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/v1"


def test_a_server_down_or_without_logprobs_is_one_line_naming_it(batch, vocab, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    part = _partitioner()
    b = batch[0]

    def score(url: str) -> str:
        teacher = distillation.build_teacher(_kd(url, max_retries=1), 256, part, SCORER)
        with pytest.raises(UserError) as e:
            teacher.sampled_pieces(b, np.array(ROWS), vocab)
        assert "\n" not in str(e.value) and SECRET not in str(e.value)
        return str(e.value)

    down = _closed_port_url()
    assert score(down).startswith(f"KD.server: scoring the student's samples: {down}: ")
    assert "connection error" in score(down)
    httpd, url = _no_logprobs_server()
    try:
        msg = score(url)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert msg.startswith(f"KD.server: scoring the student's samples: {url}: example 'sampled ")
    assert "the server returned no logprobs" in msg


def test_bad_settings_are_one_line_each(batch, vocab):
    import gin

    part = _partitioner()
    server = distillation.TeacherServer("http://127.0.0.1:9/v1", "tiny", k=K)
    base = dict(weights={"label": 1.0}, cross_tokenizer="span", on_policy_fraction=0.5)
    cases = [
        (dict(base, cross_tokenizer=None), "KD.server scores in a teacher of another tokenizer"),
        (dict(base, on_policy_fraction=0.0), "with KD.server scores the student's samples: set "
                                             r"KD.on_policy_fraction > 0"),
        (dict(base, teacher="/t"), "not KD.teacher=/t: unset one"),
        (dict(base, topk=2), "unset KD.topk"),
    ]  # fmt: skip
    gin.clear_config()
    for kw, needle in cases:
        with pytest.raises(UserError, match=needle) as e:
            distillation.build_teacher(distillation.KD(server=server, **kw), 256, part, SCORER)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"TeacherServer.k=0: must be >= 1"):
        distillation.TeacherServer("u", "m", k=0)
    # a pieces file of another k than the server's
    teacher = distillation.build_teacher(distillation.KD(server=server, **base), 256, part, SCORER)
    wide = np.zeros((4, LENGTH * (4 * 8 + 7)), np.int32)
    with pytest.raises(UserError, match=r"holds k=8 top log-probs, TeacherServer.k=4"):
        teacher.sampled_pieces(batch[0], np.array(ROWS), vocab, wide)
