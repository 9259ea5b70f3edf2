"""DSS + KD vs DSS vs fine-tuning on the embedded `arith` data, 3 seeds (docs/distillation.md).

Trains the teacher once (gin/kd/arith_teacher.gin, then arith_teacher_stage2.gin and
arith_teacher_full.gin, each from the previous checkpoint; a stage is kept if its MODEL_DIR has
final metrics) and scores it on test, then for
each seed the three students of gin/kd/arith_student.gin with the same steps, each in its own
process (a student whose MODEL_DIR has final metrics is kept, so an interrupted run resumes);
prints a table of test accuracy and writes it as JSON, with each run's seconds and the load
average (1 min) at its end: the machine may be shared.

    python benchmarks/kd_arith.py --out_dir=/tmp/kd_arith --seeds=0,1,2 --kd_source=offline

--kd_source=online runs the teacher inside every KD student's step (gin/kd/arith_kd.gin);
offline scores the train split with it once (distill_sbs.annotate_topk, top-8) and the KD
students read those log-probabilities (gin/kd/arith_kd_offline.gin): the same objective at the
cost of a DSS student, up to the top-k truncation.
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
_SOURCE = flags.DEFINE_enum("kd_source", "offline", ["online", "offline"], "teacher source")
_K = flags.DEFINE_integer("k", 8, "with --kd_source=offline: log-probabilities kept per token")
_GAMMA = flags.DEFINE_float("gamma", 0.5, "KD weight on the label and the rationale tokens")

METHODS = {  # name -> (task, use the teacher)
    "fine-tuning": ("arith_finetune", False),
    "DSS": ("arith_dss", False),
    "DSS + KD": ("arith_dss", True),
}


def _run(args: list[str]) -> dict:
    t0 = time.time()
    subprocess.run([sys.executable, "-m", *args], check=True, stdout=subprocess.DEVNULL)
    return {"seconds": round(time.time() - t0, 1), "load_1min": round(os.getloadavg()[0], 2)}


def _train(gin_files: list[str], model_dir: str, bindings: dict[str, str]) -> dict:
    """Final metrics of one training run (trained unless MODEL_DIR has them), with its cost."""
    path = os.path.join(model_dir, "final_metrics.json")
    cost = {}
    if not os.path.exists(path):
        args = ["distill_sbs.train", *[f"--gin_file={g}" for g in gin_files]]
        args += [f"--gin.MODEL_DIR='{model_dir}'"] + [f"--gin.{k}={v}" for k, v in bindings.items()]
        cost = _run(args)
        with open(os.path.join(model_dir, "cost.json"), "w") as f:
            json.dump(cost, f)
    elif os.path.exists(os.path.join(model_dir, "cost.json")):
        with open(os.path.join(model_dir, "cost.json")) as f:
            cost = json.load(f)
    with open(path) as f:
        return {**json.load(f), **cost}


def _accuracy(final: dict) -> float:
    (value,) = [v for k, v in final.items() if k.endswith("accuracy") and "train/" not in k]
    return float(value)


def _teacher(out: str) -> tuple[str, dict]:
    """(MODEL_DIR, accuracies and seconds) of the three-stage teacher: gin/kd/arith_teacher.gin,
    arith_teacher_stage2.gin (both on train less a validation split), arith_teacher_full.gin."""
    dirs = [os.path.join(out, d) for d in ("teacher_stage1", "teacher_stage2", "teacher")]
    t1 = _train(["kd/arith_teacher.gin"], dirs[0], {})
    t2 = _train(["kd/arith_teacher_stage2.gin"], dirs[1], {"STAGE1_DIR": f"'{dirs[0]}'"})
    t3 = _train(["kd/arith_teacher_full.gin"], dirs[2], {"STAGE2_DIR": f"'{dirs[1]}'"})
    return dirs[2], {
        "validation": [_accuracy(t1), _accuracy(t2)],
        "test": _accuracy(t3),
        "seconds": [t.get("seconds") for t in (t1, t2, t3)],
    }


def _describe(model_dir: str) -> str:
    with open(os.path.join(model_dir, "config.json")) as f:
        m = json.load(f)["model"]
    return f"{m['num_encoder_layers']}+{m['num_decoder_layers']} layers, {m['emb_dim']} wide"


def _kd_setup(teacher: str, out: str) -> tuple[list[str], dict[str, str]]:
    """(extra gin files, bindings) of the KD students; offline writes the top-k file once."""
    if _SOURCE.value == "online":
        return ["kd/arith_kd.gin"], {"TEACHER_DIR": f"'{teacher}'"}
    topk = os.path.join(out, f"arith_dss.top{_K.value}.npz")
    if not os.path.exists(topk):
        cost = _run(
            [
                "distill_sbs.annotate_topk",
                f"--teacher={teacher}",
                "--task=arith_dss",
                f"--k={_K.value}",
                f"--output={topk}",
            ]
        )
        print(f"top-{_K.value} file: {os.path.getsize(topk)} bytes ({cost})", flush=True)
    return ["kd/arith_kd_offline.gin"], {"TOPK_FILE": f"'{topk}'"}


def _print_table(results: dict) -> None:
    print("\n| student | test accuracy (%) per seed | mean ± sd |\n|---|---|---|")
    for name, accs in results["students"].items():
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        per_seed = ", ".join(f"{a:.1f}" for a in accs)
        print(f"| {name} | {per_seed} | {statistics.mean(accs):.1f} ± {sd:.1f} |")
    print(f"| teacher ({results['teacher_model']}) | {results['teacher']:.1f} | |")


def main(argv: list[str]) -> None:
    del argv
    out = _OUT.value
    teacher, t = _teacher(out)
    print(f"teacher: {t}", flush=True)
    results = {"teacher": t["test"], "teacher_model": _describe(teacher), "kd_source": None}
    results["gamma"] = _GAMMA.value
    results.update({"teacher_runs": t, "students": {}, "costs": {}})
    for seed in _SEEDS.value:
        for name, (task, kd) in METHODS.items():
            model_dir = os.path.join(out, f"{name.replace(' ', '').replace('+', '_')}_seed{seed}")
            extra, bindings = [], {"SEED": seed, "MIXTURE_OR_TASK_NAME": f"'{task}'"}
            if kd:
                extra, kd_bindings = _kd_setup(teacher, out)
                bindings.update(kd_bindings)
                bindings["KD.weights"] = f"{{'label': {_GAMMA.value}, 'rationale': {_GAMMA.value}}}"
                results["kd_source"] = _SOURCE.value
            final = _train(["kd/arith_student.gin", *extra], model_dir, bindings)
            acc = _accuracy(final)
            results["students"].setdefault(name, []).append(acc)
            results["costs"].setdefault(name, []).append(
                {k: final.get(k) for k in ("seconds", "load_1min")}
            )
            print(f"{name} seed {seed}: accuracy {acc:.2f} ({final.get('seconds')} s)", flush=True)
            with open(_JSON.value or os.path.join(out, "results.json"), "w") as f:
                json.dump(results, f, indent=2)
    _print_table(results)


if __name__ == "__main__":
    app.run(main)
