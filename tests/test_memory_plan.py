"""The memory plan: per-device bytes of parameters and optimizer state equal the real arrays'
(oracle: a real initialised state); XLA's own argument bytes of the compiled step equal our shard
arithmetic (state + batch); temporaries grow with the batch and shrink with microbatches; the
entry point plans a 2-way model-parallel mesh on simulated devices."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import optax
import pytest
from _tiny_t5 import tiny_config

from distill_sbs import memory_plan as memory
from distill_sbs.models import EncoderDecoderModel
from distill_sbs.partitioning import Partitioner, create_mesh
from distill_sbs.trainer import Trainer

LENGTHS = {"inputs": 32, "targets": 16}
GPU_CONFIGS = sorted(
    p.name for p in (pathlib.Path(memory.__file__).parent / "gin/gpu").glob("*.gin")
)
STEP_COUNTER = 4  # the int32 step of the train state


def _trainer(microbatches: int = 1) -> Trainer:
    model = EncoderDecoderModel(tiny_config(), None)
    part = Partitioner(create_mesh(devices=jax.devices()[:1]))
    return Trainer(model, optax.adamw(1e-3), part, [0.5, 0.5], num_microbatches=microbatches)


def _nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_plan_matches_a_real_state_and_xla_arguments():
    trainer = _trainer()
    p = memory.plan(trainer, 8, LENGTHS, pack=True)
    state = trainer.init_state()
    assert p.params == _nbytes(state.params) > 0
    assert p.opt_state == _nbytes(state.opt_state) > 2 * p.params  # adamw: two moments + count
    # 3 encoder + 6 decoder int32 features of the packed batch
    assert p.batch == 8 * 4 * (3 * LENGTHS["inputs"] + 6 * LENGTHS["targets"])
    assert p.arguments == p.params + p.opt_state + p.batch + STEP_COUNTER
    assert p.aliased >= p.params + p.opt_state  # the donated state is updated in place
    assert p.temporaries > 0 and p.total >= p.arguments + p.temporaries


def test_temporaries_follow_batch_and_microbatches():
    small = memory.plan(_trainer(), 4, LENGTHS)
    large = memory.plan(_trainer(), 64, LENGTHS)
    accumulated = memory.plan(_trainer(microbatches=8), 64, LENGTHS)
    assert large.temporaries > small.temporaries
    assert accumulated.temporaries < large.temporaries
    text = memory.format_plan(large, capacities_gib=[1e-9, 24])
    assert "does NOT fit in 1e-09 GiB" in text and "fits in 24 GiB" in text


def test_entry_point_plans_a_model_parallel_mesh(tmp_path, repo_dir, subprocess_env):
    out = tmp_path / "plan.json"
    cfg = tiny_config()
    args = [
        "--gin_file=runs/train.gin",
        "--gin.MIXTURE_OR_TASK_NAME='arith_dss'",
        "--gin.MODEL_DIR='/never/written'",
        "--gin.BATCH_SIZE=8",
        "--gin.OPTIMIZER='adamw'",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 16}",
        "--gin.NUM_PARTITIONS=2",
        *[
            f"--gin.T5Config.{k}={getattr(cfg, k)}"
            for k in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim")
        ],
        "--gin.T5Config.num_encoder_layers=1",
        "--gin.T5Config.num_decoder_layers=1",
        "--devices=4",
        f"--json_out={out}",
    ]
    ran = subprocess.run(
        [sys.executable, "-m", "distill_sbs.memory_plan", *args],
        env=subprocess_env,
        cwd=repo_dir,
        capture_output=True,
        text=True,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "mesh data=2 x model=2 (cpu)" in ran.stdout
    plan = json.loads(out.read_text())
    whole = memory.plan(_trainer(), 8, LENGTHS).params  # one device holds every parameter
    # Split over the model axis: vocab/mlp/heads halve, the norms and embed-only leaves do not.
    assert whole / 2 < plan["params"] < whole
    # XLA's per-device arguments: our shards of the state plus this device's rows of the batch.
    batch_rows = 8 // 2 * 4 * (3 * 32 + 6 * 16)
    assert plan["batch"] == batch_rows
    assert plan["arguments"] == plan["params"] + plan["opt_state"] + batch_rows + STEP_COUNTER
    assert not (tmp_path / "never").exists()


def test_gpu_configs_cover_three_sizes_and_two_memories():
    sizes, memories = ("small", "base", "large"), ("24gb", "80gb")
    assert GPU_CONFIGS == sorted(f"t5_1_1_{s}_{m}.gin" for s in sizes for m in memories)


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_configs_compose_with_the_paper_run(name):
    """Each gin/gpu config after paper/base.gin: bfloat16 activations, microbatches that divide
    the paper's batch, an optimizer that accepts the paper's settings."""
    import gin

    from distill_sbs import cli, optimizers
    from distill_sbs.network import T5Config

    cli.import_builtin_tasks()
    gin.clear_config()
    try:
        bindings = ["METHOD = 'dss'", "PRETRAINED_DIR = '/ckpt'", "MODEL_DIR = '/run'"]
        cli.parse_gin(["paper/base.gin", "paper/cqa.gin", f"gpu/{name}"], bindings, [])
        train = gin.get_bindings("train")
        assert T5Config().dtype == "bfloat16"
        assert train["batch_size"] == 64 and 64 % train["num_microbatches"] == 0
        optimizers.create_optimizer(total_steps=train["train_steps"])
    finally:
        gin.clear_config()
