"""distill_sbs.host_memory: XLA's per-call temporaries stay in glibc's heap (no page faults per
step) when tuned, and the opt-out and accelerator hosts keep glibc's defaults."""

import json
import subprocess
import sys

# A jitted step whose temporaries (64 MB matrices) outlive fusion, called repeatedly; minor
# page faults counted over the calls after the first.
_PROBE = r"""
import json, resource, sys
from distill_sbs import host_memory
tuned = host_memory.keep_buffers_in_heap()
import jax, jax.numpy as jnp

@jax.jit
def step(x):
    a = x @ x.T
    return jnp.sum(jnp.tanh(a) @ x)

x = jnp.ones((4096, 256), jnp.float32)
step(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    step(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 6
print(json.dumps({"tuned": tuned, "faults_per_call": faults}))
"""


def _probe(env_extra: dict[str, str], subprocess_env: dict[str, str]) -> dict:
    env = {**subprocess_env, "JAX_PLATFORMS": "cpu"}
    env.pop("DISTILL_SBS_HOST_MALLOC", None)
    env.update(env_extra)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tuned_heap_avoids_per_call_page_faults(subprocess_env):
    default = _probe({"DISTILL_SBS_HOST_MALLOC": "system"}, subprocess_env)
    tuned = _probe({}, subprocess_env)
    assert default["tuned"] is False and tuned["tuned"] is True
    # One 64 MB temporary is 16,384 pages: glibc's defaults fault them in on every call.
    assert default["faults_per_call"] > 15_000, default
    assert tuned["faults_per_call"] < 0.1 * default["faults_per_call"], (tuned, default)


def test_accelerator_hosts_keep_defaults(monkeypatch):
    from distill_sbs import host_memory

    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert not host_memory.cpu_only()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.cpu_only()
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(host_memory.importlib.util, "find_spec", lambda name: name == "libtpu")
    assert not host_memory.cpu_only()
