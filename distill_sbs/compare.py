"""Train several students with the same settings and print their accuracies side by side (the
quickstart): `compare()` (gin-configurable), the majority-answer baseline it prints, and `main`.

    python -m distill_sbs.compare --gin_file=quickstart.gin

Each student of `compare.runs` ({name: mixture}) trains in MODEL_DIR/<name> with the `train`
settings of the gin files (see distill_sbs.train); the table lists every student's eval metrics
and, with `compare.baseline_dataset`, the majority-answer baseline.
"""

from __future__ import annotations

if __name__ == "__main__":
    # `python -m distill_sbs.compare` runs this file as __main__; hand over to the package's copy of
    # the module so that gin registers its configurables once (not also as __main__.*).
    from distill_sbs.compare import main as _main

    _main()
    raise SystemExit(0)

import time
from collections.abc import Mapping

import gin

from distill_sbs import cli, storage
from distill_sbs.train import train


@gin.configurable
def compare(
    runs: Mapping[str, str] = gin.REQUIRED,
    model_dir: str = gin.REQUIRED,
    baseline_dataset: str | None = None,
    baseline_split: str = "test",
) -> dict:
    """Trains one student per {name: mixture} in MODEL_DIR/<name> with the same settings and
    prints a table of their label accuracy (the quickstart).

    baseline_dataset: a registered dataset whose majority baseline (always answering the most
    frequent train label, scored by exact match on `baseline_split`) is printed as a last row.
    """
    results = {}
    for name, mixture in runs.items():
        print(f"=== {name}: {mixture} ===", flush=True)
        t0 = time.time()
        final = train(model_dir=storage.join(model_dir, name), mixture_or_task_name=mixture)
        results[name] = (mixture, final, time.time() - t0)
    print()
    print(f"{'student':<12} {'task':<20} {'metric':<36} {'value':>8} {'time':>8}")
    for name, (mixture, final, secs) in results.items():
        evals = {k: v for k, v in final.items() if not k.startswith("train/")}
        for k, v in sorted(evals.items()) or [("(no eval)", float("nan"))]:
            print(f"{name:<12} {mixture:<20} {k:<36} {v:>8.4f} {secs:>7.0f}s")
    out = {name: r[1] for name, r in results.items()}
    if baseline_dataset:
        label, acc = majority_baseline(baseline_dataset, baseline_split)
        metric = f"always {label!r} (train majority)"
        print(f"{'majority':<12} {baseline_dataset:<20} {metric:<36} {acc:>8.4f} {'-':>8}")
        out["majority"] = {"label": label, "accuracy": acc}
    return out


def majority_baseline(dataset: str, split: str = "test") -> tuple[str, float]:
    """(most frequent gold label of the train split, % of `split` records with that label)."""
    import collections

    from distill_sbs import data

    def gold(split_name: str, subsample: bool = False) -> list[str]:
        records = data.load_records(dataset, split_name, subsample=subsample)
        return [r.label for r in records if r.label is not None]

    train_labels, labels = gold("train", subsample=True), gold(split)
    if not train_labels or not labels:
        raise ValueError(f"majority baseline: {dataset!r} has no gold labels on train or {split}")
    # most_common breaks ties by first occurrence, which is deterministic for a fixed dataset.
    label = collections.Counter(train_labels).most_common(1)[0][0]
    return label, 100.0 * sum(lb == label for lb in labels) / len(labels)


def main() -> None:
    cli.run(lambda: compare())
