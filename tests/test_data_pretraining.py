"""Span-corruption pretraining (distill_sbs.data.pretraining) against T5's published algorithm.

The oracle is `_reference`, written here from the paper's description (Raffel et al. 2020, 3.1.4
and 3.3.4; T5's random_spans_noise_mask docstring): round(length * density) noise tokens in
round(noise / mean span) spans, spans alternating non-noise then noise, all such masks equally
likely; each noise span replaced by one sentinel in the inputs, the targets the spans after
their sentinels (and a final sentinel when the text ends with non-noise), sentinels counted down
from the vocabulary's last id. It shares with the module only the random draw protocol (which
`rng` calls, in which order), so that fixed seeds give comparable outputs; the mask and the
outputs are built by plain loops. Statistics over many draws check what a shared protocol could
not hide: the counts, and that every composition of the spans is equally likely.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter

import distill_sbs.tasks  # noqa: F401  (registers world_*)
import gin
import numpy as np
import pytest
import seqio
from _tiny_t5 import tiny_config

import distill_sbs.optimizers  # noqa: F401  (registers create_optimizer)
from distill_sbs.data import TRAINING_METHODS, get_dataset, pretraining, world
from distill_sbs.data.records import RecordError

VOCAB = 1000  # sentinels 999, 998, ...


def _round_half_even(x: float) -> int:
    return int(round(x))  # Python's round, like tf.round and np.round


def _reference(tokens, seed, first=VOCAB - 1, density=0.15, mean=3.0, roll=False):
    """(inputs, targets) without EOS, from the paper's description."""
    rng = np.random.default_rng(seed)
    n = len(tokens)
    length = max(n, 2)
    noise = min(max(_round_half_even(length * density), 1), length - 1)
    spans = max(_round_half_even(noise / mean), 1)

    def parts(total):  # a uniformly random composition of `total` into `spans` positive parts
        if spans == 1:
            return [total]
        cuts = sorted(int(c) + 1 for c in rng.choice(total - 1, spans - 1, replace=False))
        bounds = [0] + cuts + [total]
        return [bounds[i + 1] - bounds[i] for i in range(spans)]

    noise_parts = parts(noise)
    keep_parts = parts(length - noise)
    mask = []
    for keep, drop in zip(keep_parts, noise_parts, strict=True):
        mask += [False] * keep + [True] * drop
    if roll:
        shift = int(rng.integers(length))
        mask = mask[length - shift :] + mask[: length - shift]
    mask = mask[:n]
    inputs, targets, sentinel = [], [], first
    for i, t in enumerate(tokens):
        if not mask[i]:
            inputs.append(t)
            continue
        if i == 0 or not mask[i - 1]:  # a span starts: its sentinel
            inputs.append(sentinel)
            targets.append(sentinel)
            sentinel -= 1
        targets.append(t)
    if n == 0 or not mask[-1]:  # the text ends with non-noise: a final sentinel
        targets.append(sentinel)
    return inputs, targets


def _tokens(n, seed=0):
    return np.random.default_rng(seed + 10_000).integers(3, 500, n).astype(np.int32)


@pytest.mark.parametrize("roll", [False, True])
def test_exact_outputs_match_the_reference(roll):
    for n in (1, 2, 3, 4, 7, 10, 13, 20, 33, 60, 114, 568):
        for seed in range(40):
            tokens = _tokens(n, seed)
            got = pretraining.span_corrupt(
                tokens, np.random.default_rng(seed), VOCAB - 1, random_roll=roll
            )
            want = _reference(list(tokens), seed, roll=roll)
            assert [list(g) for g in got] == [list(w) for w in want], (n, seed)


