"""`python -m distill_sbs.data.build_assets` rebuilds the shipped arith vocabulary byte for byte
(the embedded data and its vocabulary stay in step), under the programs' one contract."""

from __future__ import annotations

import subprocess
import sys

from distill_sbs.data.vocab import ARITH_SPM


def test_rebuilds_the_shipped_arith_vocabulary(tmp_path, subprocess_env):
    out = tmp_path / "arith_spm.model"
    cmd = [sys.executable, "-m", "distill_sbs.data.build_assets", f"--output={out}"]
    p = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert out.read_bytes() == open(ARITH_SPM, "rb").read()
    bad = subprocess.run(
        [*cmd, "--vocab_size=many"], env=subprocess_env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ")
