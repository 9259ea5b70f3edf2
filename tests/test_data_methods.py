"""The method table (distill_sbs.data.methods): the docs' tables are generated from it, malformed
entries are refused, and a method defined here, one entry, is registered for every dataset and
trains end to end with its own objectives, prefixes and weights reaching the loss."""

from __future__ import annotations

import json
import os
import pathlib

import gin
import pytest
import seqio
from _tiny_t5 import tiny_config

import distill_sbs.optimizers  # noqa: F401  (registers create_optimizer)
from distill_sbs.data import methods

REPO = pathlib.Path(__file__).resolve().parents[1]
BEGIN = "<!-- methods table: distill_sbs.data.methods.markdown_table()"
END = "<!-- end of methods table -->"


@pytest.mark.parametrize("doc", ["README.md", "docs/data.md"])
def test_docs_methods_table_is_generated_from_the_table(doc):
    text = (REPO / doc).read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"{doc}: one methods table"
    written = text.split(BEGIN, 1)[1].split("\n", 1)[1].split(END, 1)[0]
    assert written == methods.markdown_table(), (
        f"{doc}: the methods table differs from the table; replace it with:\n"
        + methods.markdown_table()
    )


def _objective(name="label", target=methods.GOLD_LABEL, **kw):
    return methods.ObjectiveSpec(name, "", target, **kw)


@pytest.mark.parametrize(
    "objectives,mixture,message",
    [
        ((), True, "has no objectives"),
        ((_objective(), _objective("rationale", methods.RATIONALE)), False, "is a task"),
        ((_objective("r:{teacher}", methods.RATIONALE, per_teacher=True),), False, "is a task"),
        ((_objective(), _objective()), True, "repeated objective names"),
        ((_objective("rationale", methods.RATIONALE),), True, "exactly one scored objective"),
        ((_objective(), _objective("cot", methods.CHAIN_OF_THOUGHT)), True, "exactly one scored"),
        ((_objective("label:{teacher}", per_teacher=True),), True, "exactly one scored"),
        ((_objective(), _objective("r", methods.RATIONALE, per_teacher=True)), True, "{teacher}"),
    ],
)
def test_malformed_entries_are_refused(objectives, mixture, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        methods.TrainingMethod("bad", "", objectives, mixture=mixture)


def test_per_teacher_objectives_bind_one_per_teacher():
    (label, *rationales) = methods.TRAINING_METHODS["multiteacher"].bind(["a", "b"])
    assert (label.name, label.prefix, label.teacher) == ("label", "[label] ", "a")
    assert [(r.name, r.prefix, r.teacher) for r in rationales] == [
        ("rationale:a", "[rationale:a] ", "a"),
        ("rationale:b", "[rationale:b] ", "b"),
    ]


# The new method: a label+rationale variant with the reference implementation's prefixes, its own
# objective names, a label weight derived from gin (2 x label_weight) and a fixed rationale weight.
EXPLAIN = methods.TrainingMethod(
    "explain",
    "test: predict:/explain: prefixes",
    (
        methods.ObjectiveSpec(
            "answer",
            "predict: ",
            methods.GOLD_LABEL,
            methods.Weight("2 x `label_weight`", lambda opts, teacher: 2 * opts.label_weight),
        ),
        methods.ObjectiveSpec(
            "why", "explain: ", methods.RATIONALE, methods.Weight("0.25", lambda o, t: 0.25)
        ),
    ),
    mixture=True,
)


@pytest.fixture
def explain():
    import distill_sbs.tasks  # noqa: F401  (arith is registered before the method)

    from distill_sbs import data

    gin.clear_config()
    gin.bind_parameter("create_optimizer.name", "adamw")
    gin.bind_parameter("create_optimizer.learning_rate", 1e-2)
    gin.bind_parameter("DatasetOptions.label_weight", 0.375)
    registered = data.register_training_method(EXPLAIN)
    yield registered
    data.remove_training_method("explain")
    gin.clear_config()


def test_a_method_defined_here_is_registered_and_trains(explain, tmp_path):
    from distill_sbs import data, paper
    from distill_sbs.data import arith, registry
    from distill_sbs.train import train

    assert "arith_explain" in explain and "explain" in data.TRAINING_METHODS
    mixture = seqio.get_mixture_or_task("arith_explain")
    assert sorted(t.name for t in mixture.tasks) == ["arith_explain_answer", "arith_explain_why"]
    assert paper.scored_task("arith_explain") == "arith_explain_answer"
    assert paper.mixture_name("arith", "explain") == "arith_explain"
    assert [(o.name, o.weight) for o in data.get_objectives("arith_explain")] == [
        ("answer", 0.75),
        ("why", 0.25),
    ]
    with pytest.raises(ValueError, match="already in the table"):
        data.register_training_method(EXPLAIN)

    records = arith.generate("train")
    answer = data.build_examples("arith", "explain", 0, "train")
    assert [(e["inputs"], e["targets"], e["objective_id"]) for e in answer] == [
        ("predict: " + r.input, r.label, 0) for r in records
    ]
    why = data.build_examples("arith", "explain", 1, "train")
    assert [(e["inputs"], e["targets"], e["objective_id"]) for e in why] == [
        ("explain: " + r.input, r.teachers["alpha"][0].rationale, 1) for r in records
    ]

    # A dataset registered after the method gets it too.
    registry.register_dataset(
        "explain_later",
        loader=lambda split: records[:4],
        teachers=("alpha",),
        metric="numeric",
        vocabulary=data.arith_vocabulary(),
    )
    assert "explain_later_explain" in seqio.MixtureRegistry.names()

    model_dir = str(tmp_path / "run")
    train(
        model_dir=model_dir,
        mixture_or_task_name="arith_explain",
        task_feature_lengths={"inputs": 64, "targets": 64},
        train_steps=3,
        batch_size=8,
        model_config=tiny_config(),
        log_period=1,
        checkpoint_period=0,
        eval_at_end=False,
    )
    with open(os.path.join(model_dir, "train_metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["answer/tokens"] > 0 and r["why/tokens"] > r["answer/tokens"]
        # The logged loss is the table's weighted sum of the per-objective means.
        assert r["loss"] == pytest.approx(0.75 * r["answer/loss"] + 0.25 * r["why/loss"], rel=1e-5)
