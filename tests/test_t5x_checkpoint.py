"""T5X checkpoints both ways, against upstream T5X (../shared/upstream, in a subprocess).

Upstream T5X (t5x.examples.t5 network, its Checkpointer) writes a T5 1.0 layout (tied, ReLU) and a
T5 1.1 / Flan-T5 layout (untied, gated GELU), each in float32 and bfloat16, with Adafactor state
and without optimizer state (an InferenceState), and T5 1.1 in the orbax format T5X's train.py
writes by default now (checkpoint_<step>/state). Then, in the same process:
(a) distill_sbs.load on each T5X checkpoint, and on its t5x-to-native conversion, gives upstream
    T5X's logits on fixed tokens (padded inputs; at the target tokens) within 1e-5, T5X computing
    from the parameters it restores;
(b) native-to-t5x of that conversion is restored by upstream `load_t5x_checkpoint` with the same
    values and dtype and the same logits, and by upstream's Checkpointer into an Adafactor train
    state (the INITIAL_CHECKPOINT_PATH route, optimizer state from scratch).
A second subprocess (8 simulated devices) restores a T5X checkpoint on a 2x4 mesh: bitwise equal
to the whole read, each device block read once, never a whole array that is split.
Bad input (not a T5X checkpoint, a missing step, a gin model that disagrees) is one line each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gin
import numpy as np
import pytest
import test_t5x_model
from _shared_data import REPO, SHARED

from distill_sbs import checkpoints, t5x_checkpoint
from distill_sbs.models import EncoderDecoderModel
from distill_sbs.network import T5Config

UPSTREAM = SHARED / "upstream"
MODELS_GIN = REPO / "distill_sbs" / "gin" / "models"

UPSTREAM_SCRIPT = r"""
import json, os, sys
import jax, jax.numpy as jnp, numpy as np, seqio
from t5x import adafactor, checkpoints, models, partitioning
from t5x import train_state as train_state_lib
from t5x.examples.t5 import network

import distill_sbs
from distill_sbs import t5x_checkpoint

root = sys.argv[1]
LAYOUTS = {
    # T5 1.0: tied embedding, ReLU MLP
    "t5_1_0": dict(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                   num_encoder_layers=2, num_decoder_layers=1, mlp_activations=("relu",),
                   logits_via_embedding=True),
    # T5 1.1 and Flan-T5: untied, gated GELU
    "t5_1_1": dict(vocab_size=96, emb_dim=24, num_heads=4, head_dim=6, mlp_dim=40,
                   num_encoder_layers=1, num_decoder_layers=2, mlp_activations=("gelu", "linear"),
                   logits_via_embedding=False),
}
rng = np.random.default_rng(0)
enc = rng.integers(2, 64, size=(2, 9)).astype(np.int32)
enc[1, -3:] = 0
tgt = rng.integers(2, 64, size=(2, 6)).astype(np.int32)
tgt[1, -2:] = 0
dec = np.concatenate([np.zeros((2, 1), np.int32), tgt[:, :-1]], 1)
part = partitioning.PjitPartitioner(num_partitions=1)

def ours(path):
    model, params = distill_sbs.load(path)
    return model.config, np.asarray(model.logits(params, enc, dec))

def diff(a, b):
    # at the target tokens: T5X masks decoder padding by the targets, so its logits at padded
    # positions (loss weight 0) are another computation
    a, b = np.asarray(a, np.float32)[tgt > 0], np.asarray(b, np.float32)[tgt > 0]
    return float(np.max(np.abs(a - b)))

def leaves(tree):
    flat = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}

