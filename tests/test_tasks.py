"""Registered tasks and mixtures: what each method builds (exactly, on a hand-made record set),
batches, objective ids, gin knobs, subsampling, evaluation."""

import os

import gin
import numpy as np
import pytest
import seqio
from _shared_data import DSS_DIR
from _shared_data import T5_VOCAB as VOCAB

needs_dss = pytest.mark.usefixtures("dss_dir")  # fails, naming the path, where it is absent
LENGTHS = {"inputs": 64, "targets": 48}


@pytest.fixture(scope="module", autouse=True)
def environment():
    old = {k: os.environ.get(k) for k in ("DISTILL_SBS_DATA_DIR", "DISTILL_SBS_VOCAB")}
    os.environ["DISTILL_SBS_DATA_DIR"] = str(DSS_DIR)
    os.environ["DISTILL_SBS_VOCAB"] = str(VOCAB)
    import distill_sbs.tasks  # noqa: F401  (registers; must not touch the filesystem)

    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def gin_scope():
    gin.clear_config()
    yield gin
    gin.clear_config()


def _batches(name, n=2, lengths=LENGTHS, **kw):
    from distill_sbs import data

    kw.setdefault("seed", 0)
    ds = data.get_dataset(name, task_feature_lengths=lengths, split="train", batch_size=4, **kw)
    return list(ds.take(n).as_numpy_iterator())


def _token_targets(dataset, method, vocab):
    """objective id -> set of token tuples (with EOS, trimmed) of its training targets."""
    from distill_sbs.data import registry

    out = {}
    for k in range(len(registry.objectives(dataset, method))):
        examples = registry.build_examples(dataset, method, k, "train")
        out[k] = {
            tuple((vocab.encode(e["targets"])[: LENGTHS["targets"] - 1]) + [1]) for e in examples
        }
    return out


def _check_alignment(batches, targets_by_objective):
    seen = set()
    for b in batches:
        tokens, ids = b["decoder_target_tokens"], b["decoder_objective_ids"]
        np.testing.assert_array_equal(b["decoder_loss_weights"], (tokens != 0).astype(int))
        assert (ids[tokens == 0] == 0).all()
        for row in range(tokens.shape[0]):
            segs = b["decoder_segment_ids"][row]
            for s in set(segs[segs > 0].tolist()):
                mask = segs == s
                objective = set(ids[row][mask].tolist())
                assert len(objective) == 1, "one objective id per packed example"
                k = objective.pop()
                seg = tuple(tokens[row][mask].tolist())
                if len(seg) < LENGTHS["targets"]:  # whole (not cut by the packing length)
                    assert seg in targets_by_objective[k], (
                        f"segment is not a target of objective {k}"
                    )
                seen.add(k)
    return seen


def test_registration_reads_no_files():
    from distill_sbs.data import registry

    assert "cqa" in registry._DATASETS and "svamp_multiteacher" in seqio.MixtureRegistry.names()
    for method in ("finetune", "distill", "cot"):
        assert f"esnli_{method}" in seqio.TaskRegistry.names()


def test_objectives_and_weights_come_from_gin_at_call_time(gin_scope):
    from distill_sbs.data import get_objectives

    assert [(o.name, o.weight) for o in get_objectives("cqa_dss")] == [
        ("label", 0.5),
        ("rationale", 0.5),
    ]
    gin.bind_parameter("DatasetOptions.dss_alpha", 0.8)
    gin.bind_parameter("DatasetOptions.teacher_weights", {"beta": 0.25})
    assert [o.weight for o in get_objectives("cqa_dss_rationale")] == pytest.approx([0.8, 0.2])
    assert [(o.name, o.weight) for o in get_objectives("arith_multiteacher")] == [
        ("label", 1.0),
        ("rationale:alpha", 0.5),
        ("rationale:beta", 0.25),
    ]
    assert [o.name for o in get_objectives("arith_cot")] == ["cot"]
    gin.bind_parameter("DatasetOptions.mixing_rates", {"rationale": 3.0})
    mixture = seqio.get_mixture_or_task("arith_dss")
    rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
    assert rates == {"arith_dss_label": 1.0, "arith_dss_rationale": 3.0}
    with pytest.raises(KeyError, match="not registered"):
        get_objectives("nope_dss")


