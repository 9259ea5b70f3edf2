"""Teacher backends: an OpenAI-compatible HTTP client and a local model teacher.

A backend turns `TeacherRequest`s (one prompt, one sample) into `Completion`s. `run()` calls
`on_result(request, completion_or_failure)` once per request as each finishes, so that the caller
can write every finished request to its cache before the next one ends (see cache.py).

HTTP: a thread pool bounds concurrency (`max_concurrency`), a shared limiter spaces requests
(`requests_per_minute`), and each request is retried with exponential backoff and jitter on 429,
5xx, timeouts, connection errors and malformed bodies; `Retry-After` on 429/503 is honoured up to
`retry_after_max`, and a request gives up once its waits would pass `max_total_backoff`.
`timeout` bounds a whole attempt (connect, headers and the body however slowly it drips), not
each read. The API key is read from the environment variable *named* in the config and is never
logged, stored or put in an exception message: any text a server returns, error or completion,
is redacted before anything sees it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import email.utils
import json
import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import requests
import urllib3

from distill_sbs.generation import GenerationParams, apply_stop

logger = logging.getLogger("distill_sbs.teachers")


@dataclasses.dataclass(frozen=True)
class TeacherRequest:
    key: str  # the cache key (see cache.request_key)
    prompt: str
    params: GenerationParams
    seed: int  # sent to the server so that sample i of a prompt is reproducible


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 1


class RequestFailed(Exception):
    """A request that failed for good (retries exhausted or a non-retryable error)."""

    def __init__(self, reason: str, attempts: int):
        super().__init__(f"{reason} (after {attempts} attempt(s))")
        self.reason = reason
        self.attempts = attempts


OnResult = Callable[[TeacherRequest, "Completion | RequestFailed"], None]


@dataclasses.dataclass
class BackendStats:
    attempts: int = 0  # HTTP requests sent (or generate rows run), retries included
    retries: int = 0
    failures: int = 0  # requests given up on
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: Counter = dataclasses.field(default_factory=Counter)  # by kind: "429", "timeout", ...

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["errors"] = dict(sorted(self.errors.items()))
        return d


class Backend(Protocol):
    stats: BackendStats

    def run(self, reqs: Sequence[TeacherRequest], on_result: OnResult) -> None: ...

    def close(self) -> None: ...


Clock = Callable[[], float]  # monotonic seconds (time.monotonic; tests pass a fake)
Sleep = Callable[[float], None]


class RateLimiter:
    """Spaces calls at least 60/rpm seconds apart across threads (no bursts)."""

    def __init__(
        self,
        requests_per_minute: float | None,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
    ):
        self._interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self._next = 0.0
        self._lock = threading.Lock()
        self._clock, self._sleep = clock, sleep

    def acquire(self) -> None:
        if not self._interval:
            return
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self._interval
        if slot > now:
            self._sleep(slot - now)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _Retryable(Exception):
    def __init__(self, kind: str, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.retry_after = retry_after


class _Fatal(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


@dataclasses.dataclass(frozen=True)
class HTTPConfig:
    """An OpenAI-compatible endpoint. `api_key_env` is the NAME of the variable holding the key."""

    base_url: str  # e.g. "https://api.openai.com/v1" or "http://127.0.0.1:8000/v1"
    model: str
    api_key_env: str | None = None
    api: str = "completions"  # or "chat" (POST /chat/completions, the prompt as one user message)
    max_concurrency: int = 8
    requests_per_minute: float | None = None
    timeout: float = 60.0  # seconds, per attempt
    max_retries: int = 5
    backoff_base: float = 1.0  # first retry waits about this long, doubling up to backoff_max
    backoff_max: float = 60.0
    retry_after_max: float = 60.0  # a server's Retry-After is obeyed up to this many seconds
    max_total_backoff: float = 600.0  # a request gives up rather than wait longer in all
    max_response_bytes: int = 16 << 20

    def __post_init__(self):
        if self.api not in ("completions", "chat"):
            raise ValueError(f"api must be 'completions' or 'chat', got {self.api!r}")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")


class OpenAIBackend:
    """Client of an OpenAI-compatible /completions or /chat/completions endpoint."""

    def __init__(
        self, config: HTTPConfig, *, sleep: Sleep = time.sleep, clock: Clock = time.monotonic
    ):
        """sleep: every wait (retries, the rate limit); clock: the rate limit's and each
        attempt's deadline's time. Tests pass fakes to check waits without waiting."""
        self.config = config
        self.stats = BackendStats()
        self._api_key = ""
        if config.api_key_env:
            key = os.environ.get(config.api_key_env)
            if not key:
                raise ValueError(
                    f"environment variable {config.api_key_env} (named by api_key_env) is not set"
                )
            self._api_key = key
        self._limiter = RateLimiter(config.requests_per_minute, clock=clock, sleep=sleep)
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._sleep, self._clock = sleep, clock
        base = config.base_url.rstrip("/")
        self._url = base + ("/chat/completions" if config.api == "chat" else "/completions")

    def __repr__(self) -> str:  # never the key
        return f"OpenAIBackend(url={self._url!r}, model={self.config.model!r})"

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _session(self) -> requests.Session:
        # requests.Session is not documented as thread-safe: one per worker thread.
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.headers["Content-Type"] = "application/json"
            if self._api_key:
                s.headers["Authorization"] = f"Bearer {self._api_key}"
            self._local.session = s
            with self._lock:
                self._sessions.append(s)
        return s

    def _body(self, req: TeacherRequest) -> dict[str, Any]:
        p = req.params
        body: dict[str, Any] = {
            "model": self.config.model,
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "n": 1,
            "seed": req.seed,
        }
        if p.stop:
            body["stop"] = list(p.stop)
        if self.config.api == "chat":
            body["messages"] = [{"role": "user", "content": req.prompt}]
        else:
            body["prompt"] = req.prompt
        return body

    def _read(self, req: TeacherRequest) -> tuple[int, Any, bytes]:
        """(status, headers, body) of one POST, all of it within `timeout` seconds."""
        timeout = self.config.timeout
        deadline = self._clock() + timeout
        too_slow = _Retryable("timeout", f"no full answer within {timeout}s")
        try:
            resp = self._session().post(
                self._url, data=json.dumps(self._body(req)), timeout=timeout, stream=True
            )
            with resp:
                chunks, size = [], 0
                # read1: whatever has arrived (iter_content would wait for a full chunk)
                while chunk := resp.raw.read1(65536, decode_content=True):
                    size += len(chunk)
                    if size > self.config.max_response_bytes:
                        raise _Retryable("malformed", "response body too large")
                    chunks.append(chunk)
                    if self._clock() > deadline:  # a body dripped slowly: give up
                        raise too_slow
                if self._clock() > deadline:
                    raise too_slow
                return resp.status_code, resp.headers, b"".join(chunks)
        except (requests.Timeout, urllib3.exceptions.TimeoutError):
            raise too_slow from None
        except (requests.RequestException, urllib3.exceptions.HTTPError) as e:  # refused, reset
            raise _Retryable("connection", f"connection error: {type(e).__name__}") from None

    def _attempt(self, req: TeacherRequest) -> Completion:
        status, headers, raw = self._read(req)
        if status != 200:
            text = raw[:200].decode("utf-8", "replace").replace("\n", " ")
            reason = f"HTTP {status}: {self._redact(text)}"
            if status in _RETRY_STATUS:
                retry_after = parse_retry_after(headers.get("Retry-After"))
                raise _Retryable(str(status), reason, retry_after)
            raise _Fatal(str(status), reason)
        try:
            return self._parse(req, json.loads(raw))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise _Retryable("malformed", f"malformed response body ({type(e).__name__})") from None

    def _parse(self, req: TeacherRequest, data: Any) -> Completion:
        """The Completion in a 200 answer's JSON; KeyError, TypeError, ... for a malformed one
        (retried). A subclass that asks for something else (top-k scores) reads it here."""
        choice = data["choices"][0]
        text = choice["message"]["content"] if self.config.api == "chat" else choice["text"]
        if not isinstance(text, str):
            raise TypeError("text is not a string")
        usage = data.get("usage") or {}
        return Completion(
            # A server may echo the key in what it returns: it never reaches outputs or cache.
            text=self._redact(apply_stop(text, req.params.stop)),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )

    def _backoff(self, attempt: int) -> float:
        delay = min(self.config.backoff_max, self.config.backoff_base * 2 ** (attempt - 1))
        return delay * random.uniform(0.5, 1.0)  # jitter: spread retries of many workers

    def complete(self, req: TeacherRequest) -> Completion:
        """One request with retries; raises RequestFailed when it gives up."""
        attempt, waited = 0, 0.0
        while True:
            attempt += 1
            self._limiter.acquire()
            with self._lock:
                self.stats.attempts += 1
            try:
                c = self._attempt(req)
            except _Fatal as e:
                with self._lock:
                    self.stats.errors[e.kind] += 1
                    self.stats.failures += 1
                logger.warning("request %s: %s; not retryable", req.key[:12], e.reason)
                raise RequestFailed(e.reason, attempt) from None
            except _Retryable as e:
                with self._lock:
                    self.stats.errors[e.kind] += 1
                if attempt > self.config.max_retries:
                    with self._lock:
                        self.stats.failures += 1
                    logger.warning("request %s: %s; giving up", req.key[:12], e.reason)
                    raise RequestFailed(e.reason, attempt) from None
                delay = self._backoff(attempt)
                if e.retry_after is not None:
                    delay = min(e.retry_after, self.config.retry_after_max)
                if waited + delay > self.config.max_total_backoff:
                    with self._lock:
                        self.stats.failures += 1
                    reason = f"{e.reason}; retrying would wait past max_total_backoff"
                    logger.warning("request %s: %s; giving up", req.key[:12], reason)
                    raise RequestFailed(reason, attempt) from None
                waited += delay
                logger.warning(
                    "request %s: %s; retry %d/%d in %.2fs",
                    req.key[:12],
                    e.reason,
                    attempt,
                    self.config.max_retries,
                    delay,
                )
                with self._lock:
                    self.stats.retries += 1
                self._sleep(delay)
                continue
            with self._lock:
                self.stats.prompt_tokens += c.prompt_tokens
                self.stats.completion_tokens += c.completion_tokens
            return dataclasses.replace(c, attempts=attempt)

    def run(self, reqs: Sequence[TeacherRequest], on_result: OnResult) -> None:
        def one(req: TeacherRequest) -> None:
            try:
                result: Completion | RequestFailed = self.complete(req)
            except RequestFailed as e:
                result = e
            on_result(req, result)

        if not reqs:
            return
        workers = min(self.config.max_concurrency, len(reqs))
        pool = concurrent.futures.ThreadPoolExecutor(workers, "teacher-http")
        try:
            for f in [pool.submit(one, r) for r in reqs]:
                f.result()  # re-raises errors of on_result (e.g. a full disk)
        finally:
            # On an error or Ctrl-C, send nothing more; requests in flight finish (and are cached).
            pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for s in sessions:
            s.close()