result = {}
for layout, fields in LAYOUTS.items():
    cfg = network.T5Config(dtype=jnp.float32, dropout_rate=0.0, **fields)
    vocab = seqio.PassThroughVocabulary(size=fields["vocab_size"])
    model = models.EncoderDecoderModel(
        network.Transformer(cfg), vocab, vocab, adafactor.Adafactor())
    shapes = {"encoder_input_tokens": enc.shape, "decoder_input_tokens": dec.shape,
              "decoder_target_tokens": tgt.shape}
    variables = model.get_initial_variables(jax.random.PRNGKey(len(layout)), shapes)
    for dtype in ("float32", "bfloat16"):
        for opt in ("adafactor", "none"):
            if opt == "none" and dtype == "float32" and layout == "t5_1_1":
                continue  # one layout per dtype without optimizer state is enough
            name = f"{layout}_{dtype}_{opt}"
            state = (train_state_lib.FlaxOptimTrainState.create(model.optimizer_def, variables)
                     if opt == "adafactor" else train_state_lib.InferenceState.create(variables))
            d = f"{root}/{name}"
            checkpoints.Checkpointer(state, part, d, save_dtype=jnp.dtype(dtype)).save(state)
            # T5X's logits from the parameters T5X itself restores (bfloat16 values in float32)
            restored = checkpoints.load_t5x_checkpoint(d, restore_dtype=jnp.float32)["target"]
            ref = model.module.apply({"params": restored}, enc, dec, tgt, enable_dropout=False)
            r = result[name] = {"ref_max": float(np.max(np.abs(ref)))}
            config, logits = ours(d)
            r["config"] = {k: getattr(config, k) for k in ("vocab_size", "emb_dim", "num_heads",
                           "head_dim", "mlp_dim", "num_encoder_layers", "num_decoder_layers",
                           "logits_via_embedding", "relative_attention_num_buckets")}
            r["config"]["mlp_activations"] = list(config.mlp_activations)
            r["load"] = diff(logits, ref)
            # t5x-to-native, then native-to-t5x
            t5x_checkpoint.t5x_to_native(d, f"{root}/{name}_native")
            r["native"] = diff(ours(f"{root}/{name}_native")[1], ref)
            t5x_checkpoint.native_to_t5x(f"{root}/{name}_native", f"{root}/{name}_back", dtype)
            back = checkpoints.load_t5x_checkpoint(f"{root}/{name}_back")["target"]
            want, got = leaves(checkpoints.load_t5x_checkpoint(d)["target"]), leaves(back)
            r["back_keys"] = sorted(want) == sorted(got)
            r["back_values"] = [k for k in want if not (got[k].dtype == want[k].dtype
                                and got[k].tobytes() == want[k].tobytes())]
            back32 = jax.tree.map(lambda x: np.asarray(x, np.float32), back)
            r["back_logits"] = diff(model.module.apply({"params": back32}, enc, dec, tgt,
                                                       enable_dropout=False), logits)
            # INITIAL_CHECKPOINT_PATH in T5X: its Checkpointer restores the parameters into an
            # Adafactor train state, the optimizer state from scratch (fallback_to_scratch)
            fresh = train_state_lib.FlaxOptimTrainState.create(model.optimizer_def, variables)
            step_dir = f"{root}/{name}_back/checkpoint_0"
            train = checkpoints.Checkpointer(fresh, part, f"{root}/{name}_back").restore(
                path=step_dir, fallback_state=fresh.state_dict())
            got = leaves(jax.tree.map(lambda x: np.asarray(x, np.float32), train.params))
            want = leaves(back32)
            r["initial_checkpoint"] = max(float(np.max(np.abs(got[k] - want[k]))) for k in want)
# What upstream t5x/train.py writes by default now (use_orbax): checkpoint_<step>/state, an orbax
# checkpoint of the same tree; T5X's own restore of it is the oracle
name, d = "t5_1_1_float32_orbax", f"{root}/t5_1_1_float32_orbax"
os.makedirs(d)
state = train_state_lib.FlaxOptimTrainState.create(model.optimizer_def, variables)
manager = checkpoints.OrbaxCheckpointManagerInterface(d, state, part)
manager.save(state)
manager.wait_until_finished()
restored = manager.restore(step=0).params
ref = model.module.apply({"params": restored}, enc, dec, tgt, enable_dropout=False)
r = result[name] = {"ref_max": float(np.max(np.abs(ref)))}
config, logits = ours(d)
r["config"] = {k: getattr(config, k) for k in ("vocab_size", "emb_dim", "num_heads",
               "head_dim", "mlp_dim", "num_encoder_layers", "num_decoder_layers",
               "logits_via_embedding", "relative_attention_num_buckets")}
r["config"]["mlp_activations"] = list(config.mlp_activations)
r["load"] = diff(logits, ref)
t5x_checkpoint.t5x_to_native(d, f"{root}/{name}_native")
r["native"] = diff(ours(f"{root}/{name}_native")[1], ref)
print("RESULT " + json.dumps(result))
"""

MESH_SCRIPT = r"""
import json, sys
import jax, numpy as np
from distill_sbs import models, partitioning, t5x_checkpoint
from distill_sbs.models import EncoderDecoderModel
from distill_sbs.partitioning import FULLY_SHARDED_RULES, STANDARD_RULES, Partitioner, create_mesh

