"""The annotation pipeline: records in, records with one rationale list per teacher out.

For each teacher, every (example, sample index) needs one request (two for zero-shot CoT: the
reasoning, then the answer extraction). A request whose key is in the cache is not sent again;
every request that finishes is appended to the cache at once, so a killed run restarts where it
stopped. Requests that fail for good are not cached (a later run retries them) and their
examples are listed as failed instead of being written: every input example ends up exactly once,
either annotated or failed.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from distill_sbs import metrics
from distill_sbs.data.records import Record, TeacherSample
from distill_sbs.generation import GenerationParams
from distill_sbs.teachers import prompts
from distill_sbs.teachers.backends import (
    Backend,
    Completion,
    HTTPConfig,
    OpenAIBackend,
    RequestFailed,
    TeacherRequest,
)
from distill_sbs.teachers.cache import RequestCache, request_key
from distill_sbs.teachers.exemplars import get_exemplars

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """One teacher. Holds the NAME of the API key's environment variable, never the key."""

    name: str
    backend: str = "openai"  # "openai" (any OpenAI-compatible endpoint) or "local"
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    api: str = "completions"  # or "chat"
    max_concurrency: int = 8
    requests_per_minute: float | None = None
    timeout: float = 60.0
    max_retries: int = 5
    backoff_base: float = 1.0  # seconds before the first retry (doubling, with jitter)
    retry_after_max: float = 60.0  # a server's Retry-After is obeyed up to this many seconds
    max_total_backoff: float = 600.0  # a request gives up rather than wait longer in all
    checkpoint: str | None = None  # backend "local": a native/converted checkpoint
    batch_size: int = 16  # backend "local"
    strategy: str = "few_shot"  # see prompts.STRATEGIES
    exemplars: str | None = None  # built-in set name or JSONL path; default: the dataset's
    k_shot: int = 4  # answer_given: in-context examples drawn from the dataset
    num_samples: int = 1  # diverse reasoning: N samples per example
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    answer_max_tokens: int = 32  # zero_shot stage 2
    filter_correct: bool = False  # keep only samples whose answer matches the gold label

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"teacher name must be non-empty and without '/', got {self.name!r}")
        if self.strategy not in prompts.STRATEGIES:
            raise ValueError(
                f"teacher {self.name}: strategy must be one of {prompts.STRATEGIES}, "
                f"got {self.strategy!r}"
            )
        if self.backend not in ("openai", "local"):
            raise ValueError(f"teacher {self.name}: backend must be 'openai' or 'local'")
        if self.backend == "openai" and not (self.base_url and self.model):
            raise ValueError(f"teacher {self.name}: backend 'openai' needs base_url and model")
        if self.backend == "local" and not self.checkpoint:
            raise ValueError(f"teacher {self.name}: backend 'local' needs checkpoint")
        if self.num_samples < 1:
            raise ValueError(f"teacher {self.name}: num_samples must be >= 1")
        if self.num_samples > 1 and self.temperature <= 0:
            raise ValueError(
                f"teacher {self.name}: num_samples={self.num_samples} needs temperature > 0 "
                "(greedy decoding gives the same sample every time)"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "teacher") -> TeacherConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
        if "name" not in d:
            raise ValueError(f"{where}: missing field 'name'")
        return cls(**d)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def generation_params(self) -> GenerationParams:
        return GenerationParams(self.max_tokens, self.temperature, self.top_p)

    def key_params(self, params: GenerationParams, stage: str) -> dict[str, Any]:
        # What makes two requests the same request: the endpoint and decoding, not the key.
        return {
            "model": self.model or self.checkpoint,
            "api": self.api,
            "stage": stage,
            **params.to_json(),
        }


