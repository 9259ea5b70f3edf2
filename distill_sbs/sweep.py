"""Sweeps: a grid of training runs from gin files plus axes, run one after another (or printed as
launcher commands), each selected on the validation split and scored on the test split, collected
into tables and plots.

    python -m distill_sbs.sweep --gin_file=paper/base.gin --gin_file=models/t5_1_1_base.gin \\
        --gin.PRETRAINED_DIR="'/ckpt/t5-v1_1-base'" --gin.DATA_DIR="'/data/dss'" \\
        --axis=dataset=cqa,svamp --axis=METHOD=finetune,dss \\
        --axis=TRAIN_FRACTION=0.125,0.25,0.5,1.0 --axis=SEED=0,1,2 --out=/runs/sweep

An axis is NAME=v1,v2,...: `dataset` and `model` add the gin file paper/<v>.gin or models/<v>.gin;
any other NAME is a gin macro of the files (METHOD, TRAIN_FRACTION, SEED, LEARNING_RATE, ...) or a
`configurable.parameter`, bound to each value (a Python literal, else a string); a linked axis
NAME1+NAME2=a1:b1,a2:b2 moves names together (model+PRETRAINED_DIR=t5_1_1_base:/ckpt/base,...). The
grid is the product of the axes, in the order given. Each run trains in OUT/runs/<axis=value,...>/
with `distill_sbs.train.train`, which keeps the checkpoint with the best `train.best_metric` on
`train.eval_split` (the validation split: paper/base.gin carves one from train where a dataset has
none) in MODEL_DIR/best/; that checkpoint is then scored on the test split and the scores are
written to MODEL_DIR/sweep_result.json. Rerunning the same command skips finished runs and resumes
interrupted ones from their MODEL_DIR. OUT collects results.csv, results.md (mean +- std over
seeds) and the plots (distill_sbs.sweep_report).

Runs execute in this process, one after another (gin is cleared and re-parsed per run, and the
JAX compilation cache under OUT/jax_cache spares recompiling the same shapes); --print_commands
instead prints one command per unfinished run (`--only=<run>`) for a launcher, e.g.
`--launcher="MODULE=distill_sbs.sweep launch/tpu_vm.sh my-tpu us-central2-b"`; --collect_only
then writes the tables and plots of the finished runs (also while a sweep is still running).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import itertools
import json
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

import gin
from absl import flags
from etils import epath

from distill_sbs import cli, sweep_report
from distill_sbs.errors import UserError

FLAGS = flags.FLAGS
MANIFEST = "sweep.json"  # OUT/sweep.json: the gin files and bindings the runs share
RUN_MARKER = "sweep_run.json"  # MODEL_DIR/sweep_run.json: what this run is
RESULT = "sweep_result.json"  # MODEL_DIR/sweep_result.json: its scores, written when done
FILE_AXES = {"dataset": "paper/{}.gin", "model": "models/{}.gin"}


class SweepError(UserError):
    """A user error in the sweep's input: reported as one line, before training where possible."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One cell x seed of the grid: its axis values and the gin it trains with."""

    axes: tuple[tuple[str, str], ...]  # ((axis, value text), ...) in axis order
    gin_files: tuple[str, ...]
    bindings: tuple[str, ...]

    @property
    def name(self) -> str:
        return ",".join(f"{a}={v}" for a, v in self.axes).replace("/", "_") or "run"

    def describe(self) -> dict:
        return {"axes": dict(self.axes), "gin_files": self.gin_files, "bindings": self.bindings}


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What a run's parsed gin config says about scoring it."""

    mixture: str
    best_metric: str  # "<task>/<metric>" selecting the checkpoint on eval_split
    eval_split: str
    task_feature_lengths: dict
    eval_batch_size: int
    max_decode_length: int | None


# ---- the grid ---------------------------------------------------------------------------------


