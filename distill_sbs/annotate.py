r"""Annotate a dataset with rationales from teachers: `python -m distill_sbs.annotate`.

    export OPENAI_API_KEY=...
    python -m distill_sbs.annotate --input data/train.jsonl --output runs/ann/train.jsonl \
        --teacher gpt --base_url https://api.openai.com/v1 --model gpt-4o-mini --api chat \
        --api_key_env OPENAI_API_KEY --strategy few_shot --exemplars my_exemplars.jsonl

or `--dataset cqa --split train` for a registered dataset, and `--teachers teachers.json` (a JSON
list of teacher objects with the fields of distill_sbs.teachers.TeacherConfig) for several
teachers. Writes

    OUTPUT                  the annotated records (JSONL, the format distill_sbs.data reads)
    OUTPUT.failed.jsonl     the examples some request failed for, with the errors
    OUTPUT.summary.json     the closing summary and the run's configuration (never a key)
    OUTPUT.cache.jsonl      (or --cache) every finished request; rerunning reuses it

and exits with status 0, or 2 when some examples failed (rerun the same command to retry only
the failed requests).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from distill_sbs import storage
from distill_sbs.data.records import Record, RecordError, read_jsonl, write_jsonl
from distill_sbs.teachers.cache import CacheError, RequestCache
from distill_sbs.teachers.pipeline import TeacherConfig, annotate, make_backend
from distill_sbs.teachers.prompts import STRATEGIES

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "JSONL file of records to annotate.")
flags.DEFINE_string("dataset", None, "A registered dataset (instead of --input), e.g. cqa.")
flags.DEFINE_string("split", "train", "The split of --dataset.")
flags.DEFINE_integer("limit", None, "Annotate only the first N examples.")
flags.DEFINE_string("output", None, "Output JSONL of annotated records.")
flags.DEFINE_string("cache", None, "Request cache (default: OUTPUT.cache.jsonl).")
flags.DEFINE_string("metric", None, "Answer match for accuracy (default: the dataset's).")
flags.DEFINE_string("teachers", None, "JSON file: a list of teacher configs (see TeacherConfig).")
# One teacher from flags (ignored when --teachers is given): one flag per TeacherConfig field
# ("name" is --teacher), with the field's default.
_TEACHER_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TeacherConfig)}
flags.DEFINE_string("teacher", "teacher", "Teacher name (the key in the records' 'teachers').")
flags.DEFINE_enum("backend", _TEACHER_DEFAULTS["backend"], ["openai", "local"], "Teacher backend.")
flags.DEFINE_string("base_url", None, "OpenAI-compatible base URL, e.g. http://host:8000/v1.")
flags.DEFINE_string("model", None, "Model name sent to the endpoint.")
flags.DEFINE_string("api_key_env", None, "NAME of the environment variable holding the API key.")
flags.DEFINE_enum("api", _TEACHER_DEFAULTS["api"], ["completions", "chat"], "Endpoint flavour.")
flags.DEFINE_string("checkpoint", None, "backend=local: checkpoint of the teacher model.")
flags.DEFINE_integer("batch_size", _TEACHER_DEFAULTS["batch_size"], "backend=local: batch rows.")
flags.DEFINE_enum("strategy", _TEACHER_DEFAULTS["strategy"], list(STRATEGIES), "Prompts.")
flags.DEFINE_string("exemplars", None, "Built-in exemplar set or JSONL file (few-shot).")
flags.DEFINE_integer(
    "k_shot", _TEACHER_DEFAULTS["k_shot"], "answer_given: in-context examples from the dataset."
)
flags.DEFINE_integer(
    "num_samples", _TEACHER_DEFAULTS["num_samples"], "Samples per example (diverse reasoning)."
)
flags.DEFINE_float(
    "temperature", _TEACHER_DEFAULTS["temperature"], "Sampling temperature (> 0 for samples > 1)."
)
flags.DEFINE_float("top_p", _TEACHER_DEFAULTS["top_p"], "Nucleus sampling.")
flags.DEFINE_integer("max_tokens", _TEACHER_DEFAULTS["max_tokens"], "Most tokens per request.")
flags.DEFINE_integer(
    "answer_max_tokens", _TEACHER_DEFAULTS["answer_max_tokens"], "zero_shot: answer tokens."
)
flags.DEFINE_boolean(
    "filter_correct", _TEACHER_DEFAULTS["filter_correct"], "Keep only samples matching gold."
)
flags.DEFINE_integer(
    "max_concurrency", _TEACHER_DEFAULTS["max_concurrency"], "Most requests in flight."
)
flags.DEFINE_float("requests_per_minute", None, "Rate limit.")
flags.DEFINE_float("timeout", _TEACHER_DEFAULTS["timeout"], "Seconds per request attempt.")
flags.DEFINE_integer(
    "max_retries", _TEACHER_DEFAULTS["max_retries"], "Retries (429, 5xx, timeouts, bad bodies)."
)
flags.DEFINE_float(
    "backoff_base", _TEACHER_DEFAULTS["backoff_base"], "Seconds before the first retry (doubles)."
)
flags.DEFINE_float(
    "retry_after_max", _TEACHER_DEFAULTS["retry_after_max"], "Cap on a server's Retry-After (s)."
)
flags.DEFINE_float(
    "max_total_backoff",
    _TEACHER_DEFAULTS["max_total_backoff"],
    "Most seconds one request waits between retries in all.",
)
flags.DEFINE_boolean("progress", True, "Show a progress line on stderr.")

# Every field but the name comes from the flag of the same name (a new field needs a flag).
_TEACHER_FLAGS = [name for name in _TEACHER_DEFAULTS if name != "name"]
_missing = [name for name in _TEACHER_FLAGS if name not in FLAGS]
if _missing:  # a programming error, caught by any test that imports this module
    raise ImportError(f"TeacherConfig fields without an annotate flag: {_missing}")


def teacher_configs() -> list[TeacherConfig]:
    if FLAGS.teachers:
        try:
            items = storage.read_json(FLAGS.teachers)
        except (OSError, ValueError) as e:
            raise app.UsageError(str(e)) from None
        if not isinstance(items, list) or not items:
            raise app.UsageError(f"{FLAGS.teachers}: expected a non-empty JSON list of teachers")
        return [
            TeacherConfig.from_dict(d, f"{FLAGS.teachers}: teacher {i}")
            for i, d in enumerate(items)
        ]
    d = {k: getattr(FLAGS, k) for k in _TEACHER_FLAGS}
    return [TeacherConfig(name=FLAGS.teacher, **d)]


def dataset_records(name: str, split: str) -> tuple[list[Record], str]:
    """(records, metric) of a registered dataset's split."""
    import distill_sbs.tasks  # noqa: F401  registers the built-in datasets
    from distill_sbs.data import registry

    try:
        spec = registry.get_dataset_spec(name)
        records = registry.load_records(name, split)
    except (KeyError, ValueError) as e:
        raise app.UsageError(f"--dataset {name} --split {split}: {e}") from e
    return records, spec.metric


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"examples: {summary['examples']} = {summary['annotated']} annotated "
        f"+ {summary['failed']} failed"
    ]
    for name, t in summary["teachers"].items():
        pr = "n/a" if t["parse_rate"] is None else f"{100 * t['parse_rate']:.1f}%"
        acc = "n/a" if t["accuracy"] is None else f"{100 * t['accuracy']:.1f}%"
        lines.append(
            f"[{name}] requests {t['requests']} = {t['cached']} cached + {t['completed']} "
            f"completed + {t['failed']} failed; {t['attempts']} sent, {t['retries']} retries"
            + (
                f" ({', '.join(f'{k}: {v}' for k, v in t['errors'].items())})"
                if t["errors"]
                else ""
            )
        )
        lines.append(
            f"[{name}] samples {t['samples']}: parsed {t['parsed']} ({pr}); accuracy vs gold "
            f"{t['correct']}/{t['with_gold']} ({acc}); filtered out {t['filtered_out']}; "
            f"tokens {t['prompt_tokens']} prompt + {t['completion_tokens']} completion"
        )
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    try:
        return _main(argv)
    except (RecordError, CacheError, OSError, ValueError) as e:
        # A user's error (bad record, file, config): one line, not a traceback.
        print(f"error: {e}", file=sys.stderr)
        return 1