def _toy_records():
    """Two teachers; record b's t1 answer is wrong and its t2 output unparsed, c has no gold
    label, a has a second (wrong) t1 sample; test record d's t1 answer is wrong."""
    from distill_sbs.data import Record, TeacherSample

    def sample(rationale, label):
        return TeacherSample(rationale, label, f"{rationale} So the answer is {label}.")

    unparsed = TeacherSample("", None, "??")
    return {
        "train": [
            Record("a", "2+2?", "4", teachers={"t1": [sample("two and two", "4"),
                                                      sample("second try", "5")],
                                               "t2": [sample("t2 adds", "4")]}),
            Record("b", "3+1?", "4", teachers={"t1": [sample("three and one", "5")],
                                               "t2": [unparsed]}),
            Record("c", "1+1?", None, teachers={"t1": [sample("one and one", "2")],
                                                "t2": [sample("1+1=2", "2")]}),
        ],
        "test": [Record("d", "5+0?", "5", teachers={"t1": [sample("five", "6")]})],
    }  # fmt: skip


# What each method builds from _toy_records, written out by hand (not from the method table):
# (objective name, weight under the bindings of the test, {split: [(id, inputs, targets)]}).
_TOY_GOLD = [("a", "2+2?", "4"), ("b", "3+1?", "4")]
_TOY_TEST = [("d", "5+0?", "5")]
_TOY_EXPECTED = {
    "finetune": [("label", 1.0, {"train": _TOY_GOLD, "test": _TOY_TEST})],
    "distill": [
        ("label", 1.0, {"train": [("a", "2+2?", "4"), ("b", "3+1?", "5"), ("c", "1+1?", "2")],
                        "test": _TOY_TEST}),
    ],
    "dss": [
        ("label", 0.3, {"train": [(i, "[label] " + x, y) for i, x, y in _TOY_GOLD],
                        "test": [("d", "[label] 5+0?", "5")]}),
        ("rationale", 0.7, {"train": [("a", "[rationale] 2+2?", "two and two"),
                                      ("b", "[rationale] 3+1?", "three and one"),
                                      ("c", "[rationale] 1+1?", "one and one")],
                            "test": [("d", "[rationale] 5+0?", "five")]}),
    ],
    "dss_llm": [
        ("label", 0.3, {"train": [("a", "[label] 2+2?", "4"), ("b", "[label] 3+1?", "5"),
                                  ("c", "[label] 1+1?", "2")],
                        "test": [("d", "[label] 5+0?", "5")]}),
        ("rationale", 0.7, {"train": [("a", "[rationale] 2+2?", "two and two"),
                                      ("b", "[rationale] 3+1?", "three and one"),
                                      ("c", "[rationale] 1+1?", "one and one")],
                            "test": [("d", "[rationale] 5+0?", "five")]}),
    ],
    "cot": [("cot", 1.0, {"train": [("a", "2+2?", "two and two So the answer is 4.")],
                          "test": _TOY_TEST})],
    "multiteacher": [
        ("label", 2.0, {"train": [(i, "[label] " + x, y) for i, x, y in _TOY_GOLD],
                        "test": [("d", "[label] 5+0?", "5")]}),
        ("rationale:t1", 0.4, {"train": [("a", "[rationale:t1] 2+2?", "two and two"),
                                         ("b", "[rationale:t1] 3+1?", "three and one"),
                                         ("c", "[rationale:t1] 1+1?", "one and one")],
                               "test": [("d", "[rationale:t1] 5+0?", "five")]}),
        ("rationale:t2", 0.6, {"train": [("a", "[rationale:t2] 2+2?", "t2 adds"),
                                         ("c", "[rationale:t2] 1+1?", "1+1=2")],
                               "test": []}),
    ],
}  # fmt: skip
# The SeqIO names each method registers; the scored one (with the metric) first.
_TOY_NAMES = {
    "finetune": ("task", ["toy_finetune"]),
    "distill": ("task", ["toy_distill"]),
    "dss": ("mixture", ["toy_dss_label", "toy_dss_rationale"]),
    "dss_llm": ("mixture", ["toy_dss_llm_label", "toy_dss_llm_rationale"]),
    "cot": ("task", ["toy_cot"]),
    "multiteacher": (
        "mixture",
        [
            "toy_multiteacher_label",
            "toy_multiteacher_rationale_t1",
            "toy_multiteacher_rationale_t2",
        ],
    ),
}


@pytest.fixture(scope="module")
def toy():
    from distill_sbs.data import arith_vocabulary, register_dataset

    records = _toy_records()
    return register_dataset(
        "toy",
        loader=lambda split: records[split],
        teachers=("t1", "t2"),
        metric="accuracy",
        vocabulary=arith_vocabulary(),
    )


