"""`python -m distill_sbs.annotate --dataset ... --teachers FILE` against a local fake server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from _shared_data import DSS_DIR
from fakes import FakeGenerator

from distill_sbs.serve import Server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DSS = str(DSS_DIR)


def teacher(prompt: str, params, seed) -> str:
    if prompt.rstrip().endswith("the answer is"):
        return " ( 1.0 + 1.0 )."
    return " Add one and one. So the answer is ( 1.0 + 1.0 ).\n\nQ: more"


@pytest.mark.usefixtures("dss_dir")  # fails, naming the path, where the release is absent
def test_registered_dataset_and_two_teachers_from_a_file(tmp_path):
    with Server(FakeGenerator(teacher), model_name="m") as server:
        teachers = [
            {"name": "fs", "base_url": server.base_url, "model": "m", "timeout": 10},
            {
                "name": "zs",
                "base_url": server.base_url,
                "model": "m",
                "api": "chat",
                "strategy": "zero_shot",
            },
        ]
        (tmp_path / "teachers.json").write_text(json.dumps(teachers))
        out = tmp_path / "svamp.jsonl"
        env = dict(os.environ, PYTHONPATH=REPO, DISTILL_SBS_DATA_DIR=DSS, TF_CPP_MIN_LOG_LEVEL="2")
        cmd = [
            sys.executable, "-m", "distill_sbs.annotate", "--dataset", "svamp", "--split", "test",
            "--limit", "5", "--teachers", str(tmp_path / "teachers.json"), "--output", str(out),
            "--noprogress",
        ]  # fmt: skip
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        assert p.returncode == 0, p.stderr[-3000:]
        assert server.state.count == 5 + 2 * 5  # few-shot: 1 request each; zero-shot: 2 each

    from distill_sbs.metrics import equation_match

    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == 5
    # The registered dataset's metric (equation) scores the teachers against gold.
    expected = sum(equation_match("( 1.0 + 1.0 )", r["label"]) for r in records)
    summary = json.loads((tmp_path / "svamp.jsonl.summary.json").read_text())
    assert summary["config"]["metric"] == "equation"
    for name in ("fs", "zs"):
        t = summary["summary"]["teachers"][name]
        assert (t["samples"], t["parsed"], t["with_gold"]) == (5, 5, 5)
        assert t["correct"] == expected
        for r in records:
            (s,) = r["teachers"][name]
            assert s["label"] == "( 1.0 + 1.0 )" and s["rationale"]
            # The dataset's own teacher outputs are kept beside the new ones.
            assert "palm" in r["teachers"]


def test_one_teacher_from_flags_sets_every_config_field():
    import dataclasses

    from absl import flags

    from distill_sbs import annotate
    from distill_sbs.teachers import TeacherConfig

    fields = {f.name for f in dataclasses.fields(TeacherConfig)}
    assert set(annotate._TEACHER_FLAGS) == fields - {"name"}
    assert "teacher" not in flags.FLAGS  # importing the program defines no flag
    before = set(flags.FLAGS)
    annotate.define_flags()
    try:
        assert set(annotate._TEACHER_FLAGS) <= set(flags.FLAGS)
        assert isinstance(flags.FLAGS["filter_correct"], flags.BooleanFlag)
        assert flags.FLAGS["requests_per_minute"].default is None
        argv = ["annotate", "--teacher", "t", "--base_url", "http://h/v1", "--model", "m"]
        argv += ["--answer_max_tokens", "7", "--batch_size", "3", "--strategy", "zero_shot"]
        argv += ["--temperature", "0.5", "--filter_correct"]
        flags.FLAGS(argv)
        (cfg,) = annotate.teacher_configs()
        with pytest.raises(flags.IllegalFlagValueError):  # the field's choices
            flags.FLAGS(["annotate", "--api", "grpc"])
    finally:
        flags.FLAGS.unparse_flags()
        for name in set(flags.FLAGS) - before:  # leave the process's flags as they were
            delattr(flags.FLAGS, name)
    assert (cfg.name, cfg.base_url, cfg.model) == ("t", "http://h/v1", "m")
    assert (cfg.answer_max_tokens, cfg.batch_size, cfg.strategy) == (7, 3, "zero_shot")
    assert (cfg.temperature, cfg.filter_correct) == (0.5, True)
    assert cfg.timeout == TeacherConfig.timeout  # unset flags keep the field's default
