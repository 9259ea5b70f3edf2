"""The embedded world (distill_sbs.data.world, docs/world.md): its splits, labels checked against
the facts by an independent reader of the questions, noisy teachers, a corpus that states every
fact without the probe's traps, the shipped vocabulary, and a shortened pretraining run on the
corpus whose loss falls while its cloze recall of the facts rises."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import gin
import pytest
from _tiny_t5 import tiny_config

import distill_sbs.optimizers  # noqa: F401  (registers create_optimizer)
from distill_sbs.data import preprocessors, pretraining, world

E = world.by_name()
PLURAL = {v: k for k, v in world.CLASSES.items()}


def _answer(question: str) -> str:
    """The answer to a question, read from the entities' facts (not from the generator)."""
    if m := re.fullmatch(
        r"\w+ saw the (\w+), the (\w+) and the (\w+)\. How many of them (.+)\?", question
    ):
        *names, asked = m.groups()
        kind, value = re.fullmatch(r"(are|live in the|feed on) (\w+)", asked).groups()
        attribute = {"are": "class", "live in the": "habitat", "feed on": "diet"}[kind]
        value = PLURAL.get(value, value) if attribute == "class" else value
        return str(sum(E[n].value(attribute) == value for n in names))
    if m := re.fullmatch(r"Which is (larger|smaller), the (\w+) or the (\w+)\?", question):
        word, a, b = m.groups()
        ra, rb = (world.SIZE_ORDER.index(E[n].size) for n in (a, b))
        assert ra != rb
        return a if (ra > rb) == (word == "larger") else b
    m = re.fullmatch(
        r"(Where|How big|What) (?:does|is) the animal that the (\w+) hunts ?(live|feed on)?\?",
        question,
    )
    assert m, question
    prey = E[E[m.group(2)].prey]
    return {"Where": prey.habitat, "How big": prey.size, "What": prey.diet}[m.group(1)]


def _names(text: str) -> set[str]:
    return {w for w in re.findall(r"\w+", text) if w in E}


def test_splits_groups_and_labels():
    train, test = world.generate("train"), world.generate("test")
    assert (len(train), len(test)) == (400, 1200)
    assert world.generate("train") == train  # deterministic
    assert not {r.input for r in train} & {r.input for r in test}
    seen = {e.name for e in world.entities() if e.seen}
    assert len(seen) == 40 and len(E) == 240
    # every syllable starts two seen names and ends two: copying a seen name's pieces is
    # copying every piece an unseen name is made of
    for position in (slice(0, 2), slice(2, 4)):
        assert Counter(n[position] for n in seen) == {s: 2 for s in world.SYLLABLES}
    for r in train + test:
        assert r.label == _answer(r.input), r.input
        names = _names(r.input)
        group = r.fields["group"]
        assert names <= seen if group == "seen" else not names & seen, r.input
    assert Counter(r.fields["group"] for r in test) == {"seen": 600, "unseen": 600}
    assert all(r.fields["group"] == "seen" for r in train)
    kinds = Counter(r.fields["kind"] for r in test)
    assert set(kinds) == {"count", "compare", "two_hop"} and kinds["two_hop"] >= 100
    counts = Counter(r.label for r in train if r.fields["kind"] == "count")
    assert set(counts) == {"0", "1", "2", "3"} and min(counts.values()) > 40
    per_entity = Counter(n for r in train for n in _names(r.input))
    assert min(per_entity[n] for n in seen) >= 8  # each seen entity recurs in labelled train


def _stated(rationale: str) -> dict[tuple[str, str], str]:
    """(entity, attribute) -> value for the facts an "alpha" rationale states."""
    out = {}
    for sentence in rationale.split(". "):
        for attribute in ("class", "habitat", "size", "diet"):
            pattern = world.CORPUS_TEMPLATES[attribute][0].rstrip(".")
            regex = re.escape(pattern).replace(r"\{e\}", r"(\w+)").replace(r"\{v\}", r"(\w+)")
            if m := re.fullmatch(regex, sentence.rstrip(".")):
                name, value = m.groups()
                out[(name, attribute)] = PLURAL.get(value, value)
    return out