assert jax.device_count() == 8, jax.devices()
path = sys.argv[1]
reads = []  # (array, T5X index) of every read
read = t5x_checkpoint._read
def recording(source, index):
    reads.append((str(source.kvstore.path), [[s.start, s.stop] for s in index]))
    return read(source, index)
t5x_checkpoint._read = recording

def leaves(tree):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}

config, whole, _ = t5x_checkpoint.load(path)
model = EncoderDecoderModel(config)
abstract = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
mesh = create_mesh(4, 2)
result = {}
for name, rules in (("standard", STANDARD_RULES), ("fully_sharded", FULLY_SHARDED_RULES)):
    shardings = Partitioner(mesh, rules).params_shardings(model.params_logical_axes())
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    del reads[:]
    _, got = models.load(path, abstract_params=target)  # distill_sbs.load's route
    want, got, wanted = leaves(whole), leaves(got), leaves(shardings)
    differ = [k for k in want if not (got[k].sharding == wanted[k] and got[k].dtype == np.float32
              and np.asarray(got[k]).tobytes() == want[k].tobytes())]
    by_array = {}
    for array, index in reads:
        by_array.setdefault(array.rstrip("/").rsplit("/", 1)[-1], []).append(index)
    params = []
    for key, s in wanted.items():
        shape = want[key].shape
        blocks = {tuple((sl.start, sl.stop) for sl in partitioning.concrete_index(i, shape))
                  for i in s.devices_indices_map(shape).values()}
        array = "target." + ".".join(
            (["decoder"] if key.startswith("['logits_dense']") else [])
            + [p.strip("[]'") for p in key.split("][")])
        params.append({"param": key, "array": array, "blocks": len(blocks),
                       "replicated": s.is_fully_replicated, "reads": by_array.get(array, []),
                       "size": int(np.prod(want[key].shape))})
    result[name] = {"differ": differ, "params": params}
