"""Prompt strategies, the request cache and the annotation pipeline against a local server."""

from __future__ import annotations

import io
import itertools
import json
import re
import threading

import pytest
from fakes import FakeGenerator, fault_server

from distill_sbs.data.records import Record, read_jsonl, write_jsonl
from distill_sbs.teachers import prompts
from distill_sbs.teachers.cache import CacheError, RequestCache, request_key
from distill_sbs.teachers.exemplars import BUILTIN, get_exemplars, load_exemplars
from distill_sbs.teachers.pipeline import TeacherConfig, annotate, make_backend

# Questions whose answer is their first number plus one; "7" is answered wrongly by the oracle.
RECORDS = [
    Record(id=f"ex{i}", input=f"Jo has {n} pens and finds 1 more. How many now?", label=str(n + 1))
    for i, n in enumerate([3, 5, 7, 9])
]
QUESTION = re.compile(r"Jo has (\d+) pens")


def oracle(prompt: str, params, seed) -> str:
    """A teacher that reads the last question of a prompt; zero-shot stage 2 gives the number."""
    n = int(QUESTION.findall(prompt)[-1])
    answer = n + 1 if n != 7 else n + 2
    if prompt.rstrip().endswith("the answer is"):
        return f" {answer}.\nQ: next"
    if prompt.rstrip().endswith("Explanation:"):
        return f" Jo had {n} and found one more. So the answer is {answer}.\n\nQ: next"
    return f" Jo starts with {n}. {n} + 1 = {answer}. So the answer is {answer}.\n\nQ: Next one"


@pytest.fixture
def server():
    # The fault server without faults: the test-only request log (prompt hashes, seeds).
    with fault_server(
        FakeGenerator(oracle, max_batch_size=4), None, batch_window_ms=2, model_name="tiny"
    ) as s:
        yield s


def _teacher(server, **kw) -> tuple[TeacherConfig, object]:
    cfg = TeacherConfig(
        name=kw.pop("name", "t"),
        base_url=server.base_url,
        model="tiny",
        exemplars="arith",
        max_concurrency=2,
        timeout=5,
        **kw,
    )
    return cfg, make_backend(cfg)


def _sent_prompts(server) -> list[str]:
    return [e for e in server.handler.faults.log if e["status"] == 200]


def test_few_shot_annotates_parses_and_scores(server, tmp_path):
    with RequestCache(str(tmp_path / "cache.jsonl")) as cache:
        result = annotate(RECORDS, [_teacher(server)], cache, metric="numeric")
    s = result.teachers["t"]
    assert (s.requests, s.completed, s.cached, s.failed) == (4, 4, 0, 0)
    assert (s.samples, s.parsed, s.with_gold, s.correct) == (4, 4, 4, 3)
    assert [r.id for r in result.records] == ["ex0", "ex1", "ex2", "ex3"] and not result.failed
    sample = result.records[0].teachers["t"][0]
    assert sample.rationale == "Jo starts with 3. 3 + 1 = 4." and sample.label == "4"
    # What the annotator writes, the data layer reads back unchanged.
    write_jsonl(tmp_path / "out.jsonl", result.records)
    assert read_jsonl(tmp_path / "out.jsonl") == result.records


def test_few_shot_prompt_holds_the_exemplars_then_the_question():
    p = prompts.few_shot_prompt(BUILTIN["arith"], "Jo has 3 pens?")
    assert p.count("So the answer is") == len(BUILTIN["arith"])
    assert p.endswith("Q: Jo has 3 pens?\nA:")


def test_zero_shot_two_stages(server, tmp_path):
    seen = []
    server.engine.generator.respond = lambda p, params, seed: (
        seen.append(p) or oracle(p, params, seed)
    )
    with RequestCache(str(tmp_path / "cache.jsonl")) as cache:
        result = annotate(
            RECORDS[:2], [_teacher(server, strategy="zero_shot")], cache, metric="numeric"
        )
    s = result.teachers["t"]
    assert s.requests == 4 and s.completed == 4 and s.correct == 2
    stage1 = [p for p in seen if p.endswith(prompts.ZERO_SHOT_TRIGGER)]
    stage2 = [p for p in seen if p.endswith(prompts.ANSWER_EXTRACTION)]
    assert len(stage1) == 2 and len(stage2) == 2
    # Stage 2 holds the stage-1 reasoning.
    assert any("Jo starts with 3. 3 + 1 = 4." in p for p in stage2)
    sample = result.records[0].teachers["t"][0]
    assert sample.rationale == "Jo starts with 3. 3 + 1 = 4." and sample.label == "4"


def test_zero_shot_answer_extraction_with_choices():
    choices = ["bank", "library", "park"]
    assert prompts.extract_answer(" (B) library.\nQ: x", choices) == "library"
    assert prompts.extract_answer(" C", choices) == "park"
    assert prompts.extract_answer(" 42.", None) == "42"
    assert prompts.extract_answer("  \n", None) is None
    p = prompts.zero_shot_answer_prompt("q", "because", choices)
    assert p.endswith("Therefore, among A through C, the answer is")