def test_teachers_are_noisy_in_two_styles():
    records = world.generate("train") + world.generate("test")
    for t in world.TEACHERS:
        wrong = [r for r in records if r.teachers[t][0].label != r.label]
        assert 0.08 < len(wrong) / len(records) < 0.16, t
    for r in records:
        alpha, beta = r.teachers["alpha"][0], r.teachers["beta"][0]
        assert alpha.rationale.endswith(".") and ": " not in alpha.rationale
        assert beta.rationale.endswith(f"; so {beta.label}.")
        gold = _stated(r.fields["gold_rationale"])
        assert gold and all(E[n].value(a) == v for (n, a), v in gold.items())
        stated = _stated(alpha.rationale)
        changed = [k for k in stated if stated[k] != gold.get(k)]
        # A right answer comes from the true facts; a wrong one from exactly one changed fact.
        assert len(changed) == (0 if alpha.label == r.label else 1), alpha.rationale


# The trait questions' rules, restated from docs/world.md (not read from the generator).
TRAIT_RULES = {
    "feathers": ("class", {"bird"}),
    "fur": ("class", {"mammal"}),
    "swim": ("habitat", {"river", "swamp"}),
    "heat": ("habitat", {"desert", "grassland"}),
    "hand": ("size", {"tiny", "small"}),
    "hunter": ("diet", {"meat"}),
}


def test_trait_questions_follow_their_rule_from_one_fact():
    """world_traits: one animal, a yes/no answer that its one fact gives by the question's rule;
    splits as the world's (test half unseen animals), yes and no about equally often, teachers
    noisy in two styles by one false fact, and words the shipped vocabulary spells."""
    train, test = (world.generate(split, dataset="world_traits") for split in ("train", "test"))
    assert (len(train), len(test)) == (400, 1200)
    assert world.generate("train", dataset="world_traits") == train
    assert not {r.input for r in train} & {r.input for r in test}
    assert not {r.id for r in test} & {r.id for r in world.generate("test")}
    seen = {e.name for e in world.labelled_entities("world_traits")}
    assert len(seen) == 120 and {e.name for e in world.entities() if e.seen} <= seen
    vocab = world.vocabulary()
    for r in train + test:
        m = re.fullmatch(r"\w+ saw the (\w+)\. (?:\w+ )+?(\w+)\?", r.input)
        assert m, r.input
        name, key = m.groups()
        attribute, yes = TRAIT_RULES[key]
        assert r.label == ("yes" if E[name].value(attribute) in yes else "no"), r.input
        assert (name in seen) == (r.fields["group"] == "seen") and r.fields["kind"] == "trait"
        gold = world.stated_facts(r.fields["gold_rationale"])
        assert gold == [(name, attribute, E[name].value(attribute))], r.fields["gold_rationale"]
        for t, (sample,) in r.teachers.items():
            assert world.concluded_answer(sample.rationale) == sample.label, (t, sample)
            (fact,) = world.stated_facts(sample.rationale)
            assert fact[:2] == (name, attribute) and world.fact_is_true(*fact) == (
                sample.label == r.label
            ), sample
        assert 2 not in vocab.encode(r.input) and vocab.decode(vocab.encode(r.input)) == r.input
    assert Counter(r.fields["group"] for r in test) == {"seen": 600, "unseen": 600}
    assert all(r.fields["group"] == "seen" for r in train)
    for split in (train, test):
        assert 0.4 < sum(r.label == "yes" for r in split) / len(split) < 0.6
        assert set(Counter(re.search(r"(\w+)\?$", r.input)[1] for r in split)) == set(TRAIT_RULES)
    for t in world.TEACHERS:
        wrong = sum(r.teachers[t][0].label != r.label for r in train + test)
        assert 0.08 < wrong / 1600 < 0.16, t
    # about 3 problems per animal: too few to answer from a name
    assert len(Counter(n for r in train for n in _names(r.input))) > 100
    rows = world.breakdown(
        [{"id": r.id, "prediction": r.label, "rationale": r.fields["gold_rationale"]} for r in test]
    )
    assert [(r["kind"], r["group"], r["n"]) for r in rows] == [
        ("trait", "seen", 600),
        ("trait", "unseen", 600),
    ]
    assert all(r["accuracy"] == r["facts_true"] == r["rationale_accuracy"] == 100.0 for r in rows)
    # a Fine-tune-CoT student's output is read as rationale and answer: here a wrong teacher's
    # (one false fact, the wrong answer concluded)
    r = next(r for r in test if r.teachers["alpha"][0].label != r.label)
    (sample,) = r.teachers["alpha"]
    cot = {"id": r.id, "prediction": preprocessors.cot_target(sample.rationale, sample.label)}
    (row,) = world.breakdown([cot])
    assert (row["accuracy"], row["names_in_rationale"], row["facts_true"]) == (0.0, 100.0, 0.0)
    assert row["rationale_accuracy"] == 0.0
    cot["prediction"] = preprocessors.cot_target(r.fields["gold_rationale"], r.label)
    assert world.breakdown([cot])[0]["accuracy"] == 100.0


