"""DSS + KD vs DSS vs fine-tuning on the embedded `arith` data, 3 seeds (docs/distillation.md).

Trains the teacher of gin/kd/arith_teacher.gin once (kept if its MODEL_DIR has a final checkpoint),
then for each seed the three students of gin/kd/arith_student.gin with the same steps, each in its
own process; prints a table of test accuracy and writes it as JSON.

    python benchmarks/kd_arith.py --out_dir=/tmp/kd_arith --seeds=0,1,2
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

_OUT = flags.DEFINE_string("out_dir", "/tmp/kd_arith", "where teacher and students are trained")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "student seeds")
_JSON = flags.DEFINE_string("json", None, "results JSON (default: <out_dir>/results.json)")

METHODS = {  # name -> (task, extra gin files)
    "fine-tuning": ("arith_finetune", []),
    "DSS": ("arith_dss", []),
    "DSS + KD": ("arith_dss", ["kd/arith_kd.gin"]),
}


def _train(gin_files: list[str], model_dir: str, bindings: dict[str, str]) -> dict:
    args = [sys.executable, "-m", "distill_sbs.train"]
    args += [f"--gin_file={g}" for g in gin_files]
    args += [f"--gin.MODEL_DIR='{model_dir}'"] + [f"--gin.{k}={v}" for k, v in bindings.items()]
    t0 = time.time()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(model_dir, "final_metrics.json")) as f:
        final = json.load(f)
    final["seconds"] = time.time() - t0
    return final


def _accuracy(final: dict) -> float:
    (value,) = [v for k, v in final.items() if k.endswith("accuracy") and "train/" not in k]
    return float(value)


def main(argv: list[str]) -> None:
    del argv
    out = _OUT.value
    teacher = os.path.join(out, "teacher")
    if not os.path.exists(os.path.join(teacher, "final_metrics.json")):
        t = _train(["kd/arith_teacher.gin"], teacher, {})
        print(f"teacher: accuracy {_accuracy(t):.2f} ({t['seconds']:.0f} s)", flush=True)
    with open(os.path.join(teacher, "final_metrics.json")) as f:
        results = {"teacher": _accuracy(json.load(f)), "students": {}}
    for seed in _SEEDS.value:
        for name, (task, extra) in METHODS.items():
            model_dir = os.path.join(out, f"{name.replace(' ', '').replace('+', '_')}_seed{seed}")
            bindings = {"SEED": seed, "MIXTURE_OR_TASK_NAME": f"'{task}'"}
            if extra:
                bindings["TEACHER_DIR"] = f"'{teacher}'"
            final = _train(["kd/arith_student.gin", *extra], model_dir, bindings)
            acc = _accuracy(final)
            results["students"].setdefault(name, []).append(acc)
            print(f"{name} seed {seed}: accuracy {acc:.2f} ({final['seconds']:.0f} s)", flush=True)
            with open(_JSON.value or os.path.join(out, "results.json"), "w") as f:
                json.dump(results, f, indent=2)
    print("\n| student | test accuracy (%) per seed | mean ± sd |\n|---|---|---|")
    for name, accs in results["students"].items():
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        per_seed = ", ".join(f"{a:.1f}" for a in accs)
        print(f"| {name} | {per_seed} | {statistics.mean(accs):.1f} ± {sd:.1f} |")
    print(f"| teacher (2+2 layers, 256 wide, DSS) | {results['teacher']:.1f} | |")


if __name__ == "__main__":
    app.run(main)
