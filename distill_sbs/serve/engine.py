"""The batching engine of the server: the rows of all requests in batched generate calls, on one
thread, scheduled fairly (round-robin over requests); a cancelled request stops at the next step.
Scoring rows (teacher forcing of a given target, `Scorer`) share the queue, its limits and its
fairness, in batches of their own."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from distill_sbs.generation import (
    TOP_LOGPROBS_MAX,
    GeneratedText,
    GenerationParams,
    Generator,
    Token,
    bucket,
    token_text,
)

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The engine holds max_queued_sequences already: answered 429 with Retry-After."""


class ScoringError(ValueError):
    """A scoring request this server cannot answer as asked (too long, no model): answered 400."""


ScoreRow = tuple[list[int], list[int], str]  # (input ids, target ids, target text), EOS included


class Scorer:
    """Teacher-forced scoring of (encoder input, target) texts for `echo` + `max_tokens: 0`
    requests: both texts are tokenized as training tokenizes them (SentencePiece ids + EOS,
    never truncated: too long is an error), and each target token gets the model's log_softmax
    at its position (its own log-probability and the TOP_LOGPROBS_MAX best, sorted), the numbers
    `teachers.topk.write_topk` saves (the same `TeacherForcedTopK`)."""

    def __init__(self, model: Any, params: Any, max_input_length: int, max_batch_size: int):
        from distill_sbs.teachers.topk import TeacherForcedTopK

        self.vocab = model.vocabulary
        self.max_input_length, self.max_batch_size = max_input_length, max_batch_size
        k = min(TOP_LOGPROBS_MAX, model.config.vocab_size)
        self._topk = TeacherForcedTopK(model, params, k)

    @classmethod
    def for_generator(cls, generator: Generator, max_batch_size: int) -> Scorer | None:
        """A scorer over the generator's model; None if it has none (a test's fake)."""
        model, params = getattr(generator, "model", None), getattr(generator, "params", None)
        vocabulary = getattr(model, "vocabulary", None)
        if params is None or not hasattr(vocabulary, "tokenizer"):  # SentencePiece only
            return None
        return cls(model, params, getattr(generator, "max_input_length", 512), max_batch_size)

    def tokenize(self, prompt: str, target: str, max_target_tokens: int, row: int) -> ScoreRow:
        """The row's ids; ScoringError if either side is over this server's limits (scoring a
        truncated text would give other numbers than training sees)."""
        inputs = [*self.vocab.encode(prompt), 1]  # 1: EOS, as the task's tokenizer appends it
        targets = [*self.vocab.encode(target), 1]
        if len(inputs) > self.max_input_length:
            raise ScoringError(
                f"prompt {row} has {len(inputs)} tokens (EOS included), more than this "
                f"server's --max_input_length={self.max_input_length}"
            )
        if len(targets) > max_target_tokens:
            raise ScoringError(
                f"decoder_prompt {row} has {len(targets)} tokens to score (EOS included), more "
                f"than this server's --max_tokens_limit={max_target_tokens}"
            )
        return inputs, targets, target

    def piece(self, t: int) -> str:
        return token_text(self.vocab.tokenizer, t)

    def _top(self, ids: Any, lp: Any) -> tuple[tuple[str, float], ...]:
        return tuple((self.piece(int(a)), float(b)) for a, b in zip(ids, lp, strict=True))

    def score(self, rows: Sequence[ScoreRow]) -> list[GeneratedText]:
        """One GeneratedText per row: text = the target, tokens = its scored tokens."""
        padded = bucket(len(rows), 1, self.max_batch_size)
        scored = self._topk([r[0] for r in rows], [r[1] for r in rows], rows=padded)
        out = []
        for (inputs, targets, text), (ids, lp, token_lp) in zip(rows, scored, strict=True):
            tokens = tuple(
                Token(self.piece(t), float(token_lp[j]), self._top(ids[j], lp[j]))
                for j, t in enumerate(targets)
            )
            out.append(GeneratedText(text, len(inputs) + len(targets), 0, "length", tokens))
        return out


@dataclasses.dataclass(eq=False)
class Job:
    """One request's rows on their way through the batcher; `future` gets their outputs."""

    prompts: list[str]
    params: GenerationParams
    seed: int | None  # None: not given by the client
    logprobs: bool
    on_token: Callable[[int, str, Token], None] | None  # (row, text delta, token), streaming
    scoring: list[ScoreRow] | None = None  # a scoring job's rows (prompts: their count)
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    next_row: int = 0  # rows handed to a batch so far
    results: dict[int, GeneratedText] = dataclasses.field(default_factory=dict)