def test_corpus_states_every_fact_without_the_probe_traps():
    corpus = world.corpus()
    assert len(corpus) == 240 * world.DOCS_PER_ENTITY
    text = " ".join(corpus)
    for e in world.entities():
        for attribute in ("class", "habitat", "size", "diet"):
            v = world.CLASSES[e.cls] if attribute == "class" else e.value(attribute)
            facts = [world.fact(e, attribute, t) for t in world.CORPUS_TEMPLATES[attribute]]
            assert any(f in text for f in facts), (e.name, attribute)
            assert world.fact(e, attribute, world.HELD_OUT_TEMPLATES[attribute]) not in text
            assert not re.search(rf"\ban? {v}\b", text)  # no article gives a value away
        if e.prey:
            assert f"the {e.prey}" in " ".join(d for d in corpus if e.name in d)
    # Each probe phrasing's words before the value are followed in the corpus only by values of
    # the probed attribute (a cloze never asks for another fact).
    for attribute, i in world.PROBE_TEMPLATES.items():
        before = world.CORPUS_TEMPLATES[attribute][i].split("{v}")[0]
        regex = re.escape(before).replace(r"\{e\}", r"\w+") + r"(\w+)"
        followers = set(re.findall(regex, text))
        values = {world.CLASSES[v] if attribute == "class" else v for v in world.VALUES[attribute]}
        assert followers == values, (attribute, followers)


def _check_fact_sentence(name: str, sentence: str, hunt: bool, split: str, corpus: str) -> None:
    """`sentence` states the asked fact of `name`, in a corpus phrasing (train) or the held-out
    one (validation)."""
    e = E[name]
    value_words = {v for a in world.VALUES for v in world.VALUES[a]} | set(PLURAL)
    if hunt:
        assert e.prey and _names(sentence) == {name, e.prey}, sentence
        value, attribute = e.prey, "prey"
    else:
        assert _names(sentence) == {name}, sentence
        (value,) = [w for w in re.findall(r"\w+", sentence) if w in value_words]
        attribute = {e.cls: "class", e.habitat: "habitat", e.size: "size"}.get(
            PLURAL.get(value, value), "diet"
        )
        assert PLURAL.get(value, value) == e.value(attribute), sentence
    shape = re.sub(rf"\b{value}\b", "{v}", re.sub(rf"\b{name}\b", "{e}", sentence))
    if split == "train":
        assert shape in world.CORPUS_TEMPLATES[attribute], sentence
    else:
        assert shape == world.HELD_OUT_TEMPLATES[attribute] and sentence not in corpus


def test_fact_questions_state_the_asked_facts_in_order_in_the_corpus_phrasings():
    corpus = " ".join(world.corpus())
    for split in ("train", "validation"):
        pairs = world.fact_questions(split)
        single = [q for q, _ in pairs if len(_names(q)) == 1]
        group = [q for q, _ in pairs if len(_names(q)) > 1]
        assert {_names(q).pop() for q in single} == set(E)
        assert len(group) == world.GROUP_QUESTIONS_PER_SPLIT[split]
        assert Counter(len(_names(q)) for q in group).keys() == {2, 3}
        for question, answer in pairs:
            asked = [w for w in re.findall(r"\w+", question) if w in E]
            sentences = re.split(r"(?<=\.) ", answer)
            assert len(sentences) == len(asked), (question, answer)
            for name, sentence in zip(asked, sentences, strict=True):
                _check_fact_sentence(name, sentence, "hunt" in question, split, corpus)
    # every fact of every entity in every corpus phrasing, once each
    expected = sum(
        len(world.CORPUS_TEMPLATES[a]) for e in world.entities() for a in world._attributes(e)
    )
    assert len([q for q, _ in world.fact_questions("train") if len(_names(q)) == 1]) == expected
    # none of the labelled tasks' questions is a fact question
    labelled = {r.input for s in world.SIZES for r in world.generate(s)}
    assert not labelled & {q for q, _ in world.fact_questions("train")}


