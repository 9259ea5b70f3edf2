"""The paper's configs, composed (paper/base.gin + paper/<dataset>.gin + models/<size>.gin +
METHOD), bind exactly what the 48 generated files they replace bound, for every cell of the grid;
every mixture they name is registered and scored; the sweep prints one command per cell."""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import subprocess
import sys

import gin
import pytest

from distill_sbs import paper

# Copied from the generated files gin/paper/<dataset>/<method>_<model>.gin (deleted), parsed with
# gin and resolved with PRETRAINED_DIR='/ckpt', MODEL_DIR='/run': the bindings all 48 shared, ...
OLD_COMMON = {
    "ALPHA": 0.5,
    "BATCH_SIZE": 64,
    "CHECKPOINT_PERIOD": 1000,
    "DATA_DIR": None,
    "DROPOUT_RATE": 0.1,
    "EVAL_PERIOD": 250,
    "INITIAL_CHECKPOINT_PATH": "/ckpt",
    "LEARNING_RATE": 5e-05,
    "LOG_PERIOD": 50,
    "LR_SCHEDULE": "linear",
    "MODEL_DIR": "/run",
    "NUM_DATA_PARTITIONS": -1,
    "NUM_MICROBATCHES": 1,
    "OPTIMIZER": "adamw",
    "PACK": False,
    "PRETRAINED_DIR": "/ckpt",
    "SEED": 0,
    "TASK_FEATURE_LENGTHS": {"inputs": 1024, "targets": 256},
    "TRAIN_FRACTION": 1.0,
    "TRAIN_STEPS": 10000,
    "VOCAB_PATH": None,
    "WARMUP_STEPS": 0,
    "create_optimizer.learning_rate": 5e-05,
    "create_optimizer.name": "adamw",
    "create_optimizer.schedule": "linear",
    "create_optimizer.warmup_steps": 0,
    "create_optimizer.weight_decay": 0.0,
    "create_partitioner.num_data_partitions": -1,
    "DatasetOptions.data_dir": None,
    "DatasetOptions.dss_alpha": 0.5,
    "DatasetOptions.train_fraction": 1.0,
    "DatasetOptions.vocab_path": None,
    "T5Config.dropout_rate": 0.1,
    "T5Config.dtype": "float32",
    "T5Config.head_dim": 64,
    "T5Config.layer_norm_epsilon": 1e-06,
    "T5Config.logits_via_embedding": False,
    "T5Config.mlp_activations": ("gelu", "linear"),
    "T5Config.relative_attention_max_distance": 128,
    "T5Config.relative_attention_num_buckets": 32,
    "T5Config.vocab_size": 32128,
    "train.batch_size": 64,
    "train.checkpoint_period": 1000,
    "train.eval_batch_size": 64,
    "train.eval_loss_batches": 8,
    "train.eval_period": 250,
    # Issue 13: checkpoints are selected on the validation split (carved from train where a
    # dataset has none), no longer on test.
    "train.eval_split": "validation",
    "train.initial_checkpoint_path": "/ckpt",
    "train.log_period": 50,
    "train.max_decode_length": 256,
    "train.model_dir": "/run",
    "train.num_microbatches": 1,
    "train.pack": False,
    "train.seed": 0,
    "train.task_feature_lengths": {"inputs": 1024, "targets": 256},
    "train.train_steps": 10000,
}

# ... the macros and T5Config fields that differed per model (create_partitioner.* and
# train.model_config followed them), ...
OLD_MODELS = {
    "t5_1_1_base": {
        "NUM_PARTITIONS": 1,
        "FULLY_SHARDED": False,
        "T5Config.emb_dim": 768,
        "T5Config.mlp_dim": 2048,
        "T5Config.num_decoder_layers": 12,
        "T5Config.num_encoder_layers": 12,
        "T5Config.num_heads": 12,
    },
    "t5_1_1_large": {
        "NUM_PARTITIONS": 1,
        "FULLY_SHARDED": False,
        "T5Config.emb_dim": 1024,
        "T5Config.mlp_dim": 2816,
        "T5Config.num_decoder_layers": 24,
        "T5Config.num_encoder_layers": 24,
        "T5Config.num_heads": 16,
    },
    "t5_1_1_xxl": {
        "NUM_PARTITIONS": 8,
        "FULLY_SHARDED": True,
        "T5Config.emb_dim": 4096,
        "T5Config.mlp_dim": 10240,
        "T5Config.num_decoder_layers": 24,
        "T5Config.num_encoder_layers": 24,
        "T5Config.num_heads": 64,
    },
}

