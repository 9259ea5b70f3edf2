"""Where the tests' data lives: the T5 vocabulary shipped in the package, and the Distilling
Step-by-Step release in ../shared beside the repository (design.md: never copied into it).

The release is required, not optional: a test that needs it fails, naming the path, where it is
absent (a skipped test would prove nothing in CI, which has ../shared)."""

from __future__ import annotations

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DSS_DIR = SHARED / "data" / "dss"
T5_VOCAB = REPO / "distill_sbs" / "data" / "assets" / "t5_spiece.model"


def require_dss() -> pathlib.Path:
    if not DSS_DIR.is_dir():
        pytest.fail(f"the Distilling Step-by-Step release is not at {DSS_DIR} (../shared/data/dss)")
    return DSS_DIR