def _facts_stated_in(text: str, templates=world.TEMPLATES) -> dict[tuple[str, str], str]:
    """{(name, attribute): value} of every fact sentence of `text`, in any of TEMPLATES'
    phrasings (an independent reading of the input, for the reading questions' answers)."""
    plural = {v: k for k, v in world.CLASSES.items()}
    facts = {}
    for attribute, phrasings in templates.items():
        for t in phrasings:
            pattern = re.escape(t).replace(r"\{e\}", r"(?P<e>\w+)").replace(r"\{v\}", r"(?P<v>\w+)")
            for m in re.finditer(pattern, text):
                value = m["v"]
                if attribute == "class":
                    value = plural.get(value)
                if attribute == "prey" or value in world.VALUES[attribute]:
                    facts[(m["e"], attribute)] = value
    return facts


def test_reading_questions_are_answered_by_the_facts_they_state():
    """Each reading question's answer follows from the facts in its input (read back with every
    phrasing), about names that no world entity has; the kinds and answers are spread; the
    validation split states its facts in the held-out phrasings only."""
    size_rank = world.SIZE_ORDER.index
    for split in ("train", "validation"):
        pairs = world.reading_questions(split)
        assert len(pairs) == world.READING_QUESTIONS_PER_SPLIT[split]
        kinds = Counter()
        for text, answer in pairs:
            facts = _facts_stated_in(text)
            names = {n for n, _ in facts} | {v for (_, a), v in facts.items() if a == "prey"}
            assert not names & set(E), text
            if m := re.search(r"How many of them (?:are|live in the|feed on) (\w+)\?$", text):
                asked = {v: k for k, v in world.CLASSES.items()}.get(m[1], m[1])
                listed = re.findall(r"the (\w+)", text.split(". ")[0])
                expected = str(
                    sum(asked in {v for (n, _), v in facts.items() if n == e} for e in listed)
                )
                kinds["count"] += 1
            elif m := re.search(r"Which is (larger|smaller), the (\w+) or the (\w+)\?$", text):
                a, b = facts[(m[2], "size")], facts[(m[3], "size")]
                expected = m[2] if (size_rank(a) > size_rank(b)) == (m[1] == "larger") else m[3]
                kinds["compare"] += 1
            else:
                m = re.search(r"the animal that the (\w+) hunts", text)
                prey = facts[(m[1], "prey")]
                attribute = "habitat" if "live?" in text else "size" if "big" in text else "diet"
                expected = facts[(prey, attribute)]
                kinds["two_hop"] += 1
            assert answer == expected, (text, answer)
            if split == "validation":  # no fact in a corpus phrasing
                assert not _facts_stated_in(text, world.CORPUS_TEMPLATES), text
        assert set(kinds) == {"count", "compare", "two_hop"}, kinds
        if split == "train":
            counts = Counter(a for t, a in pairs if "How many" in t)
            assert set(counts) == {"0", "1", "2", "3"} and min(counts.values()) > 0.1 * sum(
                counts.values()
            )
    assert world.reading_questions("train") == world.reading_questions("train")  # deterministic


def test_cloze_probes():
    probes = world.cloze_probes()
    assert len(probes) == 240 * 4 * 3
    for p in probes:
        assert p.answer in p.choices and len(p.targets) == len(p.choices)
        if p.phrasing == "question":
            assert world.SENTINEL not in p.text and _names(p.text) == {p.entity}
            assert all(
                c in t and _names(t) == {p.entity}
                for c, t in zip(p.choices, p.targets, strict=True)
            )
        else:
            assert p.text.count(world.SENTINEL) == 1
        assert (world.CLASSES[E[p.entity].cls] if p.attribute == "class"
                else E[p.entity].value(p.attribute)) == p.answer  # fmt: skip


