"""Issue 9: nothing silent, nothing cryptic. Each reproduction of the issue, in-process where it
can be (the launchers' one-line errors are in test_user_errors_cli.py)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf
from _tiny_t5 import tiny_config

from distill_sbs import cli
from distill_sbs.errors import UserError
from distill_sbs.network import T5Config

TINY = tiny_config(emb_dim=32, head_dim=16, mlp_dim=64)


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


# ---- gin: macros, includes, T5X habits --------------------------------------------------------


def test_misspelled_macro_is_an_error():
    base = ["MODEL_DIR = '/tmp/x'", "MIXTURE_OR_TASK_NAME = 'arith_dss'"]
    with pytest.raises(UserError, match=r"TRAIN_STPES \(did you mean TRAIN_STEPS\?\)"):
        cli.parse_gin(["runs/train.gin"], [*base, "TRAIN_STPES = 2"])
    gin.clear_config()
    cli.parse_gin(["runs/train.gin"], [*base, "TRAIN_STEPS = 2", "USE_CACHED_TASKS = False"])
    assert gin.query_parameter("%TRAIN_STEPS") == 2


def test_overriding_a_package_macros_parameter_is_not_an_error(tmp_path):
    """`--gin.evaluate.batch_size=8` leaves runs/eval.gin's own BATCH_SIZE unreferenced: the
    user did nothing wrong. A typo'd macro in the user's own gin file still is an error."""
    base = ["CHECKPOINT_PATH = '/tmp/c'", "MIXTURE_OR_TASK_NAME = 'arith_dss'"]
    cli.parse_gin(
        ["runs/eval.gin"], [*base, "evaluate.batch_size = 8", "evaluate.num_examples = 4"]
    )
    assert gin.query_parameter("evaluate.batch_size") == 8
    gin.clear_config()
    own = tmp_path / "mine.gin"
    own.write_text("include 'runs/eval.gin'\nEVAL_SPLT = 'validation'\n")
    with pytest.raises(UserError, match=r"EVAL_SPLT \(did you mean EVAL_SPLIT\?\)"):
        cli.parse_gin([str(own)], base)


def test_string_binding_without_inner_quotes_says_how_to_quote(tmp_path):
    """`--gin.MIXTURE_OR_TASK_NAME=cqa_dss` (the shell ate the quotes) was gin's SyntaxError: a
    77-line traceback and exit 1. A bad line in a gin file names the file and line."""
    base = ["MODEL_DIR = '/tmp/x'"]
    with pytest.raises(UserError, match=r"--gin.MIXTURE_OR_TASK_NAME=\"'cqa_dss'\""):
        cli.parse_gin(["runs/train.gin"], [*base, "MIXTURE_OR_TASK_NAME = cqa_dss"])
    gin.clear_config()
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'runs/train.gin'\nTRAIN_STEPS = = 3\n")
    with pytest.raises(UserError, match=rf"gin syntax error in {bad}:2: 'TRAIN_STEPS = = 3'"):
        cli.parse_gin([str(bad)], base)


def test_runs_folder_in_working_directory_does_not_break_include(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # a namespace package `runs` to gin's resource lookup
    (tmp_path / "models").mkdir()
    (tmp_path / "mine.gin").write_text(
        "include 'runs/train.gin'\ninclude 'models/t5_1_1_tiny.gin'\n"
        "MODEL_DIR = '/tmp/x'\nMIXTURE_OR_TASK_NAME = 'arith_dss'\n"
    )
    cli.parse_gin(["mine.gin"], [])
    assert gin.query_parameter("train.train_steps").selector == "gin.macro"


def test_t5x_search_paths_and_task_module(tmp_path, monkeypatch):
    assert cli.search_paths(["a,b", "c"]) == ["a", "b", "c"]
    (tmp_path / "h9_task_module.py").write_text("REGISTERED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cli.parse_gin([], ["MIXTURE_OR_TASK_MODULE = 'h9_task_module'"])
    cli.import_task_module()
    assert sys.modules["h9_task_module"].REGISTERED
    gin.clear_config()
    cli.parse_gin([], ["MIXTURE_OR_TASK_MODULE = 'no_such_module_h9'"])
    with pytest.raises(UserError, match="MIXTURE_OR_TASK_MODULE='no_such_module_h9'"):
        cli.import_task_module()


# ---- optimizers ---------------------------------------------------------------------------------


def test_optimizer_settings_it_would_ignore_are_errors():
    from distill_sbs.optimizers import create_optimizer

    with pytest.raises(UserError, match=r"'adafactor' does not use b1=0\.8"):
        create_optimizer("adafactor", b1=0.8)
    with pytest.raises(UserError, match=r"'sgd' does not use eps=1e-06, weight_decay=0\.1"):
        create_optimizer("sgd", eps=1e-6, weight_decay=0.1)
    tx, _ = create_optimizer("adamw", b1=0.5, b2=0.6, eps=1e-3, learning_rate=1.0)
    # adamw takes them: one step of Adam on a constant gradient g moves by lr * g / (|g| + eps)
    # after bias correction, whatever b1 and b2; eps=1e-3 is visible at g = 1e-3.
    params = {"w": np.zeros(1, np.float32)}
    updates, _ = tx.update({"w": np.full(1, 1e-3, np.float32)}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.5], rtol=1e-4)


# ---- vocabulary ---------------------------------------------------------------------------------


def test_packaged_vocabulary_is_the_default_and_equals_seqio(monkeypatch, t5_vocab):
    from distill_sbs.data import options, vocab

    monkeypatch.delenv(options.VOCAB_ENV, raising=False)
    path = options.t5_vocab_path()
    assert "://" not in path and os.path.isfile(path)
    with open(path, "rb") as a, open(t5_vocab, "rb") as b:
        assert a.read() == b.read()
    ours = vocab.LazySentencePieceVocabulary(options.t5_vocab_path, extra_ids=100)
    theirs = seqio.SentencePieceVocabulary(path, extra_ids=100)
    # T5X's check is `model_vocab != task_vocab`, with either one on the left.
    assert ours == theirs and theirs == ours and not ours != theirs and not theirs != ours
    assert ours != seqio.SentencePieceVocabulary(path, extra_ids=0)
    assert ours.vocab_size == 32100
    monkeypatch.setenv(options.VOCAB_ENV, "gs://bucket/other.model")
    assert options.t5_vocab_path() == "gs://bucket/other.model"


def test_checkpoint_vocabulary_must_match_the_task(t5_vocab):
    import distill_sbs.tasks  # noqa: F401

    from distill_sbs.data import arith_vocabulary
    from distill_sbs.eval import check_vocabulary
    from distill_sbs.models import EncoderDecoderModel

    small = EncoderDecoderModel(TINY, arith_vocabulary())
    with pytest.raises(UserError, match="256 token ids.*svamp_dss has 32100"):
        check_vocabulary(small, "svamp_dss", "/ckpt")
    big = T5Config(**{**TINY.to_dict(), "vocab_size": 32128})
    with pytest.raises(UserError, match="not the vocabulary of svamp_dss"):
        check_vocabulary(EncoderDecoderModel(big, arith_vocabulary()), "svamp_dss", "/ckpt")
    same = seqio.SentencePieceVocabulary(str(t5_vocab), extra_ids=100)  # another path, same model
    check_vocabulary(EncoderDecoderModel(big, same), "svamp_dss", "/ckpt")
    with pytest.raises(UserError, match="'svamp_dsss' is not a registered task"):
        check_vocabulary(small, "svamp_dsss", "/ckpt")


def test_missing_spiece_model_is_an_error(tmp_path):
    from distill_sbs import checkpoints, models
    from distill_sbs.data.vocab import ARITH_SPM

    params = models.EncoderDecoderModel(TINY).init_params(__import__("jax").random.PRNGKey(0))
    checkpoints.save_native(str(tmp_path / "ck"), params, TINY, ARITH_SPM, extra_ids=0)
    assert models.load(str(tmp_path / "ck"))[0].vocabulary is not None
    os.remove(tmp_path / "ck" / "spiece.model")
    with pytest.raises(FileNotFoundError, match="spiece.model: the checkpoint's vocabulary"):
        models.load(str(tmp_path / "ck"))


# ---- data: UTF-8, drop counts, long records ---------------------------------------------------


def test_non_utf8_line_names_file_and_line(tmp_path):
    from distill_sbs.data.records import RecordError, read_jsonl

    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"id": "a", "input": "ok"}\n{"id": "b", "input": "caf\xe9"}\n')
    with pytest.raises(RecordError, match=r"bad\.jsonl:2: not valid UTF-8 \(byte 0xe9"):
        read_jsonl(path)
    assert issubclass(RecordError, UserError)


def test_cot_filter_drop_count_is_a_warning(caplog):
    from distill_sbs.data import preprocessors
    from distill_sbs.data.records import Record, TeacherSample

    records = [
        Record("a", "1+1", "2", teachers={"t": [TeacherSample("r", "2", "x")]}),
        Record("b", "2+2", "4", teachers={"t": [TeacherSample("r", "5", "x")]}),
    ]
    with caplog.at_level(logging.WARNING):
        out, counts = preprocessors.cot_examples(
            records,
            teachers=["t"],
            objective_id=0,
            filter_correct=True,
            match=lambda p, g, c: p == g,
            where="toy_cot",
        )
    assert len(out) == 1 and counts["wrong"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("toy_cot: kept 1 of 2 teacher samples" in m for m in warnings), warnings


def test_parse_failures_are_a_warning(dss_dir, caplog):
    from distill_sbs.data import dss

    with caplog.at_level(logging.WARNING):
        dss.read_dss_split(str(dss_dir / "svamp"), "svamp", "train")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("teacher outputs parsed" in m and "failures kept raw" in m for m in warnings)


def test_long_record_is_cut_before_tokenising_with_the_same_tokens():
    import distill_sbs.tasks  # noqa: F401

    from distill_sbs.data import registry

    task = seqio.get_mixture_or_task("svamp_dss_label")
    assert task.preprocessors[0] is registry.truncate_text  # before tokenize_text
    vocab = task.output_features["inputs"].vocabulary
    words = " ".join(f"word{i % 97} and, more." for i in range(60_000))  # about 1 MB
    ds = tf.data.Dataset.from_tensors({"inputs": words, "targets": "x"})
    cut = next(registry.truncate_text(ds, {"inputs": 64, "targets": 8}).as_numpy_iterator())
    assert len(cut["inputs"]) == 64 * registry.CHARS_PER_TOKEN < len(words)
    full = vocab.encode(words)[:64]
    assert vocab.encode(cut["inputs"].decode())[:64] == full


# ---- training: best_metric, final metrics, resumed logs, operative config ---------------------


def _train(model_dir, **kw):
    import distill_sbs.tasks  # noqa: F401

    from distill_sbs.train import train

    gin.bind_parameter("create_optimizer.name", "adamw")
    args = dict(
        model_dir=str(model_dir),
        mixture_or_task_name="arith_dss",
        task_feature_lengths={"inputs": 64, "targets": 80},
        train_steps=4,
        batch_size=4,
        model_config=TINY,
        log_period=1,
        checkpoint_period=2,
        keep_checkpoints=None,
        eval_at_end=False,
        async_checkpointing=False,
    )
    return train(**{**args, **kw})


def _logged_steps(model_dir):
    with open(os.path.join(model_dir, "train_metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def test_resume_logs_each_step_once_and_finished_run_keeps_final_metrics(tmp_path):
    model_dir = tmp_path / "run"
    _train(model_dir)
    final = json.loads((model_dir / "final_metrics.json").read_text())
    assert "train/loss" in final
    # The operative config, as T5X saves it: MODEL_DIR/config.gin and TensorBoard text.
    assert "create_optimizer.name = 'adamw'" in (model_dir / "config.gin").read_text()
    tags = set()
    for name in os.listdir(model_dir / "train"):
        for event in tf.compat.v1.train.summary_iterator(str(model_dir / "train" / name)):
            tags.update(v.tag for v in event.summary.value)
    assert "gin/operative_config" in tags

    # A run killed after logging steps 3 and 4 but before saving step 4 resumes from step 2.
    shutil.rmtree(model_dir / "checkpoint_4")
    os.remove(model_dir / "final_metrics.json")
    _train(model_dir)
    assert _logged_steps(model_dir) == [1, 2, 3, 4]

    # Rerunning the finished run trains nothing and leaves final_metrics.json as it was.
    before = (model_dir / "final_metrics.json").read_text()
    again = _train(model_dir)
    assert (model_dir / "final_metrics.json").read_text() == before
    assert again["train/loss"] == json.loads(before)["train/loss"]
    assert _logged_steps(model_dir) == [1, 2, 3, 4]


def test_misspelled_best_metric_is_an_error_at_the_first_eval(tmp_path):
    with pytest.raises(UserError, match=r"best_metric='accuarcy' is not an eval metric.*accuracy"):
        _train(
            tmp_path / "run",
            train_steps=2,
            eval_period=2,
            eval_num_examples=4,
            eval_batch_size=4,
            max_decode_length=4,
            best_metric="accuarcy",
        )


# ---- infer: the output file first -------------------------------------------------------------


def test_infer_checks_output_file_before_loading_or_generating(tmp_path):
    from distill_sbs.infer import infer

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"input": "1 + 1"}\n')
    # The checkpoint does not exist: reaching it would fail differently.
    with pytest.raises(UserError, match="OUTPUT_FILE=.*a_file/out.jsonl: cannot be written"):
        infer(
            checkpoint_path=str(tmp_path / "no_checkpoint"),
            output_file=str(blocker / "out.jsonl"),
            input_file=str(inputs),
        )


# ---- corrupt checkpoints: one UserError naming the path --------------------------------------


def _save_tiny(path, vocab=None):
    from distill_sbs import checkpoints, models

    params = models.EncoderDecoderModel(TINY).init_params(__import__("jax").random.PRNGKey(0))
    checkpoints.save_native(str(path), params, TINY, vocab, extra_ids=0)
    return str(path)


def _largest_file(directory):
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


def test_corrupt_checkpoint_is_one_user_error_naming_the_path(tmp_path, capfd):
    from distill_sbs import models

    good = _save_tiny(tmp_path / "good")
    truncated = shutil.copytree(good, tmp_path / "truncated")
    data = _largest_file(os.path.join(truncated, "params"))  # the arrays' data file
    with open(data, "r+b") as f:
        f.truncate(100)
    garbled = shutil.copytree(good, tmp_path / "garbled")
    with open(os.path.join(garbled, "params", "_METADATA"), "wb") as f:
        f.write(bytes(range(256)) * 4)
    bad_config = shutil.copytree(good, tmp_path / "bad_config")
    with open(os.path.join(bad_config, "config.json"), "wb") as f:
        f.write(b'{"model": {"vocab_')
    for path, where in [
        # the checkpoint's checksums (issue 25) name the damaged file and how it is damaged
        (truncated, f"{truncated}/params/ocdbt.process_0/d/"),
        (garbled, f"{garbled}/params/_METADATA: "),
        (bad_config, f"{bad_config}/config.json: not a checkpoint description"),
    ]:
        capfd.readouterr()
        with pytest.raises(SystemExit) as e:  # a UserError, as eval/infer/train print it
            cli.call_reporting_user_errors(lambda p=path: models.load(p))
        err = capfd.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: {where}"), err
        assert err.count("\n") == 1, err


def test_truncated_hf_weights_name_the_file(tmp_path):
    from _hf_t5 import make_hf_model

    from distill_sbs import models

    make_hf_model("t5_1_1").save_pretrained(str(tmp_path / "hf"))
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match=f"{weights}: not a readable safetensors file"):
        models.load(str(tmp_path / "hf"))


def test_missing_data_dir_and_malformed_jsonl_are_user_errors_naming_them(tmp_path, monkeypatch):
    import distill_sbs.tasks  # noqa: F401  (registers cqa)

    from distill_sbs import data
    from distill_sbs.data.records import read_jsonl

    monkeypatch.delenv("DISTILL_SBS_DATA_DIR", raising=False)
    with pytest.raises(UserError, match="DISTILL_SBS_DATA_DIR"):
        data.load_records("cqa", "train")
    missing = tmp_path / "no_such_release"
    monkeypatch.setenv("DISTILL_SBS_DATA_DIR", str(missing))
    # cli.run reports FileNotFoundError as a user error too (one line, exit 2).
    with pytest.raises(FileNotFoundError, match="no_such_release/cqa/cqa_train.json"):
        data.load_records("cqa", "train")
    path = tmp_path / "records.jsonl"
    path.write_text('{"id": "a", "input": "ok"}\n{"id": "b", "input": \n')
    with pytest.raises(UserError, match=r"records\.jsonl:2"):
        read_jsonl(path)


def test_dss_with_no_parsed_rationale_is_one_user_error(tmp_path):
    """Every teacher sample failed to parse: the rationale objective has no examples. That was a
    73-line ValueError; it is a UserError naming the objective, the split and where to look."""
    from distill_sbs.data import register_dataset
    from distill_sbs.data.vocab import ARITH_SPM

    failed = {"rationale": "", "label": None, "raw": "garbled"}
    rows = [
        {"id": f"r{i}", "input": "1 + 1?", "label": "2", "teachers": {"t": [failed]}}
        for i in range(3)
    ]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    jsonl = {s: str(tmp_path / f"{s}.jsonl") for s in ("train", "test")}
    vocab = seqio.SentencePieceVocabulary(ARITH_SPM)
    register_dataset("unparsed_ds", jsonl=jsonl, teachers=("t",), vocabulary=vocab)
    task = seqio.get_mixture_or_task("unparsed_ds_dss_rationale")
    with pytest.raises(UserError, match=r"objective 'rationale' has no examples on split 'train'"):
        task.get_dataset({"inputs": 16, "targets": 16}, split="train", shuffle=False)