@pytest.mark.parametrize("method", sorted(_TOY_EXPECTED))
def test_each_method_builds_exactly_its_objectives(toy, gin_scope, method):
    from distill_sbs.data import build_examples, get_objectives

    gin.bind_parameter("DatasetOptions.dss_alpha", 0.3)
    gin.bind_parameter("DatasetOptions.label_weight", 2.0)
    gin.bind_parameter("DatasetOptions.teacher_weight", 0.4)
    gin.bind_parameter("DatasetOptions.teacher_weights", {"t2": 0.6})
    expected = _TOY_EXPECTED[method]
    assert f"toy_{method}" in toy
    got = [(o.name, o.weight) for o in get_objectives(f"toy_{method}")]
    assert got == [(name, pytest.approx(weight)) for name, weight, _ in expected]
    for k, (_, _, splits) in enumerate(expected):
        for split, want in splits.items():
            examples = build_examples("toy", method, k, split)
            assert [(e["id"], e["inputs"], e["targets"]) for e in examples] == want, (k, split)
            assert all(e["objective_id"] == k for e in examples)

    kind, tasks = _TOY_NAMES[method]
    provider = seqio.get_mixture_or_task(f"toy_{method}")
    assert isinstance(provider, seqio.Mixture) == (kind == "mixture")
    names = [t.name for t in provider.tasks] if kind == "mixture" else [provider.name]
    assert sorted(names) == sorted(tasks)
    scored = [n for n in names if seqio.get_mixture_or_task(n).metric_fns]
    assert scored == tasks[:1]
    # A chain-of-thought prediction is scored by its answer, the others by their text.
    prediction = seqio.get_mixture_or_task(scored[0]).postprocess_fn(
        b" one and one So the answer is 2.", example={}, is_target=False
    )
    assert prediction == ("2" if method == "cot" else "one and one So the answer is 2.")


def test_cot_without_the_filter_keeps_every_parsed_sample(toy, gin_scope):
    from distill_sbs.data import build_examples

    gin.bind_parameter("DatasetOptions.cot_filter_correct", False)
    examples = build_examples("toy", "cot", 0, "train")
    assert [(e["id"], e["targets"]) for e in examples] == [
        ("a", "two and two So the answer is 4."),
        ("a", "second try So the answer is 5."),
        ("b", "three and one So the answer is 5."),
        ("c", "one and one So the answer is 2."),
    ]


def test_arith_multiteacher_packs_objective_ids_aligned():
    from distill_sbs.data import arith_vocabulary

    # Inputs of 128 tokens hold two or three arith inputs, so examples do get packed.
    batches = _batches("arith_multiteacher", n=6, lengths={"inputs": 128, "targets": 48})
    seen = _check_alignment(batches, _token_targets("arith", "multiteacher", arith_vocabulary()))
    assert seen == {0, 1, 2}
    b = batches[0]
    assert b["encoder_input_tokens"].shape == (4, 128) and b["decoder_objective_ids"].shape == (
        4,
        48,
    )
    assert max(x["decoder_segment_ids"].max() for x in batches) > 1, "examples are packed"


@needs_dss
def test_cqa_dss_packs_objective_ids_aligned():
    from distill_sbs.data import t5_vocabulary

    batches = _batches("cqa_dss", n=3)
    seen = _check_alignment(batches, _token_targets("cqa", "dss", t5_vocabulary()))
    assert seen == {0, 1}


@pytest.mark.parametrize("method", ["finetune", "distill", "dss", "dss_llm", "cot", "multiteacher"])
def test_every_arith_method_yields_batches(method):
    (b,) = _batches(f"arith_{method}", n=1, pack=False)
    assert "decoder_segment_ids" not in b
    assert (
        b["decoder_target_tokens"].shape == (4, 48) and b["decoder_objective_ids"].dtype == np.int32
    )


@needs_dss
@pytest.mark.parametrize("dataset", ["cqa", "svamp"])
@pytest.mark.parametrize(
    "method,num_objectives",
    [("finetune", 1), ("distill", 1), ("dss", 2), ("dss_llm", 2), ("cot", 1), ("multiteacher", 2)],
)
def test_every_dss_method_batches_its_objectives_targets(dataset, method, num_objectives):
    from distill_sbs.data import t5_vocabulary

    (b,) = _batches(f"{dataset}_{method}", n=1)
    targets = _token_targets(dataset, method, t5_vocabulary())
    assert sorted(targets) == list(range(num_objectives))
    seen = _check_alignment([b], targets)  # every whole target segment is one of its objective's
    assert seen and seen <= set(range(num_objectives))


