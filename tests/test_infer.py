"""The evaluation and inference library functions, and the eval and infer launchers, on a tiny
random checkpoint (arithmetic vocabulary)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jax
import pytest
from _tiny_t5 import tiny_config

TINY = tiny_config()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from distill_sbs.checkpoints import save_native
    from distill_sbs.data.vocab import ARITH_SPM
    from distill_sbs.models import EncoderDecoderModel

    path = str(tmp_path_factory.mktemp("ckpt"))
    params = EncoderDecoderModel(TINY).init_params(jax.random.PRNGKey(0))
    save_native(path, params, TINY, ARITH_SPM, extra_ids=0)
    return path


def test_infer_input_file_with_rationale(checkpoint, tmp_path):
    from distill_sbs.infer import infer

    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"input": "Ann has 2 pens.", "id": "a"}\n\n{"input": "Ben has 3 pens."}\n')
    out = tmp_path / "out.jsonl"
    rows = infer(
        checkpoint_path=checkpoint,
        output_file=str(out),
        input_file=str(inputs),
        input_length=16,
        max_decode_length=4,
        rationale_decode_length=6,
        batch_size=4,
        rationale=True,
    )
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert written == rows and [r["id"] for r in rows] == ["a", "in.jsonl-3"]
    assert all(isinstance(r["prediction"], str) and "rationale" in r for r in rows)


def test_infer_sampling_is_seeded_per_batch(checkpoint, tmp_path):
    """DECODE_METHOD 'sample' (offered by runs/infer.gin) draws with the seed: a rerun with the same
    seed agrees, another seed differs, and batches do not repeat each other's draws."""
    from distill_sbs.infer import infer

    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join('{"input": "Ann has 2 pens."}\n' for _ in range(8)))

    def sample(seed: int) -> list[str]:
        rows = infer(
            checkpoint_path=checkpoint,
            output_file=str(tmp_path / f"out{seed}.jsonl"),
            input_file=str(inputs),
            input_length=16,
            max_decode_length=8,
            batch_size=4,
            method="sample",
            seed=seed,
            generate_kwargs={"temperature": 1.0},
        )
        return [r["prediction"] for r in rows]

    first = sample(0)
    assert sample(0) == first
    assert sample(1) != first
    assert first[:4] != first[4:]  # the same inputs in two batches: different keys


def test_infer_bad_input_line_names_file_and_line(tmp_path):
    from distill_sbs.infer import read_inputs

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "ok"}\n{"text": "no input"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'input'"):
        read_inputs(str(bad))


def test_eval_and_task_infer(checkpoint, tmp_path):
    import distill_sbs.tasks  # noqa: F401

    from distill_sbs.eval import evaluate
    from distill_sbs.infer import infer

    metrics = evaluate(
        checkpoint_path=checkpoint,
        mixture_or_task_name="arith_dss",
        task_feature_lengths={"inputs": 64, "targets": 8},
        batch_size=8,
        num_examples=8,
        max_decode_length=4,
        output_dir=str(tmp_path / "eval"),
    )
    assert set(metrics) == {"arith_dss_label/numeric_accuracy"}
    assert (tmp_path / "eval" / "arith_dss_label.test.jsonl").exists()
    rows = infer(
        checkpoint_path=checkpoint,
        output_file=str(tmp_path / "p.jsonl"),
        mixture_or_task_name="arith_dss",
        input_length=64,
        max_decode_length=4,
        batch_size=100,
    )
    assert len(rows) == 200 and rows[0]["input"].startswith("[label] ") and rows[0]["target"]


@pytest.mark.parametrize("entry", ["eval", "infer"])
def test_launchers(checkpoint, tmp_path, subprocess_env, entry):
    common = [
        f"--gin.CHECKPOINT_PATH='{checkpoint}'",
        "--gin.MIXTURE_OR_TASK_NAME='arith_dss'",
        "--gin.BATCH_SIZE=100",
        "--gin.MAX_DECODE_LENGTH=4",
    ]
    if entry == "eval":
        args = [
            "--gin_file=runs/eval.gin",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 8}",
        ]
        args += ["--gin.evaluate.num_examples=8", f"--gin.OUTPUT_DIR='{tmp_path}'"]
        expect = "arith_dss_label/numeric_accuracy: "
    else:
        # sampling as runs/infer.gin offers it (it crashed for want of a key, issue 21)
        args = [
            "--gin_file=runs/infer.gin",
            "--gin.INPUT_LENGTH=64",
            "--gin.DECODE_METHOD='sample'",
        ]
        args += [f"--gin.OUTPUT_FILE='{tmp_path / 'p.jsonl'}'"]
        expect = f"wrote 200 predictions to {tmp_path / 'p.jsonl'}"
    out = subprocess.run(
        [sys.executable, "-m", f"distill_sbs.{entry}", *args, *common],
        env=subprocess_env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert expect in out.stdout, out.stdout[-3000:]
    # Python libraries' INFO logs (orbax's restore progress, seqio's) stay off stderr unless
    # --verbosity asks for them (absl raises an unset verbosity to INFO after parsing).
    info = re.findall(r"^I\d{4} [\d:.]+ +\d+ [\w.]+\.py:\d+\].*$", out.stderr, re.MULTILINE)
    assert not info, info[:3]
