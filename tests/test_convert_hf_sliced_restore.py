"""A HF safetensors checkpoint restored into target shardings (distill_sbs.convert's sliced
restore, through distill_sbs.load) reads only each device's slices.

On simulated CPU devices (a subprocess: XLA_FLAGS must be set before jax starts), for a tied
(t5_1_0), an untied (t5_1_1) and an untied model whose lm_head was saved only as the embedding
(transformers 5), single-file and sharded (index json) safetensors:
(a) the sliced restore equals the whole-read conversion bit for bit, in the requested shardings,
    on the standard and fully sharded rules of a 2x4 mesh and on shardings that split head_dim;
(b) on a 4-way model-parallel mesh every device of a sharded parameter asks the file for exactly
    its quarter of the HF tensor (never the whole tensor), and a replicated one is read once;
(c) a sharded checkpoint's slices come from each of its files.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, os, sys
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import save_file
from _hf_t5 import hf_state_dict, make_hf_model

from distill_sbs import convert
from distill_sbs.models import EncoderDecoderModel
from distill_sbs.partitioning import (
    FULLY_SHARDED_RULES, STANDARD_RULES, Partitioner, create_mesh)

assert jax.device_count() == 8, jax.devices()
root = sys.argv[1]

# Every slice the restore asks a safetensors file for: (file, key, HF index as [start, stop]).
requests = []
read_slice = convert._SafetensorsFile.read_slice
def recording(self, key, index):
    requests.append((self._path, key, [[s.start, s.stop] for s in index]))
    return read_slice(self, key, index)
convert._SafetensorsFile.read_slice = recording

def folders():
    for variant in ("t5_1_0", "t5_1_1"):
        hf = make_hf_model(variant, seed=3)
        hf.save_pretrained(f"{root}/{variant}")
        hf.save_pretrained(f"{root}/{variant}_sharded", max_shard_size="20KB")
        yield variant, f"{root}/{variant}"
        yield variant + " sharded", f"{root}/{variant}_sharded"
    # transformers 5's untied T5 1.1 whose lm_head is tied: only the embedding is saved
    hf = make_hf_model("t5_1_1", seed=4)
    state = {k: v for k, v in hf_state_dict(hf).items() if k != "lm_head.weight"}
    os.makedirs(f"{root}/lm_head_as_embedding")
    save_file(state, f"{root}/lm_head_as_embedding/model.safetensors")
    with open(f"{root}/lm_head_as_embedding/config.json", "w") as f:
        json.dump({**hf.config.to_dict(), "tie_word_embeddings": True}, f)
    yield "lm_head as embedding", f"{root}/lm_head_as_embedding"

def split_head_dim(mesh, model):
    # not a project rule: splits head_dim (the enclosing-read case) and every other dimension
    specs = {1: P("model"), 2: P("model", "data"), 3: P(None, "data", "model")}
    abstract = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
    return jax.tree.map(lambda a: NamedSharding(mesh, specs[a.ndim]), abstract)

def targets(model):
    mesh = create_mesh(4, 2)
    for name, rules in (("standard", STANDARD_RULES), ("fully_sharded", FULLY_SHARDED_RULES)):
        yield name, Partitioner(mesh, rules).params_shardings(model.params_logical_axes())
    yield "split head_dim", split_head_dim(mesh, model)

def abstract_in(model, shardings):
    abstract = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

def leaves(tree):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}

result = {"equal": {}, "files": {}, "quarter": {}}
for name, folder in folders():
    config, whole, _ = convert.load_hf_folder(folder)
    model = EncoderDecoderModel(config)
    for target, shardings in targets(model):
        del requests[:]
        _, got, _ = convert.load_hf_folder(folder, abstract_in(model, shardings))
        want, got, wanted = leaves(whole), leaves(got), leaves(shardings)
        assert sorted(want) == sorted(got), (name, sorted(want), sorted(got))
        # (a): bit for bit, as float32, in the sharding asked for
        result["equal"][f"{name} / {target}"] = [
            k for k in want
            if not (got[k].dtype == np.float32 and got[k].sharding == wanted[k]
                    and np.asarray(got[k]).tobytes() == want[k].tobytes())
        ]
        result["files"][name] = sorted({os.path.basename(f) for f, _, _ in requests})
    if name in ("t5_1_1", "t5_1_0"):
        # (b): 4 devices, all on the model axis
        mesh = create_mesh(4, 1, devices=jax.devices()[:4])
        shardings = Partitioner(mesh, STANDARD_RULES).params_shardings(model.params_logical_axes())
        del requests[:]
        convert.load_hf_folder(folder, abstract_in(model, shardings))
        reads = {}
        for _, key, index in requests:
            reads.setdefault(key, []).append(index)
        hf_size = {k: int(np.prod(v.shape)) for k, v in convert.read_hf_weights(folder).items()}
        replicated = {
            tuple(str(k.key) for k in path): s.is_fully_replicated
            for path, s in jax.tree_util.tree_leaves_with_path(shardings)
        }
        result["quarter"][name] = [
            {"param": "/".join(path), "key": key, "replicated": replicated[path],
             "size": hf_size[key], "reads": reads.get(key, [])}
            for path, key, _, _ in convert._entries(config)
        ]
print("RESULT " + json.dumps(result))
"""


@pytest.fixture(scope="module")
def result(tmp_path_factory, subprocess_env, repo_dir) -> dict:
    env = dict(subprocess_env, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    root = tmp_path_factory.mktemp("hf")
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(root)],
        capture_output=True, text=True, env=env, cwd=repo_dir, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def test_sliced_restore_equals_the_whole_read_conversion(result):
    cases = result["equal"]
    assert len(cases) == 5 * 3  # 5 folders x 3 target shardings
    assert {case: keys for case, keys in cases.items() if keys} == {}  # parameters that differ


def test_sharded_checkpoint_slices_come_from_each_file(result):
    for variant in ("t5_1_0", "t5_1_1"):
        files = result["files"][f"{variant} sharded"]
        assert len(files) > 1 and all(f.startswith("model-0") for f in files), files
        assert result["files"][variant] == ["model.safetensors"]


def _elements(index: list[list[int]]) -> int:
    return math.prod(stop - start for start, stop in index)


def _overlap(a: list[list[int]], b: list[list[int]]) -> bool:
    return all(max(x[0], y[0]) < min(x[1], y[1]) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("variant", ["t5_1_0", "t5_1_1"])
def test_each_device_reads_only_its_quarter(result, variant):
    params = result["quarter"][variant]
    sharded = [p for p in params if not p["replicated"]]
    for p in params:
        sizes = [_elements(index) for index in p["reads"]]
        if p["replicated"]:  # layer norms: read once, whole, for the 4 devices
            assert sizes == [p["size"]], p
        else:  # 4 disjoint quarters, never the whole tensor
            assert p["size"] % 4 == 0 and sizes == [p["size"] // 4] * 4, p
            for i, a in enumerate(p["reads"]):
                assert not any(_overlap(a, b) for b in p["reads"][i + 1 :]), p
    # embeddings, attention, MLP and relative-position tables are split
    assert len(sharded) == len(params) - sum(p["replicated"] for p in params) > 20
    assert {p["param"].split("/")[-1] for p in sharded} >= {"embedding", "kernel", "rel_embedding"}


if __name__ == "__main__":
    sys.exit(pytest.main([os.path.abspath(__file__), "-q"]))