def test_the_papers_example():
    words = "Thank you for inviting me to your party last week .".split()
    ids = {w: i + 3 for i, w in enumerate(words)}
    tokens = np.array([ids[w] for w in words])
    mask = np.array([w in ("for", "inviting", "last") for w in words])
    name = {**{v: k for k, v in ids.items()}, 99: "<X>", 98: "<Y>", 97: "<Z>"}
    inputs = pretraining.sentinel_spans(tokens, mask, 99)
    targets = pretraining.sentinel_spans(tokens, ~mask, 99)
    assert " ".join(name[int(t)] for t in inputs) == "Thank you <X> me to your party <Y> week ."
    assert " ".join(name[int(t)] for t in targets) == "<X> for inviting <Y> last <Z>"


def test_t5s_masks_start_with_non_noise_and_end_with_noise():
    for seed in range(200):
        mask = pretraining.random_spans_noise_mask(50, np.random.default_rng(seed))
        assert not mask[0] and mask[-1]
        inputs, targets = pretraining.span_corrupt(_tokens(50), np.random.default_rng(seed), 999)
        spans = (mask[1:] & ~mask[:-1]).sum()  # mask[0] is non-noise
        assert inputs[-1] == 999 + 1 - spans  # the last sentinel ends the inputs
        assert targets[0] == 999 and targets[-1] < 500  # T5: no final sentinel in the targets


@pytest.mark.parametrize("length", [100, 568])
def test_noise_fraction_span_count_and_mean_span_length(length):
    noise = _round_half_even(length * 0.15)
    spans = _round_half_even(noise / 3.0)
    span_lengths = []
    for seed in range(500):
        mask = pretraining.random_spans_noise_mask(length, np.random.default_rng(seed))
        starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
        ends = np.flatnonzero(mask & ~np.concatenate([mask[1:], [False]]))
        assert mask.sum() == noise  # 15 (of 100) and 85 (of 568): density 0.15 up to rounding
        assert len(starts) == spans  # T5's rounding: 5 and 28
        span_lengths += list(ends - starts + 1)
        inputs, targets = pretraining.span_corrupt(
            _tokens(length, seed), np.random.default_rng(seed), 999
        )
        assert len(inputs) == length - noise + spans and len(targets) == noise + spans
    assert abs(np.mean(span_lengths) - noise / spans) < 1e-9  # mean span length about 3
    assert abs(noise / spans - 3.0) < 0.1


def test_every_span_composition_is_equally_likely():
    """The first noise span's length follows the law of a uniform composition of `noise` tokens
    into `spans` parts: P(j) = C(noise - j - 1, spans - 2) / C(noise - 1, spans - 1); likewise the
    first non-noise span's (the position of the first noise token)."""
    length, draws = 40, 6000
    noise, spans = 6, 2
    first_noise, first_keep = Counter(), Counter()
    for seed in range(draws):
        mask = pretraining.random_spans_noise_mask(length, np.random.default_rng(seed))
        start = int(np.argmax(mask))
        first_keep[start] += 1
        first_noise[int(np.argmin(mask[start:]))] += 1
    for counts, total in ((first_noise, noise), (first_keep, length - noise)):
        for j in range(1, total - spans + 2):
            p = math.comb(total - j - 1, spans - 2) / math.comb(total - 1, spans - 1)
            sd = math.sqrt(draws * p * (1 - p))
            assert abs(counts[j] - draws * p) < 5 * sd + 1, (j, counts[j], draws * p)


def test_random_roll_spreads_the_noise_over_positions():
    length, draws = 12, 4000
    hits = np.zeros(length)
    for seed in range(draws):
        hits += pretraining.random_spans_noise_mask(
            length, np.random.default_rng(seed), random_roll=True
        )
    expected = draws * 2 / length  # round(12 * 0.15) = 2 noise tokens
    assert np.all(np.abs(hits - expected) < 5 * math.sqrt(expected))


def test_chunk_length_is_t5s_random_spans_helper():
    assert pretraining.chunk_length(512, 0.15, 3.0) == (568, 114)  # T5's published sizes
    for inputs in (8, 30, 64, 128, 333):
        n, targets = pretraining.chunk_length(inputs, 0.15, 3.0)
        got = pretraining.span_corrupt(_tokens(n), np.random.default_rng(0), 999)
        assert len(got[0]) + 1 <= inputs and len(got[1]) + 1 == targets
        longer = pretraining.span_corrupt(_tokens(n + 1), np.random.default_rng(0), 999)
        assert len(longer[0]) + 1 > inputs


