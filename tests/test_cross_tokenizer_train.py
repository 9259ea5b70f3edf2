"""Cross-tokenizer KD through gin and `distill_sbs.train` (docs/distillation.md, "In training"): a
pieces file named in gin (kd/arith_kd_pieces.gin) reaches the batches through the SeqIO
pipeline, packed or not; the first step's loss equals a numpy computation of CE + gamma *
(span-aligned divergence or ULD) on the same batch; microbatches add up; bad settings are one
line each. Also a gin run of on-policy distillation (GKD) stopped and resumed equals an
uninterrupted one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest
import seqio
from _serve_proc import save_tiny_checkpoint

from distill_sbs import cli, cross_tokenizer, distillation
from distill_sbs.data.vocab import ARITH_SPM
from distill_sbs.errors import UserError
from distill_sbs.generation import token_text
from distill_sbs.partitioning import create_partitioner

K = 4
# Pieces of the arith vocabulary ("▁" as a space) and strings it lacks: top-k candidates.
POOL = [" The", " is", " a", "1", "2", " bird", ".", " So", "The", "zq", " fish~", "##"]
TINY = [
    "T5Config.emb_dim = 16", "T5Config.num_heads = 2", "T5Config.head_dim = 8",
    "T5Config.mlp_dim = 32", "T5Config.num_encoder_layers = 1", "T5Config.num_decoder_layers = 1",
    "BATCH_SIZE = 8", "LOG_PERIOD = 1",
    "train.eval_at_end = False", "train.async_checkpointing = False",
]  # fmt: skip


def _teacher_entry(rng: np.random.Generator, id_: str, objective: str, text: str):
    """A character-chunk teacher: pieces of 1 to 3 characters (the first sometimes with a
    dummy-prefix space), EOS, and at each position a random distribution over its own piece and
    five candidates of POOL, with mass left for the rest of its vocabulary."""
    pieces, pos = [], 0
    while pos < len(text):
        n = int(rng.integers(1, 4))
        pieces.append(text[pos : pos + n])
        pos += n
    if rng.random() < 0.5:
        pieces[0] = " " + pieces[0]
    pieces.append("</s>")
    own, top = [], []
    for piece in pieces:
        cands = list(dict.fromkeys([piece, *rng.choice(POOL, 5, replace=False)]))
        logits = rng.normal(size=len(cands) + 1) * 2  # the last: the rest of the vocabulary
        lps = logits - np.log(np.exp(logits).sum())
        order = np.argsort(-lps[:-1])[:K]
        top.append(tuple((cands[i], float(lps[i])) for i in order))
        own.append(float(lps[0]))
    spans = cross_tokenizer.piece_spans(pieces, text, id_)
    return cross_tokenizer.Entry(
        id_, objective, text, tuple(pieces), tuple(spans), tuple(own), tuple(top)
    )


@pytest.fixture(scope="module")
def pieces_file(tmp_path_factory):
    """A pieces file of every arith_dss train example: (path, entries, vocabulary)."""
    import distill_sbs.tasks  # noqa: F401

    from distill_sbs.data import registry

    rng = np.random.default_rng(0)
    entries = [
        _teacher_entry(rng, ex["id"], name, ex["targets"])
        for o, name in enumerate(["label", "rationale"])
        for ex in registry.build_examples("arith", "dss", o, "train")
    ]
    path = str(tmp_path_factory.mktemp("pieces") / "arith.pieces.jsonl")
    cross_tokenizer.save(path, entries)
    return path, entries, seqio.SentencePieceVocabulary(ARITH_SPM, extra_ids=0)


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _parse(files: list[str], bindings: list[str]) -> None:
    gin.clear_config()
    cli.parse_gin(files, [*TINY, *bindings])


def _losses(model_dir: str) -> dict[int, dict]:
    with open(os.path.join(model_dir, "train_metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


# ---- the features through the pipeline --------------------------------------------------------


@pytest.mark.parametrize("pack", [True, False])
def test_features_survive_packing_and_cut_targets(pieces_file, pack):
    """The batch's encoded features decode (cross_tokenizer.decode_features) to exactly what
    cross_tokenizer.features gives each example cut to the target length, at its segment's
    place in the row; a span cut by the target length has no term."""
    from distill_sbs import data

    path, entries, vocab = pieces_file
    by_input = _by_input(entries, vocab)
    gin.bind_parameter("teacher_pieces_path.path", path)
    length = 24  # cuts the rationales
    ds = data.get_dataset(
        "arith_dss", task_feature_lengths={"inputs": 64, "targets": length}, split="train",
        batch_size=8, shuffle=False, pack=pack, repeat=False,
    )  # fmt: skip
    batch = next(ds.as_numpy_iterator())
    got = jax.tree.map(np.asarray, cross_tokenizer.decode_features(batch))
    lookup = cross_tokenizer.sentencepiece_lookup(vocab.tokenizer)
    cut = 0
    for r, pos, entry in _segments(batch, by_input):
        ids = [*vocab.encode(entry.target), 1]
        pieces = cross_tokenizer.sentencepiece_text(vocab.tokenizer, ids)
        want = cross_tokenizer.features(entry, ids, pieces, lookup, K, len(pos))
        want["xt_last"] = np.where(want["xt_kind"] == cross_tokenizer.SPAN, want["xt_last"], 0)
        want["xt_last"] = want["xt_last"] + pos[0]
        seg = {name: v[r, pos] for name, v in got.items()}
        seg["xt_last"] = np.where(seg["xt_kind"] == cross_tokenizer.SPAN, seg["xt_last"], pos[0])
        for name in cross_tokenizer.FEATURES:
            np.testing.assert_array_equal(seg[name], want[name], err_msg=name)
        cut += len(ids) > length
    assert cut > 0  # some targets were cut
    assert (got["xt_kind"] == cross_tokenizer.SPAN).any() and (got["xt_valid"]).any()
    if pack:
        assert batch["decoder_segment_ids"].max() > 1  # several examples per row


def _by_input(entries, vocab) -> dict:
    """(input token ids with EOS, objective id) -> entry: how a batch's segment finds its entry
    (arith_dss's train inputs are unique per objective)."""
    import distill_sbs.tasks  # noqa: F401

    from distill_sbs.data import registry

    out = {}
    index = {(e.id, e.objective): e for e in entries}
    for o, name in enumerate(["label", "rationale"]):
        for ex in registry.build_examples("arith", "dss", o, "train"):
            out[(tuple(vocab.encode(ex["inputs"])) + (1,), o)] = index[(ex["id"], name)]
    return out


def _segments(batch, by_input):
    """(row, target positions, entry) of each example in a feature-converted batch."""
    enc, tgt = batch["encoder_input_tokens"], batch["decoder_target_tokens"]
    packed = "decoder_segment_ids" in batch
    for r in range(tgt.shape[0]):
        seg = batch["decoder_segment_ids"][r] if packed else (tgt[r] > 0).astype(int)
        enc_seg = batch["encoder_segment_ids"][r] if packed else (enc[r] > 0).astype(int)
        for s in np.unique(seg[seg > 0]):
            pos = np.flatnonzero(seg == s)
            objective = int(batch["decoder_objective_ids"][r, pos[0]])
            yield r, pos, by_input[(tuple(enc[r, enc_seg == s]), objective)]


# ---- the first step's loss against numpy ------------------------------------------------------


def _np_kl(a, b):
    m = a > 0
    return float(np.sum(a[m] * (np.log(a[m]) - np.log(b[m]))))


def _span_values(entry, ids, q, lookup, tok) -> np.ndarray:
    """Forward KL per student token of one target, from the entry and the alignment (float64)."""
    out = np.zeros(len(ids))
    pieces = [token_text(tok, int(i)) for i in ids]
    spans = cross_tokenizer.piece_spans(pieces, entry.target, "s")
    for t0, t1, s0, s1 in cross_tokenizer.align(entry.spans, spans, len(entry.target)):
        if t1 - t0 == 1 and s1 - s0 == 1:
            cls = {}
            for piece, lp in entry.top[t0][:K]:
                if lookup(piece) is not None:
                    cls[lookup(piece)] = np.exp(lp)
            cls.setdefault(int(ids[s0]), np.exp(entry.logprobs[t0]))
            p = np.array([*cls.values(), max(1 - sum(cls.values()), 1e-6)])
            qs = q[s0, list(cls)]
            out[s0] = _np_kl(p, np.array([*qs, 1 - qs.sum()]))
        else:
            big_p = np.exp(sum(entry.logprobs[t0:t1]))
            big_q = np.prod([q[j, ids[j]] for j in range(s0, s1)])
            out[s0] = _np_kl(np.array([big_p, 1 - big_p]), np.array([big_q, 1 - big_q]))
    return out


def _uld_values(entry, ids, q) -> np.ndarray:
    out = np.zeros(len(ids))
    q_top = -np.sort(-q, axis=-1)[:, :K]
    for j in range(min(len(entry.tokens), len(ids))):
        p = np.zeros(K)
        top = sorted((np.exp(lp) for _, lp in entry.top[j]), reverse=True)
        p[: len(top)] = top
        out[j] = np.abs(p - q_top[j]).sum()
    return out


def _numpy_loss(loss: str, batch, logits, by_input, vocab, gammas) -> float:
    """sum_k w_k CE_k / N_k + sum_k gamma_k D_k / N_k over the batch, in float64."""
    from distill_sbs import data

    weights = np.asarray([o.weight for o in data.get_objectives("arith_dss")])
    x = logits.astype(np.float64)
    q = np.exp(x - x.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    lookup = cross_tokenizer.sentencepiece_lookup(vocab.tokenizer)
    ce, div, n = np.zeros(2), np.zeros(2), np.zeros(2)
    for r, pos, entry in _segments(batch, by_input):
        ids = batch["decoder_target_tokens"][r, pos]
        o = int(batch["decoder_objective_ids"][r, pos[0]])
        qr = q[r, pos]
        if loss == "span":
            d = _span_values(entry, ids, qr, lookup, vocab.tokenizer)
        else:
            d = _uld_values(entry, ids, qr)
        ce[o] += -np.log(qr[np.arange(len(ids)), ids]).sum()
        div[o] += d.sum()
        n[o] += len(ids)
    return float(np.sum(weights * ce / n) + np.sum(np.asarray(gammas) * div / n))


def _first_batch_and_logits():
    """The run's first batch and the student's logits on it at its initial parameters."""
    from distill_sbs import train
    from distill_sbs.models import EncoderDecoderModel
    from distill_sbs.network import Packing, T5Config

    cfg = train.TrainConfig()
    batch = next(train.train_batches(cfg))
    model = EncoderDecoderModel(T5Config())
    params = model.init_params(jax.random.PRNGKey(cfg.seed))
    logits = jax.jit(model.logits)(
        params, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        packing=Packing.from_features(batch),
    )  # fmt: skip
    return batch, np.asarray(logits)


SPAN_RUN = ["kd/arith_student.gin", "kd/arith_kd_pieces.gin"]


def _span_bindings(pieces: str, model_dir: str) -> list[str]:
    return [f"PIECES_FILE = '{pieces}'", "TRAIN_STEPS = 2", f"MODEL_DIR = '{model_dir}'"]


@pytest.fixture(scope="module")
def span_run(pieces_file, tmp_path_factory) -> str:
    """MODEL_DIR of kd/arith_kd_pieces.gin (span, forward KL, packed), 2 steps uninterrupted:
    the reference of the tests below (one run shared)."""
    from distill_sbs import train

    model_dir = str(tmp_path_factory.mktemp("span_run") / "full")
    _parse(SPAN_RUN, _span_bindings(pieces_file[0], model_dir))
    train.train()
    gin.clear_config()
    return model_dir


@pytest.mark.slow  # one short training run (shared)
def test_span_run_through_gin_packed_matches_numpy(pieces_file, span_run):
    """kd/arith_kd_pieces.gin (span, forward KL), packed batches: the first step's loss is CE +
    0.5 * the span-aligned term computed in numpy on the same batch."""
    path, entries, vocab = pieces_file
    _parse(SPAN_RUN, _span_bindings(path, span_run))  # the run's config, for its first batch
    batch, logits = _first_batch_and_logits()
    assert "decoder_segment_ids" in batch and "decoder_pieces" in batch  # packed, with features
    got = _losses(span_run)[1]
    want = _numpy_loss("span", batch, logits, _by_input(entries, vocab), vocab, (0.5, 0.5))
    assert got["label/divergence"] > 0 and got["rationale/divergence"] > 0
    np.testing.assert_allclose(got["loss"], want, rtol=1e-5)


@pytest.mark.slow  # one short training run
def test_uld_run_through_gin_unpacked_matches_numpy(pieces_file, tmp_path):
    """KD.cross_tokenizer = 'uld', unpacked batches: the first step's loss is CE + 0.5 * ULD
    computed in numpy on the same batch."""
    from distill_sbs import train

    path, entries, vocab = pieces_file
    _parse(
        ["kd/arith_student.gin", "kd/arith_kd_pieces.gin"],
        [f"PIECES_FILE = '{path}'", "TRAIN_STEPS = 1", f"MODEL_DIR = '{tmp_path / 'uld'}'",
         "KD.cross_tokenizer = 'uld'", "train.pack = False"],
    )  # fmt: skip
    train.train()
    batch, logits = _first_batch_and_logits()
    assert "decoder_segment_ids" not in batch
    want = _numpy_loss("uld", batch, logits, _by_input(entries, vocab), vocab, (0.5, 0.5))
    np.testing.assert_allclose(_losses(str(tmp_path / "uld"))[1]["loss"], want, rtol=1e-5)


# ---- bad input --------------------------------------------------------------------------------


def test_bad_settings_and_files_are_one_line_each(pieces_file, tmp_path):
    path, entries, vocab = pieces_file

    def build(pieces=None, topk_file=None, **kd):
        gin.bind_parameter("teacher_pieces_path.path", pieces)
        gin.bind_parameter("teacher_topk_path.path", topk_file)
        kd = distillation.KD(weights={"label": 1.0}, **kd)
        return distillation.build_teacher(kd, 256, create_partitioner())

    assert isinstance(build(path, cross_tokenizer="span"), distillation.CrossTokenizerPieces)
    cases = [
        (dict(pieces=str(tmp_path / "no.jsonl"), cross_tokenizer="span"), "no such pieces file"),
        (dict(pieces=path), r"is a teacher of another tokenizer: set KD.cross_tokenizer"),
        (dict(cross_tokenizer="uld"), r"'uld' reads a pieces file: set teacher_pieces_path.path"),
        (dict(pieces=path, cross_tokenizer="span", teacher="/t"), "not KD.teacher=/t: unset one"),
        (dict(pieces=path, topk_file="/t.npz", cross_tokenizer="span"), "name two teachers"),
        (dict(pieces=path, cross_tokenizer="span", on_policy_fraction=0.5),
         r"cannot score the student's samples \(KD.on_policy_fraction=0.5\)"),
        (dict(pieces=path, cross_tokenizer="span", topk=2), "unset KD.topk"),
        (dict(pieces=path, cross_tokenizer="span", temperature=2.0), "has no temperature"),
        (dict(pieces=path, cross_tokenizer="span", kind="skew_kl"), "not KD.kind='skew_kl'"),
        (dict(pieces=path, cross_tokenizer="uld", kind="jsd"), "KD.kind='jsd' does not apply"),
    ]  # fmt: skip
    for kw, needle in cases:
        with pytest.raises(UserError, match=needle) as e:
            build(**kw)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"KD.cross_tokenizer='gold': expected one of"):
        distillation.KD(weights={"label": 1.0}, cross_tokenizer="gold")
    with pytest.raises(UserError, match="no such pieces file"):
        cross_tokenizer.load(str(tmp_path / "no.jsonl"))
    # An example the file lacks, and a file written for other target texts.
    examples = [{"id": entries[0].id, "targets": entries[0].target}]
    index = {(e.id, e.objective): e for e in entries}
    cross_tokenizer.attach(examples, index, vocab, entries[0].objective, path)
    with pytest.raises(UserError, match=r"no pieces entry for example 'arith-train-0' \(objec"):
        cross_tokenizer.attach(examples, index, vocab, "other", path)
    with pytest.raises(UserError, match="is '0' in the file but '7' in the records"):
        cross_tokenizer.attach([{**examples[0], "targets": "7"}], index, vocab, "label", path)


# ---- on-policy distillation (GKD) through gin -------------------------------------------------


@pytest.mark.slow  # three short training runs with sampling in the step
def test_on_policy_run_through_gin_resumes_identically(tmp_path):
    """kd/arith_kd.gin with KD.on_policy_fraction = 0.5 (a local teacher, unpacked): the student
    samples half of each batch's targets (sampled_tokens > 0); stopped after 1 step and resumed,
    both steps' losses equal the uninterrupted run's (the samples' key is the step's)."""
    from distill_sbs import train

    teacher = save_tiny_checkpoint(str(tmp_path / "teacher"), ARITH_SPM, seed=1)
    files = ["kd/arith_student.gin", "kd/arith_kd.gin"]
    common = [f"TEACHER_DIR = '{teacher}'", "TRAIN_STEPS = 2", "train.pack = False",
              "KD.on_policy_fraction = 0.5", "KD.kind = 'jsd'", "TASK_FEATURE_LENGTHS = "
              "{'inputs': 64, 'targets': 32}"]  # fmt: skip
    full, parts = str(tmp_path / "full"), str(tmp_path / "parts")
    _parse(files, [*common, f"MODEL_DIR = '{full}'"])
    train.train()
    _parse(files, [*common, f"MODEL_DIR = '{parts}'", "train.stop_after_steps = 1"])
    train.train()
    _parse(files, [*common, f"MODEL_DIR = '{parts}'"])
    train.train()
    ref, got = _losses(full), _losses(parts)
    assert ref[1]["rationale/sampled_tokens"] + ref[1]["label/sampled_tokens"] > 0
    for step in (1, 2):
        np.testing.assert_allclose(got[step]["loss"], ref[step]["loss"], rtol=1e-6)
        for name in ("label", "rationale"):
            key = f"{name}/sampled_tokens"
            assert got[step][key] == ref[step][key]


# ---- a cross-tokenizer run stopped and resumed, and on a simulated mesh -----------------------


def _params(model_dir: str) -> list[np.ndarray]:
    import distill_sbs

    return [np.asarray(x) for x in jax.tree.leaves(distill_sbs.load(model_dir)[1])]


@pytest.mark.slow  # two short training runs beside the shared uninterrupted one
def test_span_run_resumes_identically(pieces_file, span_run, tmp_path):
    """Stopped after step 1 and resumed from its checkpoint, the span run's losses and final
    parameters equal the uninterrupted run's: the pieces features come back with the resumed
    data stream at its position."""
    from distill_sbs import train

    parts = str(tmp_path / "parts")
    common = _span_bindings(pieces_file[0], parts)
    _parse(SPAN_RUN, [*common, "train.stop_after_steps = 1"])
    train.train()
    assert sorted(_losses(parts)) == [1]
    _parse(SPAN_RUN, common)
    train.train()
    ref, got = _losses(span_run), _losses(parts)
    assert ref[2]["loss"] != ref[1]["loss"]
    for step in (1, 2):
        for key in ("loss", "label/divergence", "rationale/divergence"):
            np.testing.assert_allclose(got[step][key], ref[step][key], rtol=1e-6, err_msg=key)
    for a, b in zip(_params(parts), _params(span_run), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def _mesh_run(pieces: str, model_dir: str) -> None:
    """The span run of `span_run` on every device (a data-parallel mesh: the default)."""
    from distill_sbs import train

    assert jax.device_count() == 2, jax.devices()
    _parse(SPAN_RUN, _span_bindings(pieces, model_dir))
    train.train()


@pytest.mark.slow  # one short training run in a subprocess
def test_span_run_on_a_two_device_mesh_equals_one_device(
    pieces_file, span_run, tmp_path, subprocess_env
):
    """The same span run on a simulated 2-device data-parallel mesh (the pieces features sharded
    with the batch rows): both steps' losses equal one device's (step 2's after the sharded
    update of step 1)."""
    env = dict(subprocess_env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    model_dir = str(tmp_path / "mesh")
    cmd = [sys.executable, os.path.abspath(__file__), "mesh", pieces_file[0], model_dir]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    ref, got = _losses(span_run), _losses(model_dir)
    for step in (1, 2):
        for key in ("loss", "label/divergence", "rationale/divergence"):
            np.testing.assert_allclose(got[step][key], ref[step][key], rtol=1e-5, err_msg=key)


@pytest.mark.slow  # compiles the loss at two batch shapes
def test_microbatches_add_up_to_the_batch(pieces_file):
    """The trainer's gradient accumulation: each microbatch decodes its own rows' features, and
    with the full batch's token counts the microbatch losses sum to the batch's (packed)."""
    from _tiny_t5 import tiny_config

    from distill_sbs import data
    from distill_sbs.losses import ObjectiveLoss
    from distill_sbs.models import EncoderDecoderModel

    path, _, _ = pieces_file
    gin.bind_parameter("teacher_pieces_path.path", path)
    ds = data.get_dataset(
        "arith_dss", task_feature_lengths={"inputs": 64, "targets": 64}, split="train",
        batch_size=4, shuffle=False, pack=True, repeat=False,
    )  # fmt: skip
    batch = jax.tree.map(jax.numpy.asarray, next(ds.as_numpy_iterator()))
    model = EncoderDecoderModel(tiny_config())
    params = model.init_params(jax.random.PRNGKey(0))
    loss = ObjectiveLoss((0.5, 0.5), divergence_weights=(0.5, 0.5), divergence="jsd", beta=0.3)
    teacher = distillation.CrossTokenizerPieces("span")
    counts = loss.token_counts(batch)

    @jax.jit
    def value(b):
        return model.loss_fn(params, b, None, loss, counts, teacher=teacher(None, b))

    full, metrics = value(batch)
    halves = [value(jax.tree.map(lambda x, i=i: x[i::2], batch)) for i in (0, 1)]
    np.testing.assert_allclose(float(full), sum(float(h[0]) for h in halves), rtol=1e-6)
    parts = halves[0][1]["div_sum"] + halves[1][1]["div_sum"]
    np.testing.assert_allclose(metrics["div_sum"], parts, rtol=1e-5)
    assert np.all(np.asarray(metrics["div_sum"]) > 0)


if __name__ == "__main__" and sys.argv[1:2] == ["mesh"]:
    _mesh_run(*sys.argv[2:4])
