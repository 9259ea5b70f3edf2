"""Records (JSONL) and teacher-output parsing."""

import json

import pytest

from distill_sbs import parsing
from distill_sbs.data.records import (
    Record,
    RecordError,
    TeacherSample,
    read_jsonl,
    record_from_json,
    record_to_json,
    write_jsonl,
)


def _record(**kw):
    base = {
        "id": "r1",
        "input": "What is 2 + 3?",
        "label": "5",
        "teachers": {
            "gpt": [{"rationale": "2 + 3 = 5.", "label": "5", "raw": "2 + 3 = 5. The answer is 5."}]
        },
    }
    base.update(kw)
    return base


def test_jsonl_round_trip(tmp_path):
    records = [
        Record("a", "x?", "yes", ["yes", "no"], {"t": [TeacherSample("because", "yes", "raw")]}),
        Record("b", "ünïcode", None),
        Record("c", "", None, fields={"q": "z"}),
    ]
    path = tmp_path / "r.jsonl"
    write_jsonl(path, records)
    assert read_jsonl(path) == records
    assert record_from_json(record_to_json(records[0]), "here") == records[0]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"id": "r2", "input": "x"', "malformed JSON"),
        (
            '{"id": "r2", "input": "x",}',
            "malformed JSON (Expecting property name enclosed in double "
            "quotes at column 27: a trailing ',' at column 26)",
        ),
        ('{"id": "r2", "input": "x"},', "a ',' after the object at column 27"),
        ('{"input": "x"}', "missing field 'id'"),
        ('{"id": "r2"}', "missing field 'input'"),
        ('{"id": "r2", "input": "x", "choices": "a b"}', "'choices' must be a list"),
        (
            json.dumps(_record(id="r2", teachers={"gpt": [{"rationale": " ", "label": "5"}]})),
            "rationale is empty",
        ),
        (
            json.dumps(_record(id="r2", teachers={"gpt": [{"label": "5"}]})),
            "missing field teachers.gpt[0].rationale",
        ),
        (json.dumps(_record(id="r1")), "duplicate id 'r1'"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_record()) + "\n\n" + line + "\n")
    with pytest.raises(RecordError) as e:
        read_jsonl(path)
    assert str(e.value).startswith(f"{path}:3: ")
    assert message in str(e.value)


def test_recorded_parse_failure_is_allowed(tmp_path):
    path = tmp_path / "ok.jsonl"
    bad_sample = {"rationale": "", "label": None, "raw": "garbled output"}
    path.write_text(json.dumps(_record(teachers={"gpt": [bad_sample]})) + "\n")
    (record,) = read_jsonl(path)
    assert not record.teachers["gpt"][0].parsed


CQA_OUTPUT = (
    "The answer must be a place with many books. Of the above choices, only library has books. "
    "So the answer is (c) library.\n\nQ: Where do you keep milk?\nAnswer Choices:\n(a) fridge\n"
    "A: Milk is kept cold. So the answer is (a) fridge."
)


@pytest.mark.parametrize(
    "text, rationale, answer",
    [
        (
            CQA_OUTPUT,
            "The answer must be a place with many books. "
            "Of the above choices, only library has books.",
            "(c) library",
        ),
        ("84 / 2 = 42. The answer is (84 / 2).\n\nQ: There are 3 cats", "84 / 2 = 42.", "(84 / 2)"),
        ("He has 3.5 kg. The answer is 3.5.", "He has 3.5 kg.", "3.5"),
        (
            "A man sleeps, so he is not running.\nAnswer: contradiction\n\nPremise: A dog",
            "A man sleeps, so he is not running.",
            "contradiction",
        ),
        ("They both talk. So the answer is neutral.\nPremise: x", "They both talk.", "neutral"),
        (
            "Going in circles. So Ed lost more.\nQuestion: how many?",
            "Going in circles. So Ed lost more.",
            None,
        ),
        ("Counting to the limit. So the", "Counting to the limit. So the", None),
        ("Truncated right at the end. The answer is", "Truncated right at the end.", None),
    ],
)
def test_parse_chain_of_thought(text, rationale, answer):
    out = parsing.parse_chain_of_thought(text)
    assert out.rationale == rationale
    assert out.answer == answer
    assert out.raw == text


CHOICES = ["bank", "library", "train station", "park", "school"]


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("(c) train station", "train station"),
        ("train station", "train station"),
        ("Train Station.", "train station"),
        ("(c)", "train station"),
        ("c", "train station"),
        ("(b) train station", "train station"),  # the text wins over a contradicting letter
        ("(z) nowhere", "nowhere"),
        (None, None),
    ],
)
def test_normalize_choice_answer(answer, expected):
    assert parsing.normalize_choice_answer(answer, CHOICES) == expected


def test_normalize_without_choices_strips_letter_only():
    assert parsing.normalize_choice_answer("(a) fridge", None) == "fridge"
    assert parsing.normalize_choice_answer("(84 / 2)", None) == "(84 / 2)"