def test_same_seed_same_stream_and_shards_differ():
    a = _batches("arith_dss", n=2, seed=7)
    b = _batches("arith_dss", n=2, seed=7)
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    s0 = _batches("arith_finetune", n=1, seed=7, shuffle=False, pack=False, num_shards=2)
    s1 = _batches(
        "arith_finetune", n=1, seed=7, shuffle=False, pack=False, num_shards=2, shard_id=1
    )
    assert not np.array_equal(s0[0]["encoder_input_tokens"], s1[0]["encoder_input_tokens"])


@needs_dss
def test_subsampling_is_deterministic_nested_and_train_only(gin_scope):
    from distill_sbs.data import build_examples

    def ids(fraction, seed=0, split="train"):
        gin.bind_parameter("DatasetOptions.train_fraction", fraction)
        gin.bind_parameter("DatasetOptions.subsample_seed", seed)
        return [e["id"] for e in build_examples("cqa", "finetune", 0, split)]

    small, half, quarter = ids(0.125), ids(0.5), ids(0.25)
    assert len(small) == 1218 and len(quarter) == 2436
    assert set(small) <= set(quarter) <= set(half)
    assert ids(0.125) == small and ids(0.125, seed=1) != small
    assert len(ids(0.125, split="test")) == 1221


def test_teacher_labels_on_train_gold_on_test_and_cot_filter(gin_scope):
    from distill_sbs.data import arith, build_examples

    train = arith.generate("train")
    alpha_right = sum(r.teachers["alpha"][0].label == r.label for r in train)
    assert 0.8 * len(train) < alpha_right < 0.95 * len(train)
    distill = build_examples("arith", "distill", 0, "train")
    assert [e["targets"] for e in distill] == [r.teachers["alpha"][0].label for r in train]
    test = build_examples("arith", "distill", 0, "test")
    assert [e["targets"] for e in test] == [r.label for r in arith.generate("test")]
    cot = build_examples("arith", "cot", 0, "train")
    assert len(cot) == alpha_right
    gold = {r.id: r.label for r in train}
    assert all(e["targets"].endswith(f" So the answer is {gold[e['id']]}.") for e in cot)
    gin.bind_parameter("DatasetOptions.cot_filter_correct", False)
    assert len(build_examples("arith", "cot", 0, "train")) == len(train)
    dss_label = build_examples("arith", "dss", 0, "train")
    assert dss_label[0]["inputs"].startswith("[label] ")
    assert build_examples("arith", "multiteacher", 2, "train")[0]["inputs"].startswith(
        "[rationale:beta] "
    )


def test_seqio_evaluator_scores_label_task_only():
    from distill_sbs.data import ObjectiveEncDecFeatureConverter

    # seqio.Evaluator adds every task feature (objective_id too) to the lengths it hands the
    # converter; ours drops objective_id there, seqio.EncDecFeatureConverter would reject it.
    evaluator = seqio.Evaluator(
        "arith_dss",
        feature_converter=ObjectiveEncDecFeatureConverter(pack=False),
        eval_split="test",
        sequence_length=LENGTHS,
    )
    assert [t.name for t in evaluator.eval_tasks] == ["arith_dss_label"]

    def predict_gold(ds):  # a perfect model: its (padded, like a decoder's) target tokens
        return [(i, ex["decoder_target_tokens"]) for i, ex in ds.as_numpy_iterator()]

    all_metrics, _ = evaluator.evaluate(compute_metrics=True, predict_fn=predict_gold)
    assert all_metrics.result()["arith_dss_label"]["numeric_accuracy"] == 100.0


def test_plain_seqio_converter_ignores_objective_id():
    task = seqio.get_mixture_or_task("arith_dss_label")
    ds = task.get_dataset(LENGTHS, split="test", shuffle=False)
    batch = next(seqio.EncDecFeatureConverter(pack=False)(ds, LENGTHS).as_numpy_iterator())
    assert "decoder_objective_ids" not in batch and batch["decoder_target_tokens"].shape == (48,)


@needs_dss
def test_teacher_report_measures_parse_rate_and_accuracy():
    from distill_sbs.data.report import format_reports, teacher_reports

    (svamp,) = teacher_reports("svamp", "test")
    assert (svamp.records, svamp.parsed) == (200, 198)
    assert svamp.accuracy == pytest.approx(0.775)
    alpha, beta = teacher_reports("arith", "test")
    assert alpha.teacher == "alpha" and 0.8 < alpha.accuracy < 0.95 and 0.8 < beta.accuracy < 0.95
    assert "svamp    test        palm" in format_reports([svamp])