# ---- the SeqIO task -----------------------------------------------------------------------


def _fill(inputs: list[int], targets: list[int], first: int) -> list[int]:
    """The original tokens: each sentinel of the inputs replaced by its span from the targets."""
    spans, current = {}, None
    for t in targets:
        if t > first - 100:
            current = t
            spans[t] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs:
        out += spans[t] if t > first - 100 else [t]
    return out


def _examples(name, lengths, epochs=1, seed=0):
    ds = seqio.get_mixture_or_task(name).get_dataset(
        lengths, split="train", shuffle=False, seed=seed, num_epochs=epochs
    )
    return list(ds.as_numpy_iterator())


def test_task_over_text_files_corrupts_every_document_and_redraws_each_epoch(tmp_path):
    vocab = world.vocabulary()
    first = vocab.vocab_size - 1
    docs = list(world.corpus()[:6]) + [" ".join(world.corpus()[6:12])]  # one long document
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(docs[:4]) + "\n\n")
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    pretraining.register_span_corruption_task(
        "t_text", vocabulary=vocab, files={"train": str(text)}
    )
    pretraining.register_span_corruption_task(
        "t_jsonl", vocabulary=vocab, files={"train": [str(jsonl)]}, text_field="text"
    )
    lengths = {"inputs": 40, "targets": 16}
    size, _ = pretraining.chunk_length(40, 0.15, 3.0)
    assert len(_examples("t_text", lengths)) == 4
    examples = _examples("t_jsonl", lengths, epochs=2)
    chunks = []
    for d in docs:
        ids = vocab.encode(d)
        chunks += [ids[i : i + size] for i in range(0, len(ids), size)]
    assert len(examples) == 2 * len(chunks) and len(chunks) > len(docs)  # the long one is cut
    for ex, chunk in zip(examples, chunks + chunks, strict=True):
        inputs, targets = list(ex["inputs"]), list(ex["targets"])
        assert inputs[-1] == 1 and targets[-1] == 1  # EOS
        assert len(inputs) <= 40 and len(targets) <= 16
        assert targets[0] == first  # <extra_id_0>
        assert _fill(inputs[:-1], targets[:-1], first) == chunk
    epoch1, epoch2 = examples[: len(chunks)], examples[len(chunks) :]
    assert any(list(a["inputs"]) != list(b["inputs"]) for a, b in zip(epoch1, epoch2, strict=True))
    again = _examples("t_jsonl", lengths, epochs=2)
    assert all(list(a["inputs"]) == list(b["inputs"]) for a, b in zip(examples, again, strict=True))
    other = _examples("t_jsonl", lengths, epochs=1, seed=1)
    assert any(list(a["inputs"]) != list(b["inputs"]) for a, b in zip(epoch1, other, strict=True))


def test_batches_are_packed():
    batch = next(
        get_dataset(
            "world_span_corruption",
            task_feature_lengths={"inputs": 128, "targets": 32},
            split="train",
            batch_size=4,
            seed=0,
        ).as_numpy_iterator()
    )
    assert batch["encoder_segment_ids"].max(axis=1).min() >= 3  # several documents per row
    assert (batch["decoder_objective_ids"] == 0).all()


def test_pretraining_mixture_packs_corrupted_documents_beside_fact_questions():
    vocab = world.vocabulary()
    batch = next(
        get_dataset(
            "world_pretraining",
            task_feature_lengths={"inputs": 128, "targets": 48},  # gin/world/pretrain.gin's
            split="train",
            batch_size=16,
            seed=0,
        ).as_numpy_iterator()
    )
    assert (batch["decoder_objective_ids"] == 0).all()  # one objective: plain pretraining
    questions = {q for q, _ in world.fact_questions("train")}
    answers = {a for _, a in world.fact_questions("train")}
    sentinel = vocab.vocab_size - 1
    kinds = Counter()
    for row in range(16):
        for segment in range(1, batch["encoder_segment_ids"][row].max() + 1):
            ids = batch["encoder_input_tokens"][row][batch["encoder_segment_ids"][row] == segment]
            target = batch["decoder_target_tokens"][row][
                batch["decoder_segment_ids"][row] == segment
            ]
            text = vocab.decode(ids.tolist())
            if sentinel in ids:  # a corrupted document
                kinds["document"] += 1
            else:  # a fact question, its answer the target as written
                assert text in questions and vocab.decode(target.tolist()) in answers, text
                kinds["question"] += 1
    assert kinds["document"] >= 16 and kinds["question"] >= 16, kinds