def test_answer_given_uses_gold_and_k_demos_from_the_dataset(server, tmp_path):
    seen = []
    server.engine.generator.respond = lambda p, params, seed: (
        seen.append(p) or oracle(p, params, seed)
    )
    with RequestCache(str(tmp_path / "cache.jsonl")) as cache:
        result = annotate(
            RECORDS, [_teacher(server, strategy="answer_given", k_shot=2)], cache, metric="numeric"
        )
    assert len(seen) == 4
    for p in seen:
        blocks = p.split("\n\n")
        assert blocks[0] == prompts.ANSWER_GIVEN_INSTRUCTION and len(blocks) == 2 + 2
        question = blocks[-1]
        # The target's own question is never one of its demos.
        assert question not in blocks[1:-1]
    for r in result.records:
        (sample,) = r.teachers["t"]
        assert sample.label == r.label and sample.rationale.startswith("Jo had")


def test_choose_demos_is_deterministic_and_excludes_self():
    pool = [(f"id{i}", get_exemplars("arith")[i % 3]) for i in range(6)]
    a = prompts.choose_demos(pool, 3, "id2")
    assert a == prompts.choose_demos(pool, 3, "id2") and len(a) == 3
    assert len(prompts.choose_demos(pool, 10, "id2")) == 5


def test_diverse_reasoning_and_correctness_filter(server, tmp_path):
    counter = itertools.count()
    lock = threading.Lock()

    def every_third_wrong(p, params, seed):
        with lock:
            k = next(counter)
        n = int(QUESTION.findall(p)[-1])
        answer = n + 1 + (k % 3 == 0)
        return f" Count {n} plus one. So the answer is {answer}."

    server.engine.generator.respond = every_third_wrong
    teacher = _teacher(server, num_samples=3, temperature=0.7, filter_correct=True)
    with RequestCache(str(tmp_path / "cache.jsonl")) as cache:
        result = annotate(RECORDS, [teacher], cache, metric="numeric")
    s = result.teachers["t"]
    assert s.requests == s.samples == 12 and s.correct == 8 and s.filtered_out == 4
    kept = [x for r in result.records for x in r.teachers["t"]]
    assert len(kept) == 8 and all(
        x.label == r.label for r in result.records for x in r.teachers["t"]
    )
    # Each sample is its own request with its own seed.
    seeds = [e["seed"] for e in server.handler.faults.log]
    assert len(set(seeds)) == 12


def test_unparsed_output_is_kept_as_a_failure_sample(server, tmp_path):
    server.engine.generator.respond = lambda p, params, seed: "I do not know"
    with RequestCache(str(tmp_path / "cache.jsonl")) as cache:
        result = annotate(RECORDS[:2], [_teacher(server)], cache, metric="numeric")
    s = result.teachers["t"]
    assert (s.samples, s.parsed, s.with_gold, s.correct) == (2, 0, 0, 0)
    sample = result.records[0].teachers["t"][0]
    assert sample.rationale == "" and sample.label is None and sample.raw == "I do not know"


def test_empty_answers_are_stored_as_the_reader_reads_them_with_a_warning(server, tmp_path, caplog):
    """Issue 21: an empty answer was stored as "raw": " ", which the data layer refuses (the
    whole file), and a teacher that parsed nothing passed without a word."""
    server.engine.generator.respond = lambda p, params, seed: ""
    with RequestCache(str(tmp_path / "cache.jsonl")) as cache:
        result = annotate(RECORDS[:2], [_teacher(server)], cache, metric="numeric")
    s = result.teachers["t"]
    assert (s.samples, s.parsed) == (2, 0) and result.unparsed_teachers() == ["t"]
    assert "teacher t: none of its 2 samples parsed" in caplog.text
    sample = result.records[0].teachers["t"][0]
    assert (sample.rationale, sample.label, sample.raw) == ("", None, "")
    write_jsonl(tmp_path / "out.jsonl", result.records)
    assert read_jsonl(tmp_path / "out.jsonl") == result.records


def test_failures_are_listed_and_a_rerun_sends_only_them(tmp_path):
    # Requests 2 and 3 fail and are not retried: two examples fail, the rest are annotated.
    with fault_server(FakeGenerator(oracle), "500@2-3", model_name="m") as s:
        cfg = TeacherConfig(
            "t", base_url=s.base_url, model="m", exemplars="arith", max_concurrency=1, max_retries=0
        )
        cache_path = str(tmp_path / "cache.jsonl")
        with RequestCache(cache_path) as cache:
            r1 = annotate(RECORDS, [(cfg, make_backend(cfg))], cache, metric="numeric")
        assert [f["id"] for f in r1.failed] == ["ex1", "ex2"]
        assert [r.id for r in r1.records] == ["ex0", "ex3"]
        assert "HTTP 500" in r1.failed[0]["errors"][0]["error"]
        t = r1.teachers["t"]
        assert t.requests == t.cached + t.completed + t.failed == 4 and t.failed == 2
        with RequestCache(cache_path) as cache:
            r2 = annotate(RECORDS, [(cfg, make_backend(cfg))], cache, metric="numeric")
        t = r2.teachers["t"]
        assert (t.cached, t.completed, t.failed) == (2, 2, 0) and not r2.failed
        assert [r.id for r in r2.records] == ["ex0", "ex1", "ex2", "ex3"]
        # Each prompt was answered exactly once.
        ok = [e["prompt_sha256"][0] for e in s.handler.faults.log if e["status"] == 200]
        assert len(ok) == len(set(ok)) == 4