def parse_axes(specs: Sequence[str]) -> list[tuple[tuple[str, ...], list[tuple[str, ...]]]]:
    """[(names, [values, ...])] of --axis=NAME=v1,v2 flags; a linked axis NAME1+NAME2=a1:b1,a2:b2
    moves several names together (e.g. a model size and its pretrained checkpoint)."""
    axes: list = []
    seen: set[str] = set()
    for spec in specs:
        key, sep, values = spec.partition("=")
        names = tuple(n.strip() for n in key.split("+"))
        # The last part keeps any further ':' (model+PRETRAINED_DIR=base:gs://bucket/base).
        split = [v.split(":", len(names) - 1) for v in values.split(",") if v.strip()]
        items = [tuple(p.strip() for p in parts) for parts in split]
        if not sep or not all(names) or not items:
            raise SweepError(f"--axis={spec}: expected NAME=value1,value2,...")
        if len(names) > 1 and any(len(i) != len(names) for i in items):
            raise SweepError(f"--axis={spec}: each value needs {len(names)} parts joined by ':'")
        if seen & set(names):
            raise SweepError(f"--axis {', '.join(sorted(seen & set(names)))} given twice")
        if len(set(items)) != len(items):
            raise SweepError(f"--axis={spec}: a value is repeated")
        seen |= set(names)
        axes.append((names, items))
    return axes


def _literal(text: str) -> str:
    """A gin value: the text if it is a Python literal (0.5, 3, True, 'x'), else a quoted string."""
    try:
        ast.literal_eval(text)
        return text
    except (ValueError, SyntaxError):
        return repr(text)


def grid(gin_files: Sequence[str], bindings: Sequence[str], axes: Sequence) -> list[RunSpec]:
    """The runs of the product of the axes (the last axis varies fastest)."""
    runs = []
    for values in itertools.product(*(v for _, v in axes)):
        files, binds, pairs = list(gin_files), list(bindings), []
        for (names, _), parts in zip(axes, values, strict=True):
            for axis, value in zip(names, parts, strict=True):
                if axis in FILE_AXES:
                    files.append(FILE_AXES[axis].format(value))
                else:
                    binds.append(f"{axis} = {_literal(value)}")
                pairs.append((axis, value))
        runs.append(RunSpec(tuple(pairs), tuple(files), tuple(binds)))
    return runs


# ---- checks before training -------------------------------------------------------------------


def _value(parameter: str) -> Any:
    """A parameter or %MACRO of the parsed config, references resolved (a configurable's result)."""
    value = gin.query_parameter(parameter)
    while isinstance(value, gin.config.ConfigurableReference) and value.evaluate:
        value = value.scoped_configurable_fn()
    return value


def _optional(parameter: str, default: Any) -> Any:
    try:
        return _value(parameter)
    except ValueError:  # not bound: the function's default applies
        return default


def parse(files: Sequence[str], bindings: Sequence[str]) -> None:
    """Clears gin and parses a run's config (the one way every run and check gets its config)."""
    gin.clear_config()
    try:
        cli.parse_gin(files, bindings)
    except (SystemExit, ValueError) as e:  # cli reports gin errors as UserError(message)
        raise SweepError(str(e)) from None


def check_axes(gin_files, bindings, axes) -> None:
    """Every macro axis names a macro the gin files define (gin accepts unused macros silently)."""
    parse(gin_files, bindings)
    for name in (n for names, _ in axes for n in names):
        if name in FILE_AXES or "." in name:
            continue  # files are checked when parsed; gin checks configurable.parameter names
        try:
            gin.query_parameter("%" + name)
        except ValueError:
            raise SweepError(
                f"--axis {name}: no gin file defines the macro {name} (nor is it 'dataset' or "
                f"'model'); the files are {list(gin_files)}"
            ) from None