print("RESULT " + json.dumps(result))
"""


def _run(script: str, arg: str, env: dict[str, str], cwd) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", script, arg],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, subprocess_env, repo_dir, background) -> tuple[dict, str]:
    if not (UPSTREAM / "t5x" / "checkpoints.py").is_file():
        pytest.fail(f"upstream T5X is not at {UPSTREAM} (../shared/upstream)")
    # test_t5x_model's upstream run starts beside this one (its module reads the result)
    test_t5x_model.start(background, subprocess_env, tmp_path_factory.mktemp("t5x_model"))
    root = tmp_path_factory.mktemp("t5x")
    env = dict(subprocess_env)
    env["PYTHONPATH"] = os.pathsep.join([str(UPSTREAM), env["PYTHONPATH"]])
    return _run(UPSTREAM_SCRIPT, str(root), env, repo_dir), str(root)


CASES = [
    "t5_1_0_float32_adafactor",
    "t5_1_0_float32_none",
    "t5_1_0_bfloat16_adafactor",
    "t5_1_0_bfloat16_none",
    "t5_1_1_float32_adafactor",
    "t5_1_1_bfloat16_adafactor",
    "t5_1_1_bfloat16_none",
]
ORBAX = "t5_1_1_float32_orbax"


@pytest.mark.slow
def test_checkpoint_shape_is_read_from_the_arrays(upstream):
    result, _ = upstream
    assert sorted(result) == sorted([*CASES, ORBAX])
    for name, r in result.items():
        want = {
            "t5_1_0": dict(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                           num_encoder_layers=2, num_decoder_layers=1, mlp_activations=["relu"],
                           logits_via_embedding=True),
            "t5_1_1": dict(vocab_size=96, emb_dim=24, num_heads=4, head_dim=6, mlp_dim=40,
                           num_encoder_layers=1, num_decoder_layers=2,
                           mlp_activations=["gelu", "linear"], logits_via_embedding=False),
        }[name[:6]]  # fmt: skip
        assert r["config"] == {**want, "relative_attention_num_buckets": 32}, name


@pytest.mark.slow
@pytest.mark.parametrize("name", [*CASES, ORBAX])
def test_t5x_checkpoint_gives_upstream_logits(upstream, name):
    r = upstream[0][name]
    assert r["ref_max"] > 0.1  # logits that are not all zero
    assert r["load"] <= 1e-5 and r["native"] <= 1e-5, r


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_native_to_t5x_is_restored_by_upstream(upstream, name):
    r = upstream[0][name]
    assert r["back_keys"] and r["back_values"] == [], r  # same names, dtypes and bits
    assert r["back_logits"] <= 1e-5 and r["initial_checkpoint"] == 0.0, r


@pytest.mark.slow
def test_restore_on_a_2x4_mesh_reads_each_block_once(upstream, subprocess_env, repo_dir):
    path = os.path.join(upstream[1], "t5_1_1_float32_adafactor")
    env = dict(subprocess_env, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = _run(MESH_SCRIPT, path, env, repo_dir)
    for rules in ("standard", "fully_sharded"):
        assert result[rules]["differ"] == [], rules
        params = result[rules]["params"]
        assert sum(not p["replicated"] for p in params) > 10
        for p in params:
            sizes = [np.prod([b - a for a, b in index]) for index in p["reads"]]
            # one read per distinct device block: replicas share it
            assert len(p["reads"]) == p["blocks"] and p["blocks"] >= 1, (rules, p)
            if not p["replicated"] and p["blocks"] > 1:
                assert max(sizes) < p["size"], (rules, p)  # never the whole split array
            assert sum(sizes) == p["size"], (rules, p)  # the blocks tile the array


# ---------------------------------------------------------------------------- bad input


@pytest.fixture
def t5x_dir(tmp_path, tiny_t5_config) -> str:
    import jax

    params = EncoderDecoderModel(tiny_t5_config).init_params(jax.random.PRNGKey(0))
    t5x_checkpoint.save(str(tmp_path / "t5x"), params, tiny_t5_config, step=3)
    return str(tmp_path / "t5x")


def _error(fn, *args) -> str:
    with pytest.raises(t5x_checkpoint.T5XCheckpointError) as e:
        fn(*args)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_not_a_t5x_checkpoint_is_one_line(tmp_path, tiny_t5_config):
    native = str(tmp_path / "native")
    checkpoints.write_model_description(native, tiny_t5_config, None)
    assert not t5x_checkpoint.is_t5x_checkpoint(native)
    assert "not a T5X checkpoint" in _error(t5x_checkpoint.open_checkpoint, native)
    garbled = tmp_path / "garbled" / "checkpoint_1"
    garbled.mkdir(parents=True)
    (garbled / "checkpoint").write_bytes(b"\xc1not msgpack")
    message = _error(t5x_checkpoint.open_checkpoint, str(garbled.parent))
    assert message.startswith(f"{garbled / 'checkpoint'}: not a T5X msgpack checkpoint"), message


def test_a_missing_step_is_one_line(t5x_dir):
    assert t5x_checkpoint.find_step_dir(t5x_dir)[1] == 3
    message = _error(t5x_checkpoint.open_checkpoint, t5x_dir, 5)
    assert message == f"{t5x_dir}: no step 5 (steps: [3])"


def test_a_gin_model_that_disagrees_is_one_line(t5x_dir, tiny_t5_config):
    ckpt = t5x_checkpoint.open_checkpoint(t5x_dir)
    gin.clear_config()
    try:
        # the checkpoint's own shape bound in gin is fine, and gin's activation is taken
        gin.parse_config("T5Config.num_heads = 2\nT5Config.mlp_activations = ('silu', 'linear')")
        config = t5x_checkpoint.read_config(ckpt)
        assert config.mlp_activations == ("silu", "linear")
        assert config == T5Config.from_dict(
            {**tiny_t5_config.to_dict(), "mlp_activations": ["silu", "linear"]}
        )
        gin.clear_config()
        gin.parse_config_file(str(MODELS_GIN / "t5_1_0_small.gin"))
        message = _error(t5x_checkpoint.read_config, ckpt)
    finally:
        gin.clear_config()
    assert "the checkpoint has vocab_size=256, emb_dim=16" in message, message
    assert "the gin model says vocab_size=32128, emb_dim=512" in message, message
    assert "mlp_activations" in message and "logits_via_embedding" in message, message