def test_text_pairs_task_refuses_an_empty_split():
    pretraining.register_text_pairs_task(
        "t_pairs_empty", vocabulary=world.vocabulary(), pairs=lambda split: ()
    )
    with pytest.raises(ValueError, match="no examples on split 'train'"):
        seqio.get_mixture_or_task("t_pairs_empty").get_dataset(
            {"inputs": 16, "targets": 16}, split="train"
        )


def test_bad_sources_are_refused(tmp_path):
    vocab = world.vocabulary()
    path = tmp_path / "c.jsonl"
    path.write_text('{"body": "x y z"}\n')
    pretraining.register_span_corruption_task(
        "t_bad", vocabulary=vocab, files={"train": str(path)}, text_field="text"
    )
    with pytest.raises(RecordError, match=r"c.jsonl:1: no string field 'text'"):
        list(pretraining.read_documents(str(path), "text"))
    with pytest.raises(ValueError, match="extra ids"):
        pretraining.register_span_corruption_task(
            "t_bad", vocabulary=seqio.PassThroughVocabulary(10), documents=lambda s: ["a"]
        )


# ---- a pretrained checkpoint initialises every method ------------------------------------


@pytest.fixture
def _gin():
    gin.clear_config()
    gin.bind_parameter("create_optimizer.name", "adamw")
    yield
    gin.clear_config()


def test_pretrained_checkpoint_initialises_every_method(tmp_path, _gin, capsys):
    """Pretrain a tiny student a few steps; every method's run loads it as its initial checkpoint
    (each parameter checked against the method's model), and a DSS step at learning rate 0
    leaves the parameters the pretrained ones, bit for bit."""
    import jax

    from distill_sbs import checkpoints
    from distill_sbs.train import train

    config = tiny_config(vocab_size=1152)
    common = dict(batch_size=4, model_config=config, log_period=1, checkpoint_period=0)
    common.update(eval_at_end=False, async_checkpointing=False)
    gin.bind_parameter("create_optimizer.learning_rate", 1e-2)
    pretrained = str(tmp_path / "pretrained")
    train(
        model_dir=pretrained,
        mixture_or_task_name="world_span_corruption",
        task_feature_lengths={"inputs": 64, "targets": 16},
        train_steps=3,
        **common,
    )
    want = checkpoints.load_native(pretrained).params
    gin.bind_parameter("create_optimizer.learning_rate", 0.0)
    lengths = {"inputs": 48, "targets": 48}
    for method in TRAINING_METHODS:  # set up and initialised, no step (one compile in all)
        capsys.readouterr()
        train(
            model_dir=str(tmp_path / method),
            mixture_or_task_name=f"world_{method}",
            task_feature_lengths=lengths,
            train_steps=1,
            stop_after_steps=0,
            initial_checkpoint_path=pretrained,
            **common,
        )
        assert f"initialised from {pretrained}" in capsys.readouterr().out, method
    model_dir = str(tmp_path / "dss_step")
    train(
        model_dir=model_dir,
        mixture_or_task_name="world_dss",
        task_feature_lengths=lengths,
        train_steps=1,
        initial_checkpoint_path=pretrained,
        **common,
    )
    got = checkpoints.load_native(model_dir).params
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), got, want)
    assert all(jax.tree_util.tree_leaves(same))
    assert os.path.isdir(os.path.join(model_dir, "checkpoint_1"))
