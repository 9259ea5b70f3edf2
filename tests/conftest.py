"""Shared fixtures: the repository and ../shared paths, a subprocess environment that finds the
package and the test helpers, and the tiny T5 of tests/_tiny_t5.py.

tests/ is on sys.path through pyproject's `pythonpath`, so test modules import helpers
(`_tiny_t5`, `_toy_model`, `fakes`) by name; scripts run in a subprocess get `subprocess_env`.
"""

from __future__ import annotations

import os
import pathlib
import subprocess

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


class Background:
    """Subprocesses started by one test module for a later one, so that they run beside other
    work: most of a subprocess's time is start-up and compiling on one thread, and the machine
    has two cores. Output goes to files (a full pipe would stall a process nobody reads yet)."""

    def __init__(self, out_dir: pathlib.Path) -> None:
        self.out_dir = out_dir
        self.runs: dict[str, tuple[subprocess.Popen, pathlib.Path]] = {}

    def start(self, key: str, cmd: list[str], env: dict[str, str], cwd) -> None:
        """Starts `cmd` under `key` unless a process under that key was started already."""
        if key in self.runs:
            return
        out = self.out_dir / key
        with open(f"{out}.out", "w") as stdout, open(f"{out}.err", "w") as stderr:
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=stdout, stderr=stderr)
        self.runs[key] = (proc, out)

    def wait(self, key: str, timeout: float) -> subprocess.CompletedProcess:
        proc, out = self.runs[key]
        proc.wait(timeout=timeout)
        stdout, stderr = (pathlib.Path(f"{out}.{n}").read_text() for n in ("out", "err"))
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    def close(self) -> None:
        for proc, _ in self.runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def background(tmp_path_factory):
    runs = Background(tmp_path_factory.mktemp("background"))
    yield runs
    runs.close()
