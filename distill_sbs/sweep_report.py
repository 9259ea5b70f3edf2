"""The results of a sweep (distill_sbs.sweep): results.csv (one row per run), results.md (per cell
the mean over seeds with its 95 % interval and std; per method the paired difference against
fine-tuning) and PNG plots (accuracy vs train fraction, one line per method with 95 % interval
bars; accuracy vs model size where the grid has several)."""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence

from etils import epath

# Axis names the report knows how to draw (they are also the paper configs' macros).
METHOD, FRACTION, SEED, MODEL = "METHOD", "TRAIN_FRACTION", "SEED", "model"
BASELINE = "finetune"  # the paper compares every method with fine-tuning on the same data


def write_csv(path: epath.Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(out.getvalue())


def cells(rows: Sequence[dict], axes: Sequence[str], value: str) -> list[tuple[dict, list[float]]]:
    """[(the axis values of a cell without SEED, the values of its runs)], in grid order."""
    keys = [a for a in axes if a != SEED]
    grouped: dict[tuple, list[float]] = {}
    for row in rows:
        grouped.setdefault(tuple(row[k] for k in keys), []).append(float(row[value]))
    return [(dict(zip(keys, k, strict=True)), v) for k, v in grouped.items()]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its two-sided 95 % Student-t interval (nan for one value)."""
    from scipy import stats  # 0.8 s to import: only when a report is written

    mean, std = mean_std(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, float(stats.t.ppf(0.975, len(values) - 1)) * std / len(values) ** 0.5


def paired_differences(
    rows: Sequence[dict], axes: Sequence[str], value: str, baseline: str = BASELINE
) -> list[tuple[dict, list[float]]]:
    """[(a cell of another method, its runs' `value` minus the baseline's run with the same
    seed and other axes)], in grid order; cells without a baseline run are left out."""
    if METHOD not in axes:
        return []
    others = [a for a in axes if a != METHOD]
    base = {tuple(r[a] for a in others): float(r[value]) for r in rows if r[METHOD] == baseline}
    paired = [
        {**r, value: float(r[value]) - base[tuple(r[a] for a in others)]}
        for r in rows
        if r[METHOD] != baseline and tuple(r[a] for a in others) in base
    ]
    return cells(paired, axes, value)


def _pm(mean: float, half: float) -> str:
    return f"{mean:.2f}" if math.isnan(half) else f"{mean:.2f} +- {half:.2f}"  # nan: one run


def write_markdown(
    path: epath.Path, rows: Sequence[dict], axes: Sequence[str], value: str, title: str
) -> None:
    keys = [a for a in axes if a != SEED]
    lines = [
        f"# {title}",
        "",
        f"Test `{value}` of the checkpoint selected on the validation split: mean over seeds +- "
        "the half-width of its 95 % t-interval, the sample std, and the number of runs.",
        "",
        "| " + " | ".join([*keys, value, "std", "n"]) + " |",
        "|" + "---|" * (len(keys) + 3),
    ]
    for cell, values in cells(rows, axes, value):
        _, std = mean_std(values)
        lines.append(
            "| "
            + " | ".join([*(cell[k] for k in keys), _pm(*mean_interval(values)), f"{std:.2f}"])
            + f" | {len(values)} |"
        )
    differences = paired_differences(rows, axes, value)
    if differences:
        lines += [
            "",
            f"Paired difference against `{BASELINE}` (the same seed and other axes): mean +- the "
            "half-width of its 95 % t-interval, and the runs where the method is ahead.",
            "",
            "| " + " | ".join([*keys, f"{value} - {BASELINE}", "ahead"]) + " |",
            "|" + "---|" * (len(keys) + 2),
        ]
        for cell, diffs in differences:
            ahead = f"{sum(d > 0 for d in diffs)} of {len(diffs)}"
            lines.append(
                "| "
                + " | ".join([*(cell[k] for k in keys), _pm(*mean_interval(diffs)), ahead])
                + " |"
            )
    path.write_text("\n".join(lines) + "\n")


def _sort_key(text: str):
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def _line_plot(ax, rows, axes, value: str, x_axis: str, numeric_x: bool) -> None:
    """One line per METHOD (or one line) of `value` against `x_axis`, with 95 % interval bars
    (none for a single run)."""
    keys = [a for a in axes if a not in (SEED, x_axis, METHOD)]
    methods = sorted({r.get(METHOD, "") for r in rows}, key=_sort_key)
    for method in methods:
        for panel_key in sorted({tuple(r[k] for k in keys) for r in rows}):
            sub = [
                r
                for r in rows
                if r.get(METHOD, "") == method and tuple(r[k] for k in keys) == panel_key
            ]
            xs = sorted({r[x_axis] for r in sub}, key=_sort_key)
            points = [mean_interval([float(r[value]) for r in sub if r[x_axis] == x]) for x in xs]
            label = " ".join(filter(None, [method, *panel_key])) or value
            positions = [float(x) for x in xs] if numeric_x else list(range(len(xs)))
            ax.errorbar(
                positions,
                [m for m, _ in points],
                yerr=[0.0 if math.isnan(h) else h for _, h in points],
                marker="o",
                capsize=3,
                label=label,
            )
            if not numeric_x:
                ax.set_xticks(positions, xs)
    ax.set_ylabel(value.replace("_", " ", 1) if value.startswith("test_") else value)
    ax.grid(alpha=0.3)
    ax.legend()


def plot(
    out_dir: epath.Path, rows: Sequence[dict], axes: Sequence[str], value: str, title: str
) -> list[str]:
    """Draws the plots the grid allows; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    written = []
    if FRACTION in axes:
        fig, ax = plt.subplots(figsize=(6, 4))
        _line_plot(ax, rows, axes, value, FRACTION, numeric_x=True)
        ax.set_xscale("log", base=2)
        fractions = sorted({float(r[FRACTION]) for r in rows})
        ax.set_xticks(fractions, [f"{100 * f:g}%" for f in fractions])
        ax.set_xlabel("fraction of the training split")
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(str(out_dir / "accuracy_vs_fraction.png"), dpi=120)
        plt.close(fig)
        written.append("accuracy_vs_fraction.png")
    if MODEL in axes and not _single(rows, MODEL):
        biggest = max((r[FRACTION] for r in rows), key=_sort_key) if FRACTION in axes else None
        sub = [r for r in rows if biggest is None or r[FRACTION] == biggest]
        fig, ax = plt.subplots(figsize=(6, 4))
        _line_plot(ax, sub, [a for a in axes if a != FRACTION], value, MODEL, numeric_x=False)
        share = f" ({100 * float(biggest):g}% of train)" if biggest else ""
        ax.set_xlabel("student model" + share)
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(str(out_dir / "accuracy_vs_model.png"), dpi=120)
        plt.close(fig)
        written.append("accuracy_vs_model.png")
    return written


def _single(rows: Sequence[dict], axis: str) -> bool:
    return len({r.get(axis) for r in rows}) <= 1