class BatchingEngine:
    """Runs the rows of all requests in batched generate calls, on one thread.

    Scheduling is by sequences, not requests: each batch takes one row from each waiting request
    (oldest first) in turn until it is full, among the requests whose decoding parameters match the
    oldest one's, so a small request never waits behind all the rows of a huge one. A cancelled
    request (its client went away) loses its queued rows and stops its running ones at the next
    decoding step. Samples depend on the whole batch, so a sampling request with a seed runs in
    batches of its own, the first with its seed and each next one with the seed plus its first
    row's index (as ModelGenerator splits a long call): a given seed gives the same samples
    however busy the server is. Sampling requests without one share batches (with equal
    parameters) under a seed drawn for each batch, so that their samples vary.
    """

    def __init__(
        self,
        generator: Generator,
        max_batch_size: int = 16,
        batch_window_s: float = 0.005,
        max_queued_sequences: int = 1024,
    ):
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self.max_queued_sequences = max_queued_sequences
        self.scorer = Scorer.for_generator(generator, max_batch_size)
        self._jobs: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self.queued = 0  # rows of all jobs not yet finished
        self.batches_run = 0
        self.rows_run = 0
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def submit(
        self,
        prompts: Sequence[str],
        params: GenerationParams,
        seed: int | None,
        *,
        logprobs: bool = False,
        on_token: Callable[[int, str, Token], None] | None = None,
    ) -> Job:
        """Queues `prompts`; the job's future gets their GeneratedText list, in order."""
        return self._queue(Job(list(prompts), params, seed, logprobs, on_token))

    def submit_scoring(self, rows: Sequence[ScoreRow]) -> Job:
        """Queues scoring rows (from `self.scorer.tokenize`); the future gets Scorer.score's
        list. They count against max_queued_sequences like generated rows."""
        if self.scorer is None:
            raise ScoringError("this server's model cannot score texts")
        prompts = [r[2] for r in rows]
        return self._queue(Job(prompts, GenerationParams(0), 0, True, None, list(rows)))

    def _queue(self, job: Job) -> Job:
        with self._cv:
            if self._stop:
                raise RuntimeError("the engine is closed")
            if self.queued + len(job.prompts) > self.max_queued_sequences:
                raise QueueFull(f"{self.queued} sequences queued")
            self.queued += len(job.prompts)
            self._jobs.append(job)
            self._cv.notify()
        return job

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                waiting = sum(len(j.prompts) - j.next_row for j in self._jobs)
            if waiting < self.max_batch_size and self.batch_window_s:
                time.sleep(self.batch_window_s)  # let concurrent requests join this batch
            batch = self._take_batch()
            if batch:
                self._run(batch)

    def _take_batch(self) -> list[tuple[Job, int]]:
        """(job, row) pairs of the next batch, round-robin over the jobs that can share it."""
        with self._cv:
            for job in [j for j in self._jobs if j.cancelled.is_set()]:
                self._finish(job, concurrent.futures.CancelledError())
            pending = [j for j in self._jobs if j.next_row < len(j.prompts)]
            if not pending:
                return []
            first = pending[0]
            group = [
                j
                for j in pending
                if j.params == first.params
                and (j.scoring is None) == (first.scoring is None)
                and (first.params.temperature == 0 or (first.seed is None and j.seed is None))
            ] or [first]
            batch: list[tuple[Job, int]] = []
            while len(batch) < self.max_batch_size and any(
                j.next_row < len(j.prompts) for j in group
            ):
                for job in group:
                    if len(batch) < self.max_batch_size and job.next_row < len(job.prompts):
                        batch.append((job, job.next_row))
                        job.next_row += 1
            return batch

    @staticmethod
    def _seed(batch: list[tuple[Job, int]]) -> int:
        """The batch's seed: a seeded job's (plus the index of its first row here), else a new
        one (the batch is greedy, or unseeded samples that should vary)."""
        job, row = batch[0]
        if job.seed is None:
            return secrets.randbits(32)
        return (job.seed + row) & 0xFFFFFFFF

    def _finish(self, job: Job, error: BaseException | None = None) -> None:
        """Removes `job` (lock held) and resolves its future."""
        self._jobs.remove(job)
        self.queued -= len(job.prompts)
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result([job.results[i] for i in range(len(job.prompts))])

    def _run(self, batch: list[tuple[Job, int]]) -> None:
        def on_token(row: int, delta: str, token: Token) -> bool:
            job, i = batch[row]
            if job.cancelled.is_set():
                return False
            if job.on_token is not None:
                job.on_token(i, delta, token)
            return True

        first = batch[0][0]
        prompts = [job.prompts[i] for job, i in batch]
        logprobs = any(job.logprobs for job, _ in batch)
        try:
            if first.scoring is not None:
                assert self.scorer is not None  # submit_scoring checked
                outs = self.scorer.score([job.scoring[i] for job, i in batch])
            else:
                seed = self._seed(batch)
                outs = self.generator.generate(
                    prompts, first.params, seed, logprobs=logprobs, on_token=on_token
                )
            error = None
        except Exception as e:  # noqa: BLE001 - reported to each waiting request
            logger.exception("generate failed")
            outs, error = [], e
        with self._cv:
            self.batches_run += 1
            self.rows_run += len(prompts)
            for job, _ in batch:
                if job in self._jobs and error is not None:
                    self._finish(job, error)
            for (job, i), out in zip(batch, outs, strict=False):
                job.results[i] = out
                if job in self._jobs and len(job.results) == len(job.prompts):
                    self._finish(job)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=10)
        with self._cv:
            for job in list(self._jobs):
                self._finish(job, RuntimeError("the server is shutting down"))