def plan(run: RunSpec, test_split: str) -> RunPlan:
    """Parses the run's config and checks what training and scoring will need from it."""
    from distill_sbs import data, paper
    from distill_sbs.data import registry

    where = f"run {run.name}"
    try:
        parse(run.gin_files, run.bindings)
        mixture = _value("train.mixture_or_task_name")
        best = _optional("train.best_metric", None)
        eval_split = _optional("train.eval_split", "test")
        data.get_options()  # validates DatasetOptions (e.g. a train fraction outside (0, 1])
        scored = paper.scored_task(mixture)
        dataset, _ = registry.dataset_and_method(mixture)
        data.load_records(dataset, eval_split)  # the validation split exists (or is carved)
    except (ValueError, KeyError) as e:  # UserError included
        raise SweepError(f"{where}: {cli.one_line(e)}") from None
    if not best:
        raise SweepError(f"{where}: train.best_metric is not set; sweeps select checkpoints by it")
    if eval_split == test_split:
        raise SweepError(
            f"{where}: train.eval_split is {eval_split!r}, the split runs are scored on; select "
            "checkpoints on a validation split (paper/base.gin does)"
        )
    task, _, metric = best.partition("/")
    produced = metric_names(dataset)
    if task != scored or metric not in produced:
        raise SweepError(
            f"{where}: train.best_metric={best!r} is not a result of this run; it reports "
            f"{', '.join(f'{scored}/{m}' for m in produced)}"
        )
    return RunPlan(
        mixture=mixture,
        best_metric=best,
        eval_split=eval_split,
        task_feature_lengths=dict(_value("train.task_feature_lengths")),
        eval_batch_size=_optional("train.eval_batch_size", 32),
        max_decode_length=_optional("train.max_decode_length", None),
    )


def metric_names(dataset: str) -> list[str]:
    """The metric names the dataset's metric function reports (e.g. ["numeric_accuracy"])."""
    from distill_sbs import data, metrics

    fn = metrics.METRICS[data.get_dataset_spec(dataset).metric].metric_fn
    return sorted(fn(["0"], ["0"]))


def config_fingerprint(gin_files, bindings) -> str:
    """sha256 of the parsed config the runs share (every binding of the files and their includes):
    an edited gin file changes it while its name stays the same."""
    parse(gin_files, bindings)
    return hashlib.sha256(gin.config_str().encode()).hexdigest()


def check_manifest(out: epath.Path, gin_files, bindings, fingerprint: str) -> None:
    """OUT belongs to this sweep: its manifest, if any, names the same gin files and bindings, and
    they parse to the same config (finished runs of an edited config are not reused)."""
    mine = {"gin_files": list(gin_files), "bindings": list(bindings)}
    path = out / MANIFEST
    if path.exists():
        theirs = json.loads(path.read_text())
        if {k: theirs.get(k) for k in mine} != mine:
            raise SweepError(
                f"--out={out} holds another sweep ({path}: gin files {theirs.get('gin_files')}, "
                f"bindings {theirs.get('bindings')}); use a new --out"
            )
        if theirs.get("config_sha256") != fingerprint:
            raise SweepError(
                f"--out={out} holds a sweep of the same gin files with other contents ({path}: "
                "config_sha256 differs; a gin file changed since); use a new --out"
            )
    elif (out / "runs").exists():
        raise SweepError(f"--out={out} has runs/ but no {MANIFEST}: not a sweep of this tool")


def check_run_dir(run_dir: epath.Path, run: RunSpec) -> None:
    """A run directory that exists was made by this run of this sweep."""
    marker = run_dir / RUN_MARKER
    if marker.exists():
        if json.loads(marker.read_text()) != json.loads(json.dumps(run.describe())):
            raise SweepError(f"{run_dir} belongs to another sweep ({marker} differs)")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise SweepError(f"{run_dir} exists without {RUN_MARKER}: not a run of this sweep")


# ---- running ----------------------------------------------------------------------------------