# ... and (mixture, best_metric) per dataset x method.
OLD_RUNS = {
    ("anli1", "distill"): ("anli1_distill", "anli1_distill/accuracy"),
    ("anli1", "dss_llm"): ("anli1_dss_llm", "anli1_dss_llm_label/accuracy"),
    ("anli1", "dss"): ("anli1_dss", "anli1_dss_label/accuracy"),
    ("anli1", "finetune"): ("anli1_finetune", "anli1_finetune/accuracy"),
    ("cqa", "distill"): ("cqa_distill", "cqa_distill/accuracy"),
    ("cqa", "dss_llm"): ("cqa_dss_llm", "cqa_dss_llm_label/accuracy"),
    ("cqa", "dss"): ("cqa_dss", "cqa_dss_label/accuracy"),
    ("cqa", "finetune"): ("cqa_finetune", "cqa_finetune/accuracy"),
    ("esnli", "distill"): ("esnli_distill", "esnli_distill/accuracy"),
    ("esnli", "dss_llm"): ("esnli_dss_llm", "esnli_dss_llm_label/accuracy"),
    ("esnli", "dss"): ("esnli_dss", "esnli_dss_label/accuracy"),
    ("esnli", "finetune"): ("esnli_finetune", "esnli_finetune/accuracy"),
    ("svamp", "distill"): ("svamp_distill", "svamp_distill/equation_accuracy"),
    ("svamp", "dss_llm"): ("svamp_dss_llm", "svamp_dss_llm_label/equation_accuracy"),
    ("svamp", "dss"): ("svamp_dss", "svamp_dss_label/equation_accuracy"),
    ("svamp", "finetune"): ("svamp_finetune", "svamp_finetune/equation_accuracy"),
}

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _resolve(value):
    if isinstance(value, gin.config.ConfigurableReference) and value.evaluate:
        value = value.scoped_configurable_fn()  # a macro's value, or a configurable's result
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _bindings() -> dict:
    """Every binding and macro of the parsed config, with references resolved."""
    keys = re.findall(r"^([A-Za-z_][\w.]*) = ", gin.config_str(), flags=re.M)
    return {k: _resolve(gin.query_parameter(k if "." in k else "%" + k)) for k in keys}


def _parse_flags(flag_list, extra=()):
    """The gin part of distill_sbs.train's command line, parsed the way the CLI does."""
    files = [f.split("=", 1)[1] for f in flag_list if f.startswith("--gin_file=")]
    bindings = [
        f[len("--gin.") :].replace("=", " = ", 1) for f in flag_list if f.startswith("--gin.")
    ]
    gin.add_config_file_search_path(str(paper_gin_dir()))
    gin.parse_config_files_and_bindings(files, [*bindings, *extra])


def paper_gin_dir():
    from pathlib import Path

    return Path(paper.__file__).parent / "gin"


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_grid_tables_match_the_gin_files():
    assert sorted({d for d, _ in OLD_RUNS}) == sorted(paper.DATASETS)
    assert sorted({m for _, m in OLD_RUNS}) == sorted(paper.METHODS)
    assert sorted(OLD_MODELS) == sorted(paper.MODELS)
    names = {p.name for p in (paper_gin_dir() / "paper").iterdir()}
    assert names == {"base.gin", *(f"{d}.gin" for d in paper.DATASETS)}


