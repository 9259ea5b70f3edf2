"""Shared fixtures: the repository and ../shared paths, a subprocess environment that finds the
package and the test helpers, and the tiny T5 of tests/_tiny_t5.py.

tests/ is on sys.path through pyproject's `pythonpath`, so test modules import helpers
(`_tiny_t5`, `_toy_model`, `fakes`) by name; scripts run in a subprocess get `subprocess_env`.
"""

from __future__ import annotations

import os
import pathlib

from distill_sbs import cpu_host

# The tests compile as the launchers do (before any JAX computation: XLA reads XLA_FLAGS once),
# so the numerics checks below (Hugging Face parity, losses) hold for what users run.
cpu_host.fuse_elementwise_in_ynnpack()

# Every training run measures the CPU's matmul peak for MFU at start (about 2 s on a loaded
# machine, in each of the suite's training processes); the tests give a fixed one instead
# (os.environ reaches the in-process runs and every subprocess). Measuring is tested in
# test_flops, and the quickstart (the README's command as a user runs it) still measures.
os.environ.setdefault("DISTILL_SBS_PEAK_FLOPS", "4e11")

import pytest  # noqa: E402
from _shared_data import REPO, T5_VOCAB, require_dss  # noqa: E402
from _tiny_t5 import tiny_config  # noqa: E402

from distill_sbs.network import T5Config  # noqa: E402


@pytest.fixture(scope="session")
def repo_dir() -> pathlib.Path:
    return REPO


@pytest.fixture(scope="session")
def dss_dir() -> pathlib.Path:
    """The Distilling Step-by-Step release (cqa/, svamp/); the test fails where it is absent."""
    return require_dss()


@pytest.fixture(scope="session")
def t5_vocab() -> pathlib.Path:
    """T5's SentencePiece model, as the package ships it."""
    return T5_VOCAB


@pytest.fixture(scope="session")
def subprocess_env(tmp_path_factory) -> dict[str, str]:
    """os.environ plus PYTHONPATH (the repository, then tests/), CPU-only JAX and one persistent
    XLA compilation cache for the session's subprocesses.

    The cache: many subprocesses compile the same programs (a run, its kill and resume, the fault
    cases on one tiny config), and compiling is about half of such a process's CPU time; a cached
    executable is the one the first process compiled, so results are unchanged. This process
    itself keeps JAX's default (no persistent cache)."""
    paths = [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(p for p in paths if p),
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )


@pytest.fixture
def tiny_t5_config() -> T5Config:
    """The one-layer tiny T5 1.1 of _tiny_t5.tiny_config() (vocabulary 256)."""
    return tiny_config()
