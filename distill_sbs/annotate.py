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
import typing
from typing import Any

from absl import flags

from distill_sbs import program, storage
from distill_sbs.data.records import Record, read_jsonl, write_jsonl
from distill_sbs.errors import UserError
from distill_sbs.program import one_line
from distill_sbs.teachers.cache import CacheError, RequestCache
from distill_sbs.teachers.pipeline import TeacherConfig, annotate, make_backend
from distill_sbs.teachers.prompts import STRATEGIES

FLAGS = flags.FLAGS

# The flag of each TeacherConfig field (one teacher from flags; ignored with --teachers): the
# field's name ("name" is --teacher), type and default, with this help; a new field needs a line.
_TEACHER_HELP = {
    "name": "Teacher name (the key in the records' 'teachers').",
    "backend": "Teacher backend.",
    "base_url": "OpenAI-compatible base URL, e.g. http://host:8000/v1.",
    "model": "Model name sent to the endpoint.",
    "api_key_env": "NAME of the environment variable holding the API key.",
    "api": "Endpoint flavour.",
    "max_concurrency": "Most requests in flight.",
    "requests_per_minute": "Rate limit.",
    "timeout": "Seconds per request attempt.",
    "max_retries": "Retries (429, 5xx, timeouts, bad bodies).",
    "backoff_base": "Seconds before the first retry (doubles).",
    "retry_after_max": "Cap on a server's Retry-After (s).",
    "max_total_backoff": "Most seconds one request waits between retries in all.",
    "checkpoint": "backend=local: checkpoint of the teacher model.",
    "batch_size": "backend=local: batch rows.",
    "strategy": "Prompts.",
    "exemplars": "Built-in exemplar set or JSONL file (few-shot).",
    "k_shot": "answer_given: in-context examples from the dataset.",
    "num_samples": "Samples per example (diverse reasoning).",
    "temperature": "Sampling temperature (> 0 for samples > 1).",
    "top_p": "Nucleus sampling.",
    "max_tokens": "Most tokens per request.",
    "answer_max_tokens": "zero_shot: answer tokens.",
    "filter_correct": "Keep only samples matching gold.",
}
_TEACHER_CHOICES = {
    "backend": ["openai", "local"],
    "api": ["completions", "chat"],
    "strategy": list(STRATEGIES),
}
_DEFINE = {
    str: flags.DEFINE_string,
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
    bool: flags.DEFINE_boolean,
}
# Every field but the name comes from the flag of the same name.
_TEACHER_FLAGS = [f.name for f in dataclasses.fields(TeacherConfig) if f.name != "name"]


def _define_teacher_flags() -> None:
    """One flag per TeacherConfig field, typed and defaulted as the field."""
    fields = dataclasses.fields(TeacherConfig)
    missing = sorted({f.name for f in fields} ^ set(_TEACHER_HELP))
    if missing:  # a programming error, caught by any test that runs the program
        raise AssertionError(f"TeacherConfig fields and annotate's _TEACHER_HELP differ: {missing}")
    types = typing.get_type_hints(TeacherConfig)
    for f in fields:
        name, default = ("teacher", "teacher") if f.name == "name" else (f.name, f.default)
        if f.name in _TEACHER_CHOICES:
            flags.DEFINE_enum(name, default, _TEACHER_CHOICES[f.name], _TEACHER_HELP[f.name])
            continue
        kind = types[f.name]
        kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # X | None
        _DEFINE[kind](name, default, _TEACHER_HELP[f.name])


def define_flags() -> None:
    """The program's flags (defined by program.run, never at import)."""
    flags.DEFINE_string("input", None, "JSONL file of records to annotate.")
    flags.DEFINE_string("dataset", None, "A registered dataset (instead of --input), e.g. cqa.")
    flags.DEFINE_string("split", "train", "The split of --dataset.")
    flags.DEFINE_integer("limit", None, "Annotate only the first N examples.")
    flags.DEFINE_string("output", None, "Output JSONL of annotated records.")
    flags.DEFINE_string("cache", None, "Request cache (default: OUTPUT.cache.jsonl).")
    flags.DEFINE_string("metric", None, "Answer match for accuracy (default: the dataset's).")
    flags.DEFINE_string("teachers", None, "JSON file: a list of teacher configs (TeacherConfig).")
    _define_teacher_flags()
    flags.DEFINE_boolean("progress", True, "Show a progress line on stderr.")


def teacher_configs() -> list[TeacherConfig]:
    if FLAGS.teachers:
        try:
            items = storage.read_json(FLAGS.teachers)
        except (OSError, ValueError) as e:
            raise UserError(f"--teachers {FLAGS.teachers}: {e}") from e
        if not isinstance(items, list) or not items:
            raise UserError(f"{FLAGS.teachers}: expected a non-empty JSON list of teachers")
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
        raise UserError(f"--dataset {name} --split {split}: {one_line(e)}") from e
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


def main() -> int:
    """Annotates, writes OUTPUT and its companions; 2 when some examples failed."""
    try:
        return _annotate()
    except program.USER_ERRORS:
        raise
    except (CacheError, OSError, ValueError) as e:  # a bad file, cache or teacher config
        raise UserError(str(e)) from e


def _annotate() -> int:
    # this package's progress lines (the libraries' INFO stays off: program.run)
    logging.getLogger("distill_sbs").setLevel(logging.INFO)
    if bool(FLAGS.input) == bool(FLAGS.dataset):
        raise UserError("give exactly one of --input and --dataset")
    if not FLAGS.output:
        raise UserError("--output is required")
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
    program.run(main, define_flags)