def test_two_teachers_each_get_their_list(server, tmp_path):
    a, b = _teacher(server, name="a"), _teacher(server, name="b", strategy="zero_shot")
    with RequestCache(str(tmp_path / "cache.jsonl")) as cache:
        result = annotate(
            RECORDS[:2], [a, b], cache, metric="numeric", progress_stream=io.StringIO()
        )
    for r in result.records:
        assert set(r.teachers) == {"a", "b"}
    assert result.summary()["teachers"]["b"]["requests"] == 4


def test_cache_survives_a_torn_last_line(tmp_path):
    path = str(tmp_path / "c.jsonl")
    with RequestCache(path) as c:
        c.put("k1", {"text": "one"})
        c.put("k2", {"text": "two"})
    with open(path, "a") as f:
        f.write('{"key": "k3", "text": "thr')  # killed mid-write
    c = RequestCache(path)
    assert len(c) == 2 and "k3" not in c and c.torn_lines_dropped == 1
    c.put("k3", {"text": "three"})
    c.close()
    lines = open(path).read().splitlines()
    assert [json.loads(x)["key"] for x in lines] == ["k1", "k2", "k3"]


def test_cache_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"key": "a", "text": "x"}\nnot json\n{"key": "b", "text": "y"}\n')
    with pytest.raises(CacheError, match=r"c.jsonl:2"):
        RequestCache(str(path))


def test_request_key_depends_on_every_part():
    base = ("ex1", "t", "prompt", 0, {"temperature": 0.0})
    keys = {
        request_key(*base),
        request_key("ex2", *base[1:]),
        request_key("ex1", "u", *base[2:]),
        request_key("ex1", "t", "prompt2", 0, base[4]),
        request_key("ex1", "t", "prompt", 1, base[4]),
        request_key("ex1", "t", "prompt", 0, {"temperature": 0.5}),
    }
    assert len(keys) == 6


def test_exemplar_file_errors_name_the_line(tmp_path):
    path = tmp_path / "ex.jsonl"
    path.write_text('{"input": "q", "rationale": "r", "answer": "a"}\n{"input": "q"}\n')
    with pytest.raises(ValueError, match=r"ex.jsonl:2: field 'rationale'"):
        load_exemplars(str(path))
    path.write_text('{"input": "q", "rationale": "r", "answer": "a"}\n')
    assert get_exemplars(str(path))[0].answer == "a"
    with pytest.raises(ValueError, match="neither a built-in set"):
        get_exemplars("nope")


def test_teacher_config_errors():
    with pytest.raises(ValueError, match="temperature > 0"):
        TeacherConfig("t", base_url="u", model="m", num_samples=3)
    with pytest.raises(ValueError, match="strategy"):
        TeacherConfig("t", base_url="u", model="m", strategy="magic")
    with pytest.raises(ValueError, match="unknown field"):
        TeacherConfig.from_dict({"name": "t", "api_key": "x"})


def test_builtin_exemplars_parse_with_the_data_layer_parser():
    from distill_sbs.parsing import parse_chain_of_thought

    for name, exemplars in BUILTIN.items():
        for e in exemplars:
            parsed = parse_chain_of_thought(prompts.format_exemplar(e).split("\nA: ", 1)[1])
            assert parsed.answer == e.answer and parsed.rationale == e.rationale, name


def test_make_strategy_one_object_per_strategy():
    exemplars = BUILTIN["arith"]
    few = prompts.make_strategy("few_shot", exemplars, RECORDS)
    zero = prompts.make_strategy("zero_shot", None, RECORDS, answer_max_tokens=9)
    given = prompts.make_strategy("answer_given", exemplars, RECORDS, k_shot=2)
    assert [type(s).__name__ for s in (few, zero, given)] == ["FewShot", "ZeroShot", "AnswerGiven"]
    assert few.answer_params is None and given.answer_params is None
    assert zero.answer_params.max_tokens == 9 and zero.answer_params.stop == ("\n",)
    r = RECORDS[0]
    assert few.read(r, " 3 + 1 = 4. So the answer is 4.\n\nQ: x", None)[:2] == ("3 + 1 = 4.", "4")
    assert zero.read(r, " Add one.", " 4.")[:2] == ("Add one.", "4")
    assert given.read(r, " Jo adds one.", None)[:2] == ("Jo adds one.", r.label)
    assert given.unusable(Record(id="x", input="q")) == "answer_given needs a gold label"
    with pytest.raises(ValueError, match="few_shot needs exemplars"):
        prompts.make_strategy("few_shot", None, RECORDS)
    with pytest.raises(ValueError, match="strategy must be one of"):
        prompts.make_strategy("magic", None, RECORDS)