def make_backend(cfg: TeacherConfig) -> Backend:
    if cfg.backend == "local":
        from distill_sbs.generation import ModelGenerator
        from distill_sbs.teachers.local import LocalBackend

        gen = ModelGenerator.from_checkpoint(
            cfg.checkpoint, max_batch_size=cfg.batch_size, max_decode_length=cfg.max_tokens
        )
        return LocalBackend(gen)
    return OpenAIBackend(
        HTTPConfig(
            base_url=cfg.base_url,
            model=cfg.model,
            api_key_env=cfg.api_key_env,
            api=cfg.api,
            max_concurrency=cfg.max_concurrency,
            requests_per_minute=cfg.requests_per_minute,
            timeout=cfg.timeout,
            max_retries=cfg.max_retries,
            backoff_base=cfg.backoff_base,
            retry_after_max=cfg.retry_after_max,
            max_total_backoff=cfg.max_total_backoff,
        )
    )


class Progress:
    """A one-line progress display on stderr, redrawn at most every `interval` seconds."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, interval: float = 1.0):
        self.label, self.total = label, total
        self.done = self.cached = self.failed = 0
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self._t0 = self._last = time.monotonic()
        self._lock = threading.Lock()

    def update(self, *, done: int = 0, cached: int = 0, failed: int = 0) -> None:
        with self._lock:
            self.done += done
            self.cached += cached
            self.failed += failed
            now = time.monotonic()
            if now - self._last >= self.interval:
                self._last = now
                self._draw(now)

    def _draw(self, now: float, end: str = "\r") -> None:
        sent = self.done - self.cached
        rate = sent / max(now - self._t0, 1e-9)
        self.stream.write(
            f"{self.label}: {self.done + self.failed}/{self.total} requests "
            f"({self.cached} cached, {self.failed} failed, {rate:.1f}/s){end}"
        )
        self.stream.flush()

    def close(self) -> None:
        with self._lock:
            self._draw(time.monotonic(), end="\n")


@dataclasses.dataclass
class TeacherSummary:
    requests: int = 0  # = cached + completed + failed
    cached: int = 0  # finished in an earlier run, read from the cache
    completed: int = 0  # finished in this run
    failed: int = 0  # given up on in this run (retried by the next run)
    attempts: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    errors: dict[str, int] = dataclasses.field(default_factory=dict)
    prompt_tokens: int = 0  # used by this run
    completion_tokens: int = 0
    samples: int = 0  # finished samples (all their requests done)
    parsed: int = 0
    with_gold: int = 0  # parsed samples of examples with a gold label
    correct: int = 0
    filtered_out: int = 0  # dropped by filter_correct (wrong or unparsed)
    examples_without_samples: int = 0  # annotated examples whose every sample was filtered out

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["parse_rate"] = self.parsed / self.samples if self.samples else None
        d["accuracy"] = self.correct / self.with_gold if self.with_gold else None
        return d


@dataclasses.dataclass
class AnnotationResult:
    records: list[Record]  # the fully annotated examples, in input order
    failed: list[dict[str, Any]]  # {"id", "errors": [{"teacher", "sample", "stage", "error"}]}
    teachers: dict[str, TeacherSummary]
    cache_torn_lines_dropped: int = 0

    def unparsed_teachers(self) -> list[str]:
        """The teachers none of whose samples parsed (a wrong strategy, or a teacher that says
        nothing): their records carry no rationale to train on."""
        return [name for name, s in self.teachers.items() if s.samples and not s.parsed]

    def summary(self) -> dict[str, Any]:
        return {
            "examples": len(self.records) + len(self.failed),
            "annotated": len(self.records),
            "failed": len(self.failed),
            "cache_torn_lines_dropped": self.cache_torn_lines_dropped,
            "teachers": {name: s.to_json() for name, s in self.teachers.items()},
        }


class _Runner:
    """Runs the requests of one stage for one teacher against the cache."""

    def __init__(self, cfg: TeacherConfig, backend: Backend, cache: RequestCache, summary, failed):
        self.cfg, self.backend, self.cache = cfg, backend, cache
        self.summary: TeacherSummary = summary
        self.failed: dict[str, list[dict[str, Any]]] = failed
        self.lock = threading.Lock()

    def run(
        self,
        stage: str,
        jobs: list[tuple[Record, int, str]],  # (record, sample index, prompt)
        params: GenerationParams,
        progress_stream: TextIO | None,
    ) -> dict[tuple[str, int], dict[str, Any]]:
        """Cache entries of the finished jobs, by (record id, sample index)."""
        out: dict[tuple[str, int], dict[str, Any]] = {}
        todo: list[TeacherRequest] = []
        where: dict[str, tuple[Record, int]] = {}
        kp = self.cfg.key_params(params, stage)
        for record, i, prompt in jobs:
            key = request_key(record.id, self.cfg.name, prompt, i, kp)
            entry = self.cache.get(key)
            if entry is not None:
                out[(record.id, i)] = entry
            else:
                # The seed makes sample i reproducible where the server honours seeds.
                todo.append(TeacherRequest(key, prompt, params, seed=int(key[:8], 16)))
                where[key] = (record, i)
        self.summary.requests += len(jobs)
        self.summary.cached += len(out)
        progress = Progress(f"[{self.cfg.name}] {stage}", len(jobs), progress_stream)
        progress.update(done=len(out), cached=len(out))

        def on_result(req: TeacherRequest, result: Completion | RequestFailed) -> None:
            record, i = where[req.key]
            if isinstance(result, RequestFailed):
                with self.lock:
                    self.summary.failed += 1
                    self.failed.setdefault(record.id, []).append(
                        {
                            "teacher": self.cfg.name,
                            "sample": i,
                            "stage": stage,
                            "error": str(result),
                        }
                    )
                progress.update(failed=1)
                return
            entry = {
                "text": result.text,
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "meta": {"id": record.id, "teacher": self.cfg.name, "sample": i, "stage": stage},
            }
            self.cache.put(req.key, entry)  # durable before it counts as finished
            with self.lock:
                self.summary.completed += 1
                out[(record.id, i)] = self.cache.get(req.key)
            progress.update(done=1)

        try:
            self.backend.run(todo, on_result)
        finally:
            progress.close()
        return out


def annotate(
    records: Sequence[Record],
    teachers: Sequence[tuple[TeacherConfig, Backend]],
    cache: RequestCache,
    *,
    dataset: str | None = None,
    metric: str = "accuracy",
    progress_stream: TextIO | None = None,
) -> AnnotationResult:
    """Annotates `records` with every teacher; see the module docstring.

    `dataset` names the built-in exemplar set used when a teacher names none; `metric` (a key of
    distill_sbs.metrics.METRICS) decides whether a teacher's answer matches the gold label.
    """
    if metric not in metrics.METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(metrics.METRICS)}")
    names = [cfg.name for cfg, _ in teachers]
    if len(set(names)) != len(names):
        raise ValueError(f"teacher names must be distinct, got {names}")
    for r in records:
        if not r.input:
            raise ValueError(f"record {r.id!r} has no input text")
    failed: dict[str, list[dict[str, Any]]] = {}
    summaries: dict[str, TeacherSummary] = {}
    samples: dict[str, dict[str, list[TeacherSample]]] = {r.id: {} for r in records}

    for cfg, backend in teachers:
        strategy = _strategy(cfg, records, dataset)
        summary = summaries[cfg.name] = TeacherSummary()
        targets = []
        for r in records:
            reason = strategy.unusable(r)
            if reason is None:
                targets.append(r)
            else:
                failed.setdefault(r.id, []).append(
                    {"teacher": cfg.name, "sample": None, "stage": "prompt", "error": reason}
                )
        runner = _Runner(cfg, backend, cache, summary, failed)
        outputs = _run_stages(runner, strategy, targets, progress_stream)
        for st in ("attempts", "retries", "prompt_tokens", "completion_tokens"):
            setattr(summary, st, getattr(backend.stats, st))
        summary.errors = dict(sorted(backend.stats.errors.items()))
        for r in targets:
            samples[r.id][cfg.name] = _read_samples(
                r, outputs, strategy, cfg, metrics.METRICS[metric].match, summary
            )

    out: list[Record] = []
    for r in records:
        if r.id in failed:
            continue
        rec = copy.deepcopy(r)
        rec.teachers.update(samples[r.id])
        for cfg, _ in teachers:
            if not samples[r.id][cfg.name]:
                summaries[cfg.name].examples_without_samples += 1
        out.append(rec)
    failed_list = [{"id": r.id, "errors": failed[r.id]} for r in records if r.id in failed]
    result = AnnotationResult(out, failed_list, summaries, cache.torn_lines_dropped)
    for name in result.unparsed_teachers():
        logger.warning(
            "teacher %s: none of its %d samples parsed (empty or off-format answers): check its "
            "strategy, exemplars and max_tokens before training on this file",
            name,
            summaries[name].samples,
        )
    return result


def _strategy(
    cfg: TeacherConfig, records: Sequence[Record], dataset: str | None
) -> prompts.Strategy:
    exemplar_set = cfg.exemplars or dataset
    try:
        return prompts.make_strategy(
            cfg.strategy,
            get_exemplars(exemplar_set) if exemplar_set else None,
            records,
            k_shot=cfg.k_shot,
            answer_max_tokens=cfg.answer_max_tokens,
        )
    except ValueError as e:
        raise ValueError(f"teacher {cfg.name}: {e}") from None


# (record id, sample index) -> (first-stage text, second-stage text or None)
_Outputs = dict[tuple[str, int], tuple[str, str | None]]


def _run_stages(
    runner: _Runner,
    strategy: prompts.Strategy,
    targets: Sequence[Record],
    progress_stream: TextIO | None,
) -> _Outputs:
    """The finished outputs of every (record, sample); a sample whose requests failed is absent."""
    n = runner.cfg.num_samples
    prompt_by_id = {r.id: strategy.prompt(r) for r in targets}
    jobs = [(r, i, prompt_by_id[r.id]) for r in targets for i in range(n)]
    first = runner.run("reason", jobs, runner.cfg.generation_params(), progress_stream)
    if strategy.answer_params is None:
        return {k: (e["text"], None) for k, e in first.items()}
    jobs = [
        (r, i, strategy.answer_prompt(r, first[(r.id, i)]["text"]))
        for r in targets
        for i in range(n)
        if (r.id, i) in first
    ]
    second = runner.run("answer", jobs, strategy.answer_params, progress_stream)
    return {k: (first[k]["text"], e["text"]) for k, e in second.items()}


def _read_samples(
    r: Record,
    outputs: _Outputs,
    strategy: prompts.Strategy,
    cfg: TeacherConfig,
    match: Callable[..., bool],
    summary: TeacherSummary,
) -> list[TeacherSample]:
    """The samples of `r` to keep; counts parses, matches and filtering in `summary`."""
    kept: list[TeacherSample] = []
    for i in range(cfg.num_samples):
        if (r.id, i) not in outputs:
            continue  # failed; listed in `failed`
        rationale, label, raw = strategy.read(r, *outputs[(r.id, i)])
        summary.samples += 1
        ok = bool(rationale.strip()) and label is not None
        if ok:
            summary.parsed += 1
            sample = TeacherSample(rationale=rationale, label=label, raw=raw)
        else:  # a recorded parse failure, as the data layer reads it ("" if the text was)
            sample = TeacherSample(rationale="", label=None, raw=raw)
        correct = None
        if ok and r.label is not None:
            summary.with_gold += 1
            correct = bool(match(label, r.label, r.choices))
            summary.correct += correct
        if cfg.filter_correct and r.label is not None and not correct:
            summary.filtered_out += 1
            continue
        kept.append(sample)
    return kept