def _main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if bool(FLAGS.input) == bool(FLAGS.dataset):
        raise app.UsageError("give exactly one of --input and --dataset")
    if not FLAGS.output:
        raise app.UsageError("--output is required")
    if FLAGS.input:
        records = read_jsonl(FLAGS.input)
        metric = FLAGS.metric or (
            "multiple_choice" if any(r.choices for r in records) else "accuracy"
        )
        dataset = None
    else:
        records, metric = dataset_records(FLAGS.dataset, FLAGS.split)
        metric = FLAGS.metric or metric
        dataset = FLAGS.dataset
    if FLAGS.limit is not None:
        records = records[: FLAGS.limit]
    configs = teacher_configs()
    teachers = [(cfg, make_backend(cfg)) for cfg in configs]
    cache_path = FLAGS.cache or FLAGS.output + ".cache.jsonl"
    with RequestCache(cache_path) as cache:
        result = annotate(
            records,
            teachers,
            cache,
            dataset=dataset,
            metric=metric,
            progress_stream=sys.stderr if FLAGS.progress else open(os.devnull, "w"),
        )
    for _, backend in teachers:
        backend.close()
    write_jsonl(FLAGS.output, result.records)
    failed = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in result.failed)
    storage.write_text(FLAGS.output + ".failed.jsonl", failed)
    summary = result.summary()
    run = {
        "input": FLAGS.input,
        "dataset": FLAGS.dataset,
        "split": FLAGS.split if FLAGS.dataset else None,
        "limit": FLAGS.limit,
        "metric": metric,
        "cache": cache_path,
        "teachers": [cfg.to_json() for cfg in configs],
    }
    storage.write_json(FLAGS.output + ".summary.json", {"summary": summary, "config": run})
    print(format_summary(summary), flush=True)
    return 2 if result.failed else 0


if __name__ == "__main__":
    app.run(main)