def test_shipped_vocabulary_covers_the_world(tmp_path):
    rebuilt = tmp_path / "world_spm.model"
    world.build_vocab(str(rebuilt))
    with open(world.VOCAB_FILE, "rb") as f:
        assert rebuilt.read_bytes() == f.read()  # the shipped file is what the generator builds
    vocab = world.vocabulary()
    assert vocab.vocab_size == 709 and vocab.extra_ids == 100
    assert vocab.decode([vocab.vocab_size - 1]) == "<extra_id_0>"
    texts = world.vocabulary_texts()
    # names: a word-start piece and their two syllables, each one piece found in no other word
    for e in world.entities():
        pieces = [vocab.decode([i]) for i in vocab.encode(f"the {e.name}")]
        assert pieces == ["the", "", e.name[:2], e.name[2:]], pieces
    words = {w for t in texts for w in re.findall(r"[A-Za-z]+", t)} - set(E)
    assert not [(s, w) for s in world.SYLLABLES for w in words if s in w.lower()]
    assert all(2 not in vocab.encode(t) for t in texts)  # no unknown pieces
    assert all(vocab.decode(vocab.encode(t)) == t for t in texts[:3000])


# ---- a shortened pretraining run: loss falls, recall rises ------------------------------


@pytest.fixture
def _gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_shortened_pretraining_loss_falls_and_recall_rises(tmp_path, _gin):
    """Pretrain a small student 150 steps on the documents of 12 entities; the cloze recall of
    their 48 facts (corpus phrasing; chance about 24 %) rises well above the untrained student's
    (25.0 -> 58.3 measured; one probe is 2 points)."""
    import jax

    from distill_sbs import cloze, models
    from distill_sbs.train import train

    names = [e.name for e in world.entities()[:12]]
    docs = [d for d in world.corpus() if _subject(d) in names]
    pretraining.register_span_corruption_task(
        "world_span_corruption_12", vocabulary=world.vocabulary(), documents=lambda s: docs
    )
    gin.bind_parameter("create_optimizer.name", "adamw")
    gin.bind_parameter("create_optimizer.learning_rate", 3e-3)
    gin.bind_parameter("SpanCorruption.random_roll", True)
    gin.bind_parameter("SpanCorruption.noise_density", 0.3)  # more facts hidden per step
    config = tiny_config(vocab_size=1152, emb_dim=64, head_dim=16, mlp_dim=128, num_heads=4)
    model_dir = str(tmp_path / "pretrained")
    train(
        model_dir=model_dir,
        mixture_or_task_name="world_span_corruption_12",
        task_feature_lengths={"inputs": 64, "targets": 32},
        train_steps=150,
        batch_size=16,
        model_config=config,
        log_period=25,
        checkpoint_period=0,
        eval_at_end=False,
        async_checkpointing=False,
    )
    with open(f"{model_dir}/train_metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert losses[-1] < 0.6 * losses[0], losses
    probes = [p for p in world.cloze_probes() if p.entity in names and p.phrasing == "corpus"]
    model, params = models.load(model_dir)
    after = cloze.cloze_recall(model, params, probes)["recall"]
    fresh = model.init_params(jax.random.PRNGKey(0))
    before = cloze.cloze_recall(model, fresh, probes)["recall"]
    assert after > before + 15 and after > 45, (before, after)  # measured: 25.0 -> 58.3


def test_shipped_student_knows_the_world():
    """The shipped pretrained student (a Hugging Face folder over the world's vocabulary) answers
    every fact question about every animal and fills corpus-phrased clozes well above chance
    (docs/world.md: question 100.0 / 100.0, corpus 60.6 seen / 64.2 unseen; chance 17-33)."""
    from distill_sbs import cloze, models

    with open(world.VOCAB_FILE, "rb") as f:
        assert (Path(world.PRETRAINED_STUDENT) / "spiece.model").read_bytes() == f.read()
    model, params = models.load(world.PRETRAINED_STUDENT)
    probes = [p for p in world.cloze_probes() if p.phrasing in ("question", "corpus")]
    recall = cloze.cloze_recall(model, params, probes)
    assert recall["recall/question/seen"] == recall["recall/question/unseen"] == 100.0, recall
    assert recall["recall/corpus/seen"] > 55 and recall["recall/corpus/unseen"] > 55, recall


def _subject(doc: str) -> str:
    return Counter(w for w in re.findall(r"\w+", doc) if w in E).most_common(1)[0][0]


def test_breakdown_per_kind_and_group(tmp_path):
    """A gold student scores 100 in every cell and names every animal it is asked about; a
    student that answers wrong and names none scores 0 and 0; a foreign id or a row without a
    prediction is one error naming it."""
    test = world.generate("test")
    gold = [
        {"id": r.id, "prediction": r.label, "rationale": r.fields["gold_rationale"]} for r in test
    ]
    rows = world.breakdown(gold)
    assert sum(r["n"] for r in rows) == len(test)
    assert {(r["kind"], r["group"]) for r in rows} >= {("count", "seen"), ("count", "unseen")}
    assert all(r["accuracy"] == 100.0 for r in rows), rows
    # a two-hop gold rationale names the prey as well; every asked animal is named
    assert all(r["names_in_rationale"] == 100.0 for r in rows), rows
    assert all(r["rationale_accuracy"] == 100.0 for r in rows), rows
    assert all(r["facts_true"] == 100.0 for r in rows), rows
    wrong = [{"id": r.id, "prediction": "nothing", "rationale": "no names here"} for r in test]
    assert all(
        r["accuracy"] == r["names_in_rationale"] == r["rationale_accuracy"] == 0.0
        and r["facts_true"] is None  # no fact stated
        for r in world.breakdown(wrong)
    )
    # each teacher's rationale concludes its own answer, right or wrong, and states every fact
    # of its problem; a wrong answer comes from exactly one false fact (the teacher's noise)
    for r in world.generate("train"):
        gold_facts = world.stated_facts(r.fields["gold_rationale"])
        for t, (sample,) in r.teachers.items():
            assert world.concluded_answer(sample.rationale) == sample.label, (t, sample)
            facts = world.stated_facts(sample.rationale)
            assert [(n, a) for n, a, _ in facts] == [(n, a) for n, a, _ in gold_facts], sample
            false = sum(not world.fact_is_true(*f) for f in facts)
            assert false == (sample.label != r.label), (t, sample, facts)
    no_rationale = world.breakdown([{"id": test[0].id, "prediction": test[0].label}])
    assert no_rationale[0]["names_in_rationale"] is None and no_rationale[0]["accuracy"] == 100.0
    assert no_rationale[0]["rationale_accuracy"] is None
    with pytest.raises(world.UserError, match="'nope' is not a world test problem"):
        world.breakdown([{"id": "nope", "prediction": "1"}])
    path = tmp_path / "preds.jsonl"
    path.write_text(json.dumps({"id": test[0].id}) + "\n")
    with pytest.raises(world.RecordError, match=rf"{path}:1: needs a string 'prediction'"):
        world.read_predictions(str(path))


def test_compare_config_trains_the_world_students():
    """world/compare.gin (the command docs/world.md's table comes from) parses and compares the
    DSS and fine-tuning students of the world's registered tasks with the world's vocabulary."""
    import distill_sbs.tasks  # noqa: F401 - registers world_*
    import seqio

    from distill_sbs import cli
    from distill_sbs.network import T5Config

    gin.clear_config()
    try:
        cli.parse_gin(["world/compare.gin"], [])
        runs = gin.query_parameter("compare.runs")
        assert runs == {"dss": "world_dss", "finetune": "world_finetune"}
        for task in runs.values():
            vocab = seqio.get_mixture_or_task(task).output_features["targets"].vocabulary
            assert vocab.vocab_size <= T5Config().vocab_size
        assert gin.query_parameter("compare.baseline_dataset") == "world"
        gin.clear_config()
        cli.parse_gin(["world/traits.gin"], [])
        runs = gin.query_parameter("compare.runs")
        assert runs == {m: f"world_traits_{m}" for m in ("dss", "finetune", "cot")}
        assert all(seqio.get_mixture_or_task(task) for task in runs.values())
        assert gin.query_parameter("compare.baseline_dataset") == "world_traits"
        start = gin.query_parameter("INITIAL_CHECKPOINT_PATH/macro.value")  # the shipped student
        assert str(start) == "%WORLD_STUDENT"
        assert gin.query_parameter("WORLD_STUDENT") == world.PRETRAINED_STUDENT
    finally:
        gin.clear_config()
