"""The cost of logit distillation on the `arith` shapes (docs/benchmarks.md, "Logit distillation").

    python benchmarks/kd_cost.py --steps=10 --rounds=3 --json_out=/tmp/kd_cost.json

In one process, on the same packed `arith_dss` batches (32 rows, inputs 64, targets 64), times
the jitted train step of the student of gin/kd/arith_student.gin (2+2 layers, 128 wide):

    plain           DSS only (no teacher)
    online f32      + forward KL to the teacher of gin/kd/arith_teacher.gin (2+2 layers, 256
                    wide, 4x the student's parameters) run in the same step, float32
    online bf16     the same teacher with bfloat16 parameters and activations
    offline top-k   + forward KL to top-k log-probabilities read from the batch (k = --k)

Steps alternate between the variants in --rounds blocks of --steps, so load changes on a shared
machine hit all alike; the figure is each variant's median step time and its ratio to plain.
Teachers are randomly initialised (cost does not depend on the values). It also writes the
top-k file for the train split at k = 1, 8, 32 and reports its bytes per target token.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import distill_sbs.tasks  # noqa: F401  registers arith
import jax
import optax
from absl import app, flags

from distill_sbs import data, distillation
from distill_sbs.models import EncoderDecoderModel
from distill_sbs.network import T5Config
from distill_sbs.partitioning import create_partitioner
from distill_sbs.teachers import topk
from distill_sbs.trainer import Trainer

_STEPS = flags.DEFINE_integer("steps", 10, "timed steps per variant per round")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "rounds of alternation")
_K = flags.DEFINE_integer("k", 8, "top-k of the offline variant")
_JSON = flags.DEFINE_string("json_out", None, "write the figures here as JSON")

SHAPE = dict(num_heads=4, relative_attention_num_buckets=16, relative_attention_max_distance=64)
STUDENT = T5Config(vocab_size=256, emb_dim=128, head_dim=32, mlp_dim=256, num_encoder_layers=2,
                   num_decoder_layers=2, dropout_rate=0.0, **SHAPE)  # fmt: skip
TEACHER = T5Config(vocab_size=256, emb_dim=256, head_dim=64, mlp_dim=512, num_encoder_layers=2,
                   num_decoder_layers=2, dropout_rate=0.0, **SHAPE)  # fmt: skip
LENGTHS = {"inputs": 64, "targets": 64}


def _teacher(dtype: str, partitioner) -> distillation.OnlineTeacher:
    import dataclasses

    import jax.numpy as jnp

    model = EncoderDecoderModel(dataclasses.replace(TEACHER, dtype=dtype))
    params = model.init_params(jax.random.PRNGKey(1))
    if dtype == "bfloat16":
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    shardings = partitioner.params_shardings(model.params_logical_axes())
    return distillation.OnlineTeacher(model, jax.device_put(params, shardings), shardings)


def _trainer(teacher, partitioner) -> Trainer:
    divergence = None if teacher is None else {"divergence_weights": (0.5, 0.5)}
    return Trainer(EncoderDecoderModel(STUDENT), optax.adamw(1e-3), partitioner, (0.5, 0.5),
                   teacher=teacher, divergence=divergence)  # fmt: skip


def _batches(path: str | None, n: int) -> list[dict]:
    import gin

    gin.bind_parameter("teacher_topk_path.path", path)
    ds = data.get_dataset("arith_dss", task_feature_lengths=LENGTHS, split="train",
                          batch_size=32, seed=0, pack=True)  # fmt: skip
    return [b for _, b in zip(range(n), ds.as_numpy_iterator(), strict=False)]


def main(argv: list[str]) -> None:
    del argv
    partitioner = create_partitioner()
    tmp = tempfile.mkdtemp()
    writer = EncoderDecoderModel(TEACHER)
    writer_params = writer.init_params(jax.random.PRNGKey(1))
    sizes = {}
    for k in (1, 8, 32):
        path = os.path.join(tmp, f"top{k}.npz")
        sizes[k] = topk.write_topk(writer, writer_params, "arith_dss", path, k=k)
        print(f"top-{k}: {sizes[k]:.1f} bytes per target token", flush=True)
    batches = _batches(os.path.join(tmp, f"top{_K.value}.npz"), 4)
    variants = {
        "plain": _trainer(None, partitioner),
        "online f32": _trainer(_teacher("float32", partitioner), partitioner),
        "online bf16": _trainer(_teacher("bfloat16", partitioner), partitioner),
        f"offline top-{_K.value}": _trainer(distillation.OfflineTopK(), partitioner),
    }
    states, times = {}, {name: [] for name in variants}
    for name, tr in variants.items():  # compile: one untimed step each
        batch = partitioner.host_batch_to_global(batches[0])
        states[name], m = tr.train_step(tr.init_state(jax.random.PRNGKey(0)), batch)
        jax.block_until_ready(m)
    for _ in range(_ROUNDS.value):
        for name, tr in variants.items():
            for i in range(_STEPS.value):
                batch = partitioner.host_batch_to_global(batches[i % len(batches)])
                t0 = time.perf_counter()
                states[name], m = tr.train_step(states[name], batch)
                jax.block_until_ready(m)
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["plain"])
    result = {"bytes_per_token": sizes, "step_seconds": {}, "ratio_to_plain": {}}
    print("| variant | median step (ms) | vs plain |\n|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        result["step_seconds"][name] = med
        result["ratio_to_plain"][name] = med / base
        print(f"| {name} | {1e3 * med:.1f} | {med / base:.2f}x |")
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
