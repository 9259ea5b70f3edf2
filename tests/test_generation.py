"""ModelGenerator's bucketing, truncation and token counts, over a stand-in for the model API."""

from __future__ import annotations

import numpy as np

from distill_sbs.generation import GenerationParams, ModelGenerator, bucket
from distill_sbs.teachers.local import LocalBackend


class StandInModel:
    """encode: one id per character (ids 2..); generate: row i emits i+2 tokens 5, then EOS."""

    def __init__(self):
        self.calls = []

    def encode_texts(self, texts, max_length):
        out = np.zeros((len(texts), max_length), np.int32)
        for i, t in enumerate(texts):
            ids = [2 + (ord(c) % 50) for c in t][: max_length - 1] + [1]
            out[i, : len(ids)] = ids
        return out

    def generate(self, params, tokens, *, max_decode_length, method, **kw):
        self.calls.append((tokens.shape, max_decode_length, method, kw.get("temperature")))
        out = np.zeros((tokens.shape[0], max_decode_length), np.int32)
        for i in range(tokens.shape[0]):
            n = min(i + 2, max_decode_length)
            out[i, :n] = 5
            if n < max_decode_length:
                out[i, n] = 1
        return out

    def decode_tokens(self, ids):
        return ["x" * int((row == 5).sum()) for row in np.asarray(ids)]


def test_bucket():
    assert [bucket(n, 16) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
    assert bucket(5, 1, 4) == 4


def test_shapes_are_bucketed_and_outputs_cut():
    model = StandInModel()
    gen = ModelGenerator(model, None, max_input_length=64, max_batch_size=4)
    out = gen.generate(["ab", "abcdefghijklmnopqrstu", "c"], GenerationParams(max_tokens=3))
    # 3 rows -> 4; longest prompt 22 tokens (with EOS) -> 32; 3 new tokens -> 16.
    assert model.calls == [((4, 32), 16, "greedy", None)]
    assert [o.text for o in out] == ["xx", "xxx", "xxx"]  # row 0 stops at EOS, others at 3
    assert [o.completion_tokens for o in out] == [2, 3, 3]
    assert [o.prompt_tokens for o in out] == [3, 22, 2]
    # More prompts than a batch: split into batches of 4; sampling passes its parameters.
    out = gen.generate(["a"] * 6, GenerationParams(max_tokens=40, temperature=0.5, stop=("xx",)))
    assert [c[0] for c in model.calls[1:]] == [(4, 16), (2, 16)]
    assert model.calls[1][1:] == (64, "sample", 0.5)
    assert [o.text for o in out] == [""] * 6  # cut at the stop string


def test_local_backend_batches_requests_with_equal_params():
    from distill_sbs.teachers.backends import TeacherRequest

    model = StandInModel()
    backend = LocalBackend(ModelGenerator(model, None, max_batch_size=8))
    greedy, hot = GenerationParams(8), GenerationParams(8, temperature=1.0)
    reqs = [TeacherRequest(f"k{i}", "q", greedy if i % 2 else hot, i) for i in range(6)]
    got = {}
    backend.run(reqs, lambda r, c: got.__setitem__(r.key, c))
    assert len(model.calls) == 2 and sorted(got) == [f"k{i}" for i in range(6)]
    assert backend.stats.attempts == 6 and backend.stats.completion_tokens == 2 * (2 + 3 + 4)


def test_a_failing_stream_callback_fails_its_own_call_only():
    """Issue 21: an exception in the decoder's ordered host callback poisoned JAX's effect token,
    so every later decode of the process failed too; now it stops the rows and is raised by the
    generate call that met it."""
    import jax
    import pytest
    import seqio
    from _tiny_t5 import tiny_config

    from distill_sbs.data.vocab import ARITH_SPM
    from distill_sbs.models import EncoderDecoderModel

    model = EncoderDecoderModel(tiny_config(), seqio.SentencePieceVocabulary(ARITH_SPM, 0))
    gen = ModelGenerator(model, model.init_params(jax.random.PRNGKey(0)), max_input_length=16)
    params = GenerationParams(max_tokens=4)

    def gone(row, delta, token):
        raise ConnectionError("the client went away")

    with pytest.raises(ConnectionError, match="went away"):
        gen.generate(["1 + 2 ="], params, on_token=gone)
    deltas: list[str] = []
    out = gen.generate(["1 + 2 ="], params, on_token=lambda r, d, t: deltas.append(d) or True)
    assert out[0].text == "".join(deltas) == gen.generate(["1 + 2 ="], params)[0].text
    assert out[0].completion_tokens == 4
