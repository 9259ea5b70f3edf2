"""The DSS release reader on the real files in ../shared/data/dss, and its errors on bad layouts."""

import json

import pytest
from _shared_data import DSS_DIR

from distill_sbs import metrics
from distill_sbs.data import dss
from distill_sbs.data.records import RecordError

needs_dss = pytest.mark.usefixtures("dss_dir")  # fails, naming the path, where it is absent

# (dataset, split) -> (examples, min parse rate, teacher accuracy measured from the files, metric)
# Measured 2026-11: CQA 100% / 100% parsed; SVAMP 789/800 and 198/200 (the rest loop or stop early).
EXPECTED = {
    ("cqa", "train"): (9741, 1.0, 0.7584, "multiple_choice"),
    ("cqa", "test"): (1221, 1.0, 0.7887, "multiple_choice"),
    ("svamp", "train"): (800, 0.986, 0.7450, "equation"),
    ("svamp", "test"): (200, 0.99, 0.7750, "equation"),
}


@needs_dss
@pytest.mark.parametrize("name, split", sorted(EXPECTED))
def test_real_release_counts_parse_rates_and_teacher_accuracy(name, split):
    count, min_rate, accuracy, metric = EXPECTED[(name, split)]
    records, stats = dss.read_dss_split(str(DSS_DIR / name), name, split)
    assert len(records) == count
    assert stats.outputs == count and stats.rate >= min_rate
    match = metrics.METRICS[metric].match
    hits = [match(r.teachers["palm"][0].label, r.label, r.choices) for r in records]
    assert sum(hits) / len(hits) == pytest.approx(accuracy, abs=5e-4)
    failures = [s for r in records for s in r.teachers["palm"] if not s.parsed]
    assert len(failures) == stats.failed and all(s.raw and s.label is None for s in failures)
    for r in records[:50]:
        sample = r.teachers["palm"][0]
        assert "\nQ:" not in sample.rationale and "Q:" not in (sample.label or "")


@needs_dss
def test_real_cqa_input_format():
    records, _ = dss.read_dss_split(str(DSS_DIR / "cqa"), "cqa", "test")
    r = records[0]
    assert r.input.endswith("\n(e) zoo") and "\nAnswer Choices:\n(a) british columbia\n" in r.input
    assert r.label == "wooded area" and r.choices[2] == "wooded area"
    assert r.teachers["palm"][0].label in r.choices


def _write_layout(root, name="toy", n=3, outputs=None, rows=None):
    root.mkdir(parents=True, exist_ok=True)
    rows = rows or [
        {"premise": f"A man runs {i}.", "hypothesis": "A man moves.", "label": i % 3}
        for i in range(n)
    ]
    (root / f"{name}_train.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    outputs = (
        outputs
        if outputs is not None
        else [
            f"Running is moving. So the answer is entailment.\n\nPremise: next {i}"
            for i in range(n)
        ]
    )
    (root / "llm").mkdir(exist_ok=True)
    (root / "llm" / "train_CoT_0.json").write_text(json.dumps(outputs[:2]))
    (root / "llm" / "train_CoT_1.json").write_text(json.dumps(outputs[2:]))
    return root


def test_unseen_layout_detects_nli_format(tmp_path):
    root = _write_layout(tmp_path / "toy")
    records, stats = dss.read_dss_split(str(root), "toy", "train")
    assert [r.label for r in records] == ["entailment", "neutral", "contradiction"]
    assert records[0].input == "premise: A man runs 0. hypothesis: A man moves."
    assert stats.rate == 1.0 and records[2].teachers["palm"][0].label == "entailment"


def test_length_mismatch_names_the_files(tmp_path):
    outputs = ["x. So the answer is entailment."] * 2
    root = _write_layout(tmp_path / "toy", outputs=outputs)
    with pytest.raises(RecordError, match=r"toy_train\.json: 3 examples but 2 teacher outputs"):
        dss.read_dss_split(str(root), "toy", "train")


def test_missing_field_names_file_and_line(tmp_path):
    rows = [
        {"premise": "p", "hypothesis": "h", "label": 0},
        {"premise": "p", "label": 1},
        {"premise": "q", "hypothesis": "h"},
    ]
    root = _write_layout(tmp_path / "toy", rows=rows)
    with pytest.raises(RecordError, match=r"toy_train\.json:2: cannot tell the format"):
        dss.read_dss_split(str(root), "toy", "train")
    with pytest.raises(RecordError, match=r"toy_train\.json:2: missing field 'hypothesis'"):
        dss.read_dss_split(str(root), "toy", "train", formatter=dss.format_nli)


def test_malformed_line_and_missing_llm_file(tmp_path):
    root = _write_layout(tmp_path / "toy")
    with open(root / "toy_train.json", "a") as f:
        f.write('{"premise": "p", "hypothesis": \n')
    with pytest.raises(RecordError, match=r"toy_train\.json:4: malformed JSON"):
        dss.read_dss_split(str(root), "toy", "train")
    root = _write_layout(tmp_path / "toy2")
    (root / "llm" / "train_CoT_0.json").unlink()
    with pytest.raises(RecordError, match=r"train_CoT_0\.json is missing"):
        dss.read_dss_split(str(root), "toy", "train")