@pytest.mark.parametrize("model", sorted(OLD_MODELS))
@pytest.mark.parametrize("dataset,method", sorted(OLD_RUNS))
def test_composed_config_binds_what_the_generated_file_did(dataset, method, model):
    _parse_flags(
        paper.run_flags(dataset, method, model), ["PRETRAINED_DIR = '/ckpt'", "MODEL_DIR = '/run'"]
    )
    got = _bindings()
    mixture, best = OLD_RUNS[(dataset, method)]
    per_model = OLD_MODELS[model]
    want = {
        **OLD_COMMON,
        **per_model,
        "MIXTURE_OR_TASK_NAME": mixture,
        "train.mixture_or_task_name": mixture,
        "train.best_metric": best,
        "create_partitioner.num_partitions": per_model["NUM_PARTITIONS"],
        "create_partitioner.fully_sharded": per_model["FULLY_SHARDED"],
    }
    fields = {**OLD_COMMON, **per_model}
    want["train.model_config"] = {
        k.split(".", 1)[1]: v for k, v in fields.items() if k.startswith("T5Config.")
    }
    assert {k: got.get(k, "<unbound>") for k in want} == want
    # What the composition adds: the names it is composed from, and the string builders' inputs.
    added = {".".join(k.split(".")[-2:]) for k in set(got) - set(want)}
    assert added == {"DATASET", "METHOD", "METRIC"} | {
        f"{fn}.{arg}" for fn in ("mixture_name", "best_metric") for arg in ("dataset", "method")
    } | {"best_metric.metric"} | {  # issue 13: validation carve-out, one subset per seed
        "VALIDATION_FRACTION",
        "DatasetOptions.validation_fraction",
        "DatasetOptions.subsample_seed",
    } | {"EVAL_NUM_EXAMPLES", "train.eval_num_examples"}  # issue 21: runs/train.gin's macro
    assert (got["EVAL_NUM_EXAMPLES"], got["train.eval_num_examples"]) == (None, None)
    assert (got["DATASET"], got["METHOD"]) == (dataset, method)


@pytest.mark.parametrize("dataset,method", sorted(OLD_RUNS))
def test_every_paper_mixture_is_registered_and_scored(dataset, method):
    import seqio

    mixture, best = OLD_RUNS[(dataset, method)]
    provider = seqio.get_mixture_or_task(mixture)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    scored = [t for t in tasks if t.name == best.split("/")[0]]
    assert len(scored) == 1 and scored[0].metric_fns


def test_unknown_method_or_missing_dataset_is_one_clear_error():
    flags = paper.run_flags("cqa", "dss", "t5_1_1_base")
    _parse_flags(flags, ["PRETRAINED_DIR = '/c'", "MODEL_DIR = '/r'", "METHOD = 'dsss'"])
    with pytest.raises(ValueError, match="METHOD='dsss' is not one of: finetune, distill, dss"):
        _bindings()
    gin.clear_config()
    without_dataset = [f for f in flags if "paper/cqa.gin" not in f]
    with pytest.raises(ValueError, match="DATASET"):
        _parse_flags(without_dataset, ["PRETRAINED_DIR = '/c'", "MODEL_DIR = '/r'"])
    with pytest.raises(ValueError, match="model='t5_1_1_huge'"):
        paper.run_flags("cqa", "dss", "t5_1_1_huge")


def _sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "paper_sweep.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_sweep_prints_one_command_per_cell():
    root = ["--root", "/runs", "--pretrained=/ckpt", "--data", "/data/dss"]
    r = _sweep(*root, "--datasets=cqa,svamp", "--methods", "dss", "--fractions=0.125,1.0")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 * 1 * len(paper.MODELS) * 2
    cells = itertools.product(("cqa", "svamp"), ("dss",), paper.MODELS, ("0.125", "1.0"))
    for line, (dataset, method, model, fraction) in zip(lines, cells, strict=True):
        assert " ".join(paper.run_flags(dataset, method, model)).replace("'", "") in line.replace(
            "'", ""
        ).replace('"', "")
        assert f"/runs/{dataset}_{method}_{model}_f{fraction}" in line
        assert (
            f"/ckpt/{paper.MODELS[model].hf_dir}" in line and f"TRAIN_FRACTION={fraction}" in line
        )
    r = _sweep(*root, "--methods=dss,dsss")
    assert r.returncode != 0 and "--methods: each must be one of" in r.stderr