def execute(run: RunSpec, run_plan: RunPlan, run_dir: epath.Path, test_split: str) -> dict:
    """Trains (or resumes) one run, scores its best checkpoint on `test_split`, writes RESULT."""
    import distill_sbs
    from distill_sbs import eval as evaluation
    from distill_sbs import train as training

    started = time.time()
    (run_dir).mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_MARKER).write_text(json.dumps(run.describe(), indent=2))
    parse(run.gin_files, run.bindings)
    training.train(model_dir=str(run_dir))
    best_dir = run_dir / "best"
    steps = sorted(int(p.name.split("_")[-1]) for p in best_dir.glob("checkpoint_*"))
    if not steps:
        raise SweepError(
            f"{run_dir}: no best checkpoint: {run_plan.best_metric} never appeared in the "
            f"evaluation on {run_plan.eval_split!r}"
        )
    model, params = distill_sbs.load(str(best_dir))
    test, _ = evaluation.evaluate_tasks(
        model,
        params,
        run_plan.mixture,
        split=test_split,
        task_feature_lengths=run_plan.task_feature_lengths,
        batch_size=run_plan.eval_batch_size,
        max_decode_length=run_plan.max_decode_length,
    )
    selected = best_dir / f"checkpoint_{steps[-1]}" / "metrics" / "metrics"  # orbax keeps it
    validation = json.loads(selected.read_text()) if selected.exists() else {}
    result = {
        "run": run.name,
        "axes": dict(run.axes),
        "best_step": steps[-1],
        "selected_on": run_plan.eval_split,
        "validation": validation,
        "test_split": test_split,
        "test": test,
        "seconds": time.time() - started,
    }
    tmp = run_dir / (RESULT + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.rename(run_dir / RESULT)  # a run is finished exactly when its result file exists
    return result


def read_result(run_dir: epath.Path) -> dict | None:
    path = run_dir / RESULT
    return json.loads(path.read_text()) if path.exists() else None


def _eta(durations: Sequence[float], left: int) -> str:
    if not durations:
        return "ETA ?"
    return f"ETA {sum(durations) / len(durations) * left / 60:.1f} min"


def run_all(runs: Sequence[RunSpec], plans: dict, out: epath.Path, test_split: str) -> None:
    """Trains the unfinished runs one after another, printing runs done / left and an ETA."""
    todo = [r for r in runs if read_result(out / "runs" / r.name) is None]
    done = len(runs) - len(todo)
    print(f"[sweep] {len(runs)} runs: {done} done, {len(todo)} to run", flush=True)
    durations: list[float] = []
    for i, run in enumerate(todo):
        left = len(todo) - i
        print(
            f"[sweep] run {done + i + 1}/{len(runs)} {run.name} ({done + i} done, {left} left, "
            f"{_eta(durations, left)})",
            flush=True,
        )
        t0 = time.time()
        execute(run, plans[run.name], out / "runs" / run.name, test_split)
        durations.append(time.time() - t0)
    print(f"[sweep] all {len(runs)} runs done", flush=True)


def print_commands(runs: Sequence[RunSpec], out: epath.Path, argv: Sequence[str]) -> None:
    """One command per unfinished run: this sweep's own flags plus --only=<run>."""
    own = [a for a in argv[1:] if not a.startswith(("--print_commands", "--launcher", "--only"))]
    for run in runs:
        if read_result(out / "runs" / run.name) is None:
            args = " ".join(shlex.quote(a) for a in [*own, f"--only={run.name}"])
            print(f"{FLAGS.launcher} {args}")


# ---- results ----------------------------------------------------------------------------------


def run_metrics(
    runs: Sequence[RunSpec], plans: dict[str, RunPlan], metric: str | None
) -> dict[str, str]:
    """The metric each run reports: `metric` (--metric) for all, else the one of its own
    train.best_metric (a grid over datasets mixes them: cqa's accuracy, svamp's
    equation_accuracy). SweepError if --metric is not a result of some run."""
    from distill_sbs.data import registry

    chosen = {}
    for run in runs:
        name = metric or plans[run.name].best_metric.split("/")[-1]
        produced = metric_names(registry.dataset_and_method(plans[run.name].mixture)[0])
        if name not in produced:
            raise SweepError(f"--metric={name}: run {run.name} reports only {', '.join(produced)}")
        chosen[run.name] = name
    return chosen


def collect(
    runs: Sequence[RunSpec], out: epath.Path, metrics: dict[str, str], title: str
) -> list[dict]:
    """results.csv, results.md and the plots of the finished runs; returns the rows.

    metrics: each run's metric (run_metrics). One for all runs: columns validation_<metric> and
    test_<metric>; several: a `metric` column, then `validation` and `test`."""
    axes = [a for a, _ in runs[0].axes] if runs else []
    names = sorted({metrics[r.name] for r in runs})
    suffix = f"_{names[0]}" if len(names) == 1 else ""
    rows = []
    for run in runs:
        result = read_result(out / "runs" / run.name)
        if result is None:
            continue
        metric = metrics[run.name]
        key = next((k for k in result["test"] if k.split("/")[-1] == metric), None)
        if key is None:
            raise SweepError(
                f"{run.name}: metric {metric!r} is not in its results ({', '.join(result['test'])})"
            )
        val = next((v for k, v in result["validation"].items() if k.endswith("/" + metric)), "")
        rows.append(
            {
                "run": run.name,
                **dict(run.axes),
                "best_step": result["best_step"],
                **({} if suffix else {"metric": metric}),
                f"validation{suffix}": val,
                f"test{suffix}": result["test"][key],
                "seconds": round(result["seconds"], 1),
            }
        )
    if not rows:
        print("[sweep] no finished runs to collect")
        return rows
    value = f"test{suffix}"
    columns = ["run", *axes, "best_step", *([] if suffix else ["metric"]), f"validation{suffix}",
               value, "seconds"]  # fmt: skip
    sweep_report.write_csv(out / "results.csv", rows, columns)
    sweep_report.write_markdown(out / "results.md", rows, axes, value, title)
    plots = sweep_report.plot(out, rows, axes, value, title)
    print(f"[sweep] {len(rows)} runs -> {out}/results.csv, results.md, {', '.join(plots)}")
    return rows


def sweep(argv: Sequence[str]) -> None:
    """The entry point's work, after flag parsing: check everything, then run, then collect."""

    if not FLAGS.out:
        raise SweepError("--out is required")
    out = epath.Path(FLAGS.out)
    files, bindings = list(FLAGS.gin_file), list(FLAGS.gin_bindings)
    axes = parse_axes(FLAGS.axis)
    runs = grid(files, bindings, axes)
    unknown = set(FLAGS.only) - {r.name for r in runs}
    if unknown:
        raise SweepError(f"--only: no run named {sorted(unknown)} in this grid")
    fingerprint = config_fingerprint(files, bindings)
    check_manifest(out, files, bindings, fingerprint)
    check_axes(files, bindings, axes)
    plans = {r.name: plan(r, FLAGS.test_split) for r in runs}
    metrics = run_metrics(runs, plans, FLAGS.metric)
    for run in runs:
        check_run_dir(out / "runs" / run.name, run)
    if FLAGS.print_commands:
        print_commands(runs, out, argv)
        return
    if not FLAGS.collect_only:
        _use_compilation_cache(out)
        out.mkdir(parents=True, exist_ok=True)
        manifest = {"gin_files": files, "bindings": bindings, "config_sha256": fingerprint}
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
        selected = [r for r in runs if not FLAGS.only or r.name in FLAGS.only]
        run_all(selected, plans, out, FLAGS.test_split)
    collect(runs, out, metrics, FLAGS.title or out.name)


def _use_compilation_cache(out: epath.Path) -> None:
    import jax

    jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def define_flags() -> None:
    """The sweep's flags, defined only when it runs as a program: defined at import they would
    clash with other entry points' flags of the same name (--metric, --out) in one process."""
    flags.DEFINE_string(
        "out", None, "Directory of the sweep: runs/, results.csv, results.md, plots."
    )
    flags.DEFINE_multi_string("axis", [], "NAME=v1,v2,...: one axis of the grid (repeatable).")
    flags.DEFINE_string(
        "metric", None, "Metric to report (default: each run's own, that of its train.best_metric)."
    )
    flags.DEFINE_string("test_split", "test", "Split the selected checkpoint is scored on.")
    flags.DEFINE_multi_string("only", [], "Run only these runs (names as in OUT/runs/).")
    flags.DEFINE_boolean(
        "print_commands", False, "Print a command per unfinished run; train nothing."
    )
    flags.DEFINE_boolean(
        "collect_only", False, "Collect the finished runs' results; train nothing."
    )
    flags.DEFINE_string(
        "launcher", "python -m distill_sbs.sweep", "Command prefix for --print_commands."
    )
    flags.DEFINE_string("title", None, "Title of results.md and the plots (default: the OUT name).")


def main() -> None:
    define_flags()
    # cli.run: absl flags, gin parsed once (the shared files and bindings: a typo fails here),
    # user errors as one line and exit status 2.
    cli.run(lambda: sweep(sys.argv))


if __name__ == "__main__":
    main()
