"""Prints (or runs, with --run) the commands of the Distilling Step-by-Step paper grid:
dataset x method x model x train fraction, each in its own MODEL_DIR.

    python launch/paper_sweep.py --root gs://bucket/dss --pretrained /ckpt --data /data/dss \\
        --datasets cqa svamp --models t5_1_1_base --fractions 0.125 1.0
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "distill_sbs", "gin", "paper"))
from make_configs import DATASETS, METHODS, MODELS  # noqa: E402

FRACTIONS = (0.125, 0.25, 0.5, 1.0)


def commands(args: argparse.Namespace) -> list[list[str]]:
    out = []
    for dataset in args.datasets:
        for method in args.methods:
            for model in args.models:
                hf_dir = MODELS[model][0].split("/")[1]
                for fraction in args.fractions:
                    run = f"{dataset}_{method}_{model}_f{fraction}"
                    out.append(
                        [
                            sys.executable,
                            "-m",
                            "distill_sbs.train",
                            f"--gin_file=paper/{dataset}/{method}_{model}.gin",
                            f"--gin.MODEL_DIR='{args.root}/{run}'",
                            f"--gin.PRETRAINED_DIR='{args.pretrained}/{hf_dir}'",
                            f"--gin.DATA_DIR='{args.data}'",
                            f"--gin.TRAIN_FRACTION={fraction}",
                        ]
                    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", required=True, help="parent of the MODEL_DIRs")
    p.add_argument("--pretrained", required=True, help="folder holding t5-v1_1-<size>/ HF folders")
    p.add_argument("--data", required=True, help="the DSS release directory")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    p.add_argument("--run", action="store_true", help="run the commands one after another")
    args = p.parse_args()
    for cmd in commands(args):
        print(shlex.join(cmd), flush=True)
        if args.run:
            subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
