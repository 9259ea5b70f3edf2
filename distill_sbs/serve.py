r"""An OpenAI-compatible server over a trained student: `python -m distill_sbs.serve`.

    python -m distill_sbs.serve --checkpoint DIR --port 8000 [--host 127.0.0.1] [--api_key_env VAR]

Endpoints: GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions
(max_tokens / max_completion_tokens, temperature, top_p, n, stop, seed, stream with
stream_options.include_usage, logprobs / top_logprobs, echo), GET /health, GET /metrics
(Prometheus text), and with --debug_endpoints GET /debug/state (counters only). Chat messages
become one input text: the text content of every message, in order, joined by a blank line; roles
are dropped, because a student is trained on plain inputs. See docs/serve.md.

The HTTP layer is Starlette on uvicorn (HTTP/1.1 keep-alive, one event loop, no thread per
connection); the model runs on one batching thread. A request goes through `parse_request`
(validation), the `BatchingEngine` (rows scheduled fairly, round-robin over requests) and
`completion_response` / `stream_chunks` (the OpenAI bodies); `CompletionHandler` strings them
together, and a subclass passed as `Server(handler_class=...)` can change what a request gets
(the tests inject faults that way).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hmac
import ipaddress
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import h11
import prometheus_client
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from distill_sbs.generation import (
    TOP_LOGPROBS_MAX,
    GeneratedText,
    GenerationParams,
    Generator,
    Token,
)

logger = logging.getLogger("distill_sbs.serve")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one client can ask of the server; every field is a flag of the same name."""

    max_tokens_limit: int = 256  # larger max_tokens are clipped to it
    max_sequences_per_request: int = 64  # prompts x n
    max_queued_sequences: int = 1024  # waiting or running, all requests together (then 429)
    max_body_bytes: int = 1 << 20  # then 413
    header_timeout_s: float = 10.0  # a connection must send a request's headers within this
    body_timeout_s: float = 30.0  # ... and its body within this (then 408)
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 512  # open connections and requests together (then 503)


class QueueFull(Exception):
    """The engine holds max_queued_sequences already: answered 429 with Retry-After."""


@dataclasses.dataclass(eq=False)
class _Job:
    """One request's rows on their way through the batcher; `future` gets their outputs."""

    prompts: list[str]
    params: GenerationParams
    seed: int
    logprobs: bool
    on_token: Callable[[int, str, Token], None] | None  # (row, text delta, token), streaming
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
    decoding step. Sampling within a batch shares one seed: that of the batch's oldest request.
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
        self._jobs: collections.deque[_Job] = collections.deque()
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
        seed: int,
        *,
        logprobs: bool = False,
        on_token: Callable[[int, str, Token], None] | None = None,
    ) -> _Job:
        """Queues `prompts`; the job's future gets their GeneratedText list, in order."""
        job = _Job(list(prompts), params, seed, logprobs, on_token)
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

    def _take_batch(self) -> list[tuple[_Job, int]]:
        """(job, row) pairs of the next batch, round-robin over the jobs that can share it."""
        with self._cv:
            for job in [j for j in self._jobs if j.cancelled.is_set()]:
                self._finish(job, concurrent.futures.CancelledError())
            pending = [j for j in self._jobs if j.next_row < len(j.prompts)]
            if not pending:
                return []
            group = [j for j in pending if j.params == pending[0].params]
            batch: list[tuple[_Job, int]] = []
            while len(batch) < self.max_batch_size and any(
                j.next_row < len(j.prompts) for j in group
            ):
                for job in group:
                    if len(batch) < self.max_batch_size and job.next_row < len(job.prompts):
                        batch.append((job, job.next_row))
                        job.next_row += 1
            return batch

    def _finish(self, job: _Job, error: BaseException | None = None) -> None:
        """Removes `job` (lock held) and resolves its future."""
        self._jobs.remove(job)
        self.queued -= len(job.prompts)
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result([job.results[i] for i in range(len(job.prompts))])

    def _run(self, batch: list[tuple[_Job, int]]) -> None:
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
            outs = self.generator.generate(
                prompts, first.params, first.seed, logprobs=logprobs, on_token=on_token
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


class APIError(Exception):
    """An OpenAI-shaped error answer: {"error": {"message", "type", "code", "param"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status,
            message,
            type,
            code,
            param,
        )
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "code": self.code, "param": self.param}
        return JSONResponse({"error": body}, self.status, headers=self.headers)


class BadRequest(APIError):
    """A request the client must fix: answered 400 with this message."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(400, message, param=param)


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    """A validated completion or chat request."""

    chat: bool
    prompts: list[str]  # chat: the one text the messages become
    params: GenerationParams
    n: int  # samples per prompt
    seed: int
    model: str | None = None
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage
    logprobs: int | None = None  # alternatives per token (0: the chosen token's only); None: off
    echo: bool = False

    def rows(self) -> list[str]:
        """What the generator gets: each prompt n times, samples of a prompt side by side."""
        return [p for p in self.prompts for _ in range(self.n)]


def _text(value: Any, what: str) -> str:
    """`value` if it is a string that UTF-8 can encode (JSON allows lone surrogates)."""
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{what} is not valid Unicode (a lone surrogate?)") from None
    return value


def _messages_to_text(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "content" not in m:
            raise BadRequest(f"messages[{i}] must be an object with 'role' and 'content'")
        content = m["content"]
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(
                c.get("text", "")
                for c in content
                if isinstance(c, dict) and c.get("type") == "text"
            )
        parts.append(_text(content, f"messages[{i}].content"))
    return "\n\n".join(parts)


def _prompt_list(prompt: Any) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise BadRequest("'prompt' must be a string or a non-empty list of strings", "prompt")
    return [_text(p, "'prompt'") for p in prompts]


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name, default)
    if v is None:
        v = default
    if not isinstance(v, int | float) or isinstance(v, bool) or not lo <= v <= hi:
        raise BadRequest(f"'{name}' must be a number in [{lo}, {hi}], got {v!r}", name)
    return v


def _params(body: dict[str, Any], chat: bool, limit: int) -> tuple[GenerationParams, int, int]:
    """(decoding parameters, n, seed); max_tokens above `limit` is clipped to it."""
    name = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = int(_number(body, name, 16, 1, 1 << 20))
    temperature = float(_number(body, "temperature", 1.0, 0.0, 2.0))
    top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0))
    n = int(_number(body, "n", 1, 1, 128))
    # Any 64-bit seed is accepted; the generator's PRNG key takes its low 32 bits.
    seed = int(_number(body, "seed", 0, -(1 << 63), (1 << 64) - 1)) & 0xFFFFFFFF
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise BadRequest("'stop' must be a string or a list of up to 4 strings", "stop")
    stop = [_text(s, "'stop'") for s in stop]
    params = GenerationParams(
        min(max_tokens, limit), temperature, top_p if top_p > 0 else 1.0, tuple(stop)
    )
    return params, n, seed


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """Alternatives per token asked for: completions `logprobs: k`, chat `logprobs: true` with
    `top_logprobs: k`; None when not asked."""
    if chat:
        if not body.get("logprobs"):
            if body.get("top_logprobs") is not None:
                raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
            return None
        return int(_number(body, "top_logprobs", 0, 0, TOP_LOGPROBS_MAX))
    if body.get("logprobs") is None:
        return None
    return int(_number(body, "logprobs", 0, 0, TOP_LOGPROBS_MAX))


def parse_request(
    raw: bytes, chat: bool, max_tokens_limit: int, max_sequences: int = 1 << 30
) -> CompletionRequest:
    """The request in a POST body; raises BadRequest naming what is wrong."""
    try:
        body = json.loads(raw or b"null")
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested too deep
        raise BadRequest(f"the body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    params, n, seed = _params(body, chat, max_tokens_limit)
    if chat:
        prompts = [_messages_to_text(body.get("messages"))]
    else:
        prompts = _prompt_list(body.get("prompt"))
    if len(prompts) * n > max_sequences:
        raise BadRequest(
            f"{len(prompts)} prompt(s) x n={n} is more than the {max_sequences} sequences "
            "a request may ask for (--max_sequences_per_request)"
        )
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string", "model")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    logprobs = _logprobs(body, chat)
    echo = bool(body.get("echo")) and not chat
    if echo and logprobs is not None:
        raise BadRequest(
            "'echo' with 'logprobs' is not supported: an encoder-decoder student gives its "
            "input no probabilities",
            "echo",
        )
    stream = bool(body.get("stream"))
    return CompletionRequest(
        chat,
        prompts,
        params,
        n,
        seed,
        model,
        stream,
        stream and bool(options.get("include_usage")),
        logprobs,
        echo,
    )


def _logprobs_json(req: CompletionRequest, tokens: Sequence[Token], offset: int) -> Any:
    """The `logprobs` of one choice (or one stream chunk), in the shape of its endpoint."""
    k = req.logprobs or 0
    if req.chat:
        return {
            "content": [
                {
                    "token": t.text,
                    "logprob": t.logprob,
                    "bytes": list(t.text.encode()),
                    "top_logprobs": [
                        {"token": s, "logprob": lp, "bytes": list(s.encode())}
                        for s, lp in t.top[:k]
                    ],
                }
                for t in tokens
            ]
        }
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top[:k]) for t in tokens] if k else None,
        "text_offset": offsets,
    }


def _usage(req: CompletionRequest, outs: Sequence[GeneratedText]) -> dict[str, int]:
    # Each prompt counts once for prompt tokens, however many samples were drawn.
    prompt_tokens = sum(o.prompt_tokens for o in outs[:: req.n])
    completion_tokens = sum(o.completion_tokens for o in outs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_response(
    req: CompletionRequest, outs: Sequence[GeneratedText], model_name: str
) -> dict[str, Any]:
    """The OpenAI response body for `req` given its rows' outputs (see CompletionRequest.rows)."""
    choices = []
    for i, o in enumerate(outs):
        lp = _logprobs_json(req, o.tokens, 0) if req.logprobs is not None else None
        if req.chat:
            choice: dict[str, Any] = {
                "index": i,
                "message": {"role": "assistant", "content": o.text},
                "logprobs": lp,
            }
        else:
            prefix = req.prompts[i // req.n] if req.echo else ""
            choice = {"index": i, "text": prefix + o.text, "logprobs": lp}
        choice["finish_reason"] = o.finish_reason
        choices.append(choice)
    return {
        "id": ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex,
        "object": "chat.completion" if req.chat else "text_completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": choices,
        "usage": _usage(req, outs),
    }


def _chunk(req: CompletionRequest, cid: str, model: str, choices: list, usage=None) -> bytes:  # noqa: ANN001
    body: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk" if req.chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if req.include_usage:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _chunk_choice(req: CompletionRequest, i: int, text: str, tokens: list, finish=None) -> dict:  # noqa: ANN001
    """One choice of a stream chunk: a text delta, its tokens' logprobs, a finish reason."""
    lp = _logprobs_json(req, tokens, 0) if req.logprobs is not None and tokens else None
    if req.chat:
        return {
            "index": i,
            "delta": {"content": text} if text else {},
            "logprobs": lp,
            "finish_reason": finish,
        }
    return {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}


async def stream_chunks(
    req: CompletionRequest,
    events: asyncio.Queue,
    job: _Job,
    model_name: str,
) -> AsyncIterator[bytes]:
    """The SSE body of a streamed request: one chunk per token as the decoder makes it (events
    (row, delta, token) from `job.on_token`, None when the job is over), a last chunk per choice
    with its finish reason, usage when asked, then `data: [DONE]`. Closing it cancels the job."""
    cid = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex
    sent = [""] * len(req.rows())
    try:
        for i in range(len(sent)):
            first = {"role": "assistant", "content": ""} if req.chat else None
            if req.chat:
                yield _chunk(
                    req,
                    cid,
                    model_name,
                    [{"index": i, "delta": first, "logprobs": None, "finish_reason": None}],
                )
            elif req.echo:
                prompt = req.prompts[i // req.n]
                yield _chunk(req, cid, model_name, [_chunk_choice(req, i, prompt, [])])
        while (event := await events.get()) is not None:
            row, delta, token = event
            if delta or req.logprobs is not None:
                sent[row] += delta
                yield _chunk(req, cid, model_name, [_chunk_choice(req, row, delta, [token])])
        try:
            outs = job.future.result()
        except Exception as e:  # noqa: BLE001 - the stream has started: report in-band
            err = {"message": f"generation failed: {type(e).__name__}", "type": "server_error"}
            yield b"data: " + json.dumps({"error": err}).encode() + b"\n\n"
            return
        for i, o in enumerate(outs):
            rest = o.text[len(sent[i]) :] if o.text.startswith(sent[i]) else ""
            yield _chunk(req, cid, model_name, [_chunk_choice(req, i, rest, [], o.finish_reason)])
        if req.include_usage:
            yield _chunk(req, cid, model_name, [], _usage(req, outs))
        yield b"data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client that left mid-stream stops its rows


class Metrics:
    """Prometheus metrics of one server (its own registry, so servers in one process differ)."""

    def __init__(self, engine: BatchingEngine):
        r = self.registry = prometheus_client.CollectorRegistry()
        p = "distill_sbs_"
        self.requests = prometheus_client.Counter(
            p + "requests", "HTTP requests answered", ["path", "status"], registry=r
        )
        self.tokens = prometheus_client.Counter(
            p + "tokens", "Tokens of answered completions", ["kind"], registry=r
        )
        self.latency = prometheus_client.Histogram(
            p + "request_latency_seconds",
            "Completion request latency",
            ["path"],
            registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.in_flight = prometheus_client.Gauge(
            p + "requests_in_flight", "Completion requests being answered", registry=r
        )
        queue = prometheus_client.Gauge(
            p + "queued_sequences", "Sequences waiting or being generated", registry=r
        )
        queue.set_function(lambda: engine.queued)
        batches = prometheus_client.Gauge(p + "batches", "Generate calls run", registry=r)
        batches.set_function(lambda: engine.batches_run)
        rows = prometheus_client.Gauge(p + "batch_rows", "Rows generated", registry=r)
        rows.set_function(lambda: engine.rows_run)


class ServerState:
    """What the request handlers share: engine, settings, metrics and the request log file."""

    def __init__(
        self,
        engine: BatchingEngine,
        model_name: str,
        limits: Limits,
        *,
        api_key: str | None = None,
        request_log: str | None = None,
        debug_endpoints: bool = False,
    ):
        self.engine, self.model_name, self.limits = engine, model_name, limits
        self.api_key = api_key
        self.debug_endpoints = debug_endpoints
        self.metrics = Metrics(engine)
        self.lock = threading.Lock()
        self.count = 0  # completion requests that reached the server
        self.in_flight = 0
        self.max_in_flight = 0
        self._log_file = open(request_log, "a", encoding="utf-8") if request_log else None

    def next_number(self) -> int:
        with self.lock:
            self.count += 1
            return self.count

    def write_log(self, entry: dict[str, Any]) -> None:
        """One JSON line per completion request: number, path, status, latency, token counts."""
        if self._log_file:
            with self.lock:
                self._log_file.write(json.dumps(entry) + "\n")
                self._log_file.flush()


_NOT_FOUND = {404: "not_found", 405: "method_not_allowed"}


class CompletionHandler:
    """Answers the HTTP requests of one server; the shared state is `self.state`."""

    def __init__(self, state: ServerState):
        self.state = state

    def routes(self) -> list[Route]:
        return [
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ] + self.debug_routes()

    def debug_routes(self) -> list[Route]:
        if not self.state.debug_endpoints:
            return []
        return [Route("/debug/state", self.debug_state, methods=["GET"])]

    def app(self) -> Starlette:
        async def http_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            status = exc.status_code
            msg = (
                f"no route {request.method} {request.url.path}"
                if status in _NOT_FOUND
                else exc.detail
            )
            return APIError(status, msg, code=_NOT_FOUND.get(status)).response()

        async def api_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, APIError)
            return exc.response()

        async def server_error(request: Request, exc: Exception) -> Response:
            logger.exception("unhandled error", exc_info=exc)
            return APIError(500, "internal server error", type="server_error").response()

        return Starlette(
            routes=self.routes(),
            exception_handlers={
                HTTPException: http_error,
                APIError: api_error,
                Exception: server_error,
            },
        )

    def authorize(self, request: Request) -> None:
        """Raises 401 unless the request carries the key (constant-time compare)."""
        key = self.state.api_key
        if not key:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(
                401,
                "missing or wrong API key (Authorization: Bearer KEY)",
                type="authentication_error",
                code="invalid_api_key",
            )

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        self.authorize(request)
        data = prometheus_client.generate_latest(self.state.metrics.registry)
        return Response(data, media_type=prometheus_client.CONTENT_TYPE_LATEST)

    def _model_json(self) -> dict[str, Any]:
        return {
            "id": self.state.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "distill_sbs",
        }

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.state.model_name:
            raise APIError(
                404,
                f"the model {model!r} does not exist (this server has {self.state.model_name!r})",
                code="model_not_found",
                param="model",
            )

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_json()]})

    async def model(self, request: Request) -> Response:
        self.authorize(request)
        self.check_model(request.path_params["model_id"])
        return JSONResponse(self._model_json())

    async def debug_state(self, request: Request) -> Response:
        """Counters only: nothing about prompts, seeds or clients."""
        self.authorize(request)
        s = self.state
        return JSONResponse(
            {
                "count": s.count,
                "in_flight": s.in_flight,
                "max_in_flight": s.max_in_flight,
                "queued_sequences": s.engine.queued,
                "batches": s.engine.batches_run,
                "rows": s.engine.rows_run,
            }
        )

    async def completions(self, request: Request) -> Response:
        return await self._post(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._post(request, chat=True)

    async def _post(self, request: Request, chat: bool) -> Response:
        path = request.url.path
        t0 = time.monotonic()
        entry: dict[str, Any] = {"n": self.state.next_number(), "path": path}
        with self.state.lock:
            self.state.in_flight += 1
            self.state.max_in_flight = max(self.state.max_in_flight, self.state.in_flight)
        self.state.metrics.in_flight.inc()
        try:
            try:
                self.authorize(request)
                raw = await self.read_body(request)
                response = await self.complete(request, chat, raw, entry)
            except APIError as e:
                entry["error"] = e.code or e.type
                response = e.response()
        finally:
            with self.state.lock:
                self.state.in_flight -= 1
            self.state.metrics.in_flight.dec()
        entry["status"] = response.status_code
        entry["latency_s"] = round(time.monotonic() - t0, 4)
        self.state.metrics.requests.labels(path, str(response.status_code)).inc()
        self.state.metrics.latency.labels(path).observe(time.monotonic() - t0)
        self.record(entry)
        return response

    def record(self, entry: dict[str, Any]) -> None:
        """Called once per completion request when its answer is ready (or its stream starts)."""
        self.state.write_log(entry)

    async def read_body(self, request: Request) -> bytes:
        """The body, bounded in size (413) and in time (408)."""
        limit = self.state.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise APIError(413, f"the body is over {limit} bytes", code="request_too_large")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.state.limits.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise APIError(
                            413, f"the body is over {limit} bytes", code="request_too_large"
                        )
                    chunks.append(chunk)
        except TimeoutError:
            raise APIError(408, "the body did not arrive in time", code="timeout") from None
        except ClientDisconnect:
            raise APIError(400, "the client went away", code="client_disconnected") from None
        return b"".join(chunks)

    async def complete(
        self, request: Request, chat: bool, raw: bytes, entry: dict[str, Any]
    ) -> Response:
        """Validates, generates and answers one completion request (its log entry: `entry`)."""
        limits = self.state.limits
        req = parse_request(raw, chat, limits.max_tokens_limit, limits.max_sequences_per_request)
        self.check_model(req.model)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue | None = asyncio.Queue() if req.stream else None
        on_token = None
        if events is not None:
            on_token = lambda row, delta, tok: loop.call_soon_threadsafe(  # noqa: E731
                events.put_nowait, (row, delta, tok)
            )
        try:
            job = self.state.engine.submit(
                req.rows(),
                req.params,
                req.seed,
                logprobs=req.logprobs is not None,
                on_token=on_token,
            )
        except QueueFull:
            raise APIError(
                429,
                "the server is busy (queue full); retry later",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            ) from None
        except RuntimeError:
            raise APIError(503, "the server is shutting down", type="server_error") from None
        if events is not None:
            job.future.add_done_callback(
                lambda _: loop.call_soon_threadsafe(events.put_nowait, None)
            )
            body = stream_chunks(req, events, job, self.state.model_name)
            return StreamingResponse(
                body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        outs = await self._wait(request, job)
        body = completion_response(req, outs, self.state.model_name)
        self.state.metrics.tokens.labels("prompt").inc(body["usage"]["prompt_tokens"])
        self.state.metrics.tokens.labels("completion").inc(body["usage"]["completion_tokens"])
        return JSONResponse(body)

    async def _wait(self, request: Request, job: _Job) -> list[GeneratedText]:
        """The job's outputs; cancels it if the client disconnects first."""
        result = asyncio.wrap_future(job.future)

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({result, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if not result.done():
            job.cancelled.set()
            raise APIError(499, "the client went away", code="client_disconnected")
        try:
            return result.result()
        except Exception as e:  # noqa: BLE001 - the client gets the reason
            raise APIError(
                500, f"generation failed: {type(e).__name__}: {e}", type="server_error"
            ) from None


class _Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol plus a header timeout (uvicorn has none: a client that opens a
    connection and sends nothing, or drips its headers, would hold it for ever) and JSON 400s."""

    header_timeout_s = 10.0  # set per server (see Server)

    def connection_made(self, transport: Any) -> None:  # noqa: D102
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:  # noqa: D102
        super().on_response_complete()
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        scope = self.scope  # a new request replaces it: then the headers arrived in time
        self.loop.call_later(self.header_timeout_s, self._header_deadline, scope)

    def _header_deadline(self, scope: Any) -> None:
        waiting = self.scope is scope and self.conn.their_state in (h11.IDLE, h11.DONE)
        if waiting and not self.transport.is_closing():
            self.transport.close()

    def send_400_response(self, msg: str) -> None:  # noqa: D102 - h11 rejected the request
        error = {"message": msg, "type": "invalid_request_error", "code": "bad_http_request"}
        body = json.dumps({"error": error}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (
            h11.Response(status_code=400, headers=headers),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def check_auth_settings(host: str, api_key: str | None, allow_unauthenticated: bool) -> None:
    """Raises ValueError for a server others could reach without a key (unless allowed)."""
    if api_key or allow_unauthenticated:
        return
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"refusing to listen on {host} without an API key: pass --api_key_env VAR "
            "(or --allow_unauthenticated if anyone who can reach it may use it)"
        )


class Server:
    """The HTTP server (uvicorn, one event loop), its batching engine and its serving thread.

    `handler_class` answers each HTTP request (a CompletionHandler subclass may change what a
    request gets; tests inject faults that way).
    """

    def __init__(
        self,
        generator: Generator,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        model_name: str = "student",
        max_batch_size: int | None = None,
        batch_window_ms: float = 5.0,
        limits: Limits | None = None,
        request_log: str | None = None,
        api_key: str | None = None,
        allow_unauthenticated: bool = False,
        debug_endpoints: bool = False,
        handler_class: type[CompletionHandler] = CompletionHandler,
    ):
        check_auth_settings(host, api_key, allow_unauthenticated)
        self.limits = limits or Limits()
        self.engine = BatchingEngine(
            generator,
            max_batch_size or generator.max_batch_size,
            batch_window_ms / 1000,
            self.limits.max_queued_sequences,
        )
        self.state = ServerState(
            self.engine,
            model_name,
            self.limits,
            api_key=api_key,
            request_log=request_log,
            debug_endpoints=debug_endpoints,
        )
        self.handler = handler_class(self.state)
        protocol = type(
            "Protocol", (_Protocol,), {"header_timeout_s": self.limits.header_timeout_s}
        )
        config = uvicorn.Config(
            self.handler.app(),
            http=protocol,
            lifespan="off",
            access_log=False,
            log_level="warning",
            timeout_keep_alive=self.limits.keep_alive_s,
            limit_concurrency=self.limits.max_connections,
            timeout_graceful_shutdown=5,
        )
        self._uvicorn = uvicorn.Server(config)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))  # here, so that a busy port fails at once
        self._socket.listen(2048)  # connections wait in the backlog until uvicorn accepts
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._socket.getsockname()[1]

    @property
    def base_url(self) -> str:
        host = self._socket.getsockname()[0]
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/v1"

    def start(self) -> Server:
        """Serves on a background thread; returns once it accepts connections."""
        self._uvicorn.config.install_signal_handlers = False  # not the main thread
        self._thread = threading.Thread(
            target=self._uvicorn.run, kwargs={"sockets": [self._socket]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def serve_forever(self) -> None:
        """Serves on this thread until SIGINT or SIGTERM."""
        try:
            self._uvicorn.run(sockets=[self._socket])
        finally:
            self.engine.close()

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.engine.close()
        self._socket.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def main(argv: Sequence[str], handler_class: type[CompletionHandler] = CompletionHandler) -> None:
    """The command line (flags from define_flags); `handler_class` as in Server."""
    from absl import flags

    from distill_sbs.generation import ModelGenerator

    FLAGS = flags.FLAGS
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    api_key = None
    if FLAGS.api_key_env:
        api_key = os.environ.get(FLAGS.api_key_env)
        if not api_key:
            raise SystemExit(
                f"error: --api_key_env names {FLAGS.api_key_env}, which is unset or empty"
            )
    try:
        check_auth_settings(FLAGS.host, api_key, FLAGS.allow_unauthenticated)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    limits = Limits(**{f.name: getattr(FLAGS, f.name) for f in dataclasses.fields(Limits)})
    generator = ModelGenerator.from_checkpoint(
        FLAGS.checkpoint,
        max_input_length=FLAGS.max_input_length,
        max_batch_size=FLAGS.max_batch_size,
        max_decode_length=limits.max_tokens_limit,
    )
    if FLAGS.warmup:
        t0 = time.monotonic()
        n = generator.warmup(limits.max_tokens_limit)
        logger.info("warm-up: %d greedy programs compiled in %.1fs", n, time.monotonic() - t0)
    name = FLAGS.model_name or os.path.basename(os.path.normpath(FLAGS.checkpoint))
    server = Server(
        generator,
        host=FLAGS.host,
        port=FLAGS.port,
        model_name=name,
        batch_window_ms=FLAGS.batch_window_ms,
        limits=limits,
        request_log=FLAGS.request_log,
        api_key=api_key,
        allow_unauthenticated=FLAGS.allow_unauthenticated,
        debug_endpoints=FLAGS.debug_endpoints,
        handler_class=handler_class,
    )
    # One line that scripts (and tests) wait for before sending requests.
    print(f"serving {name} on {server.base_url}", flush=True)
    server.serve_forever()


_LIMIT_HELP = {
    "max_tokens_limit": "Upper bound on max_tokens (larger ones are clipped).",
    "max_sequences_per_request": "Most prompts x n in one request (more: 400).",
    "max_queued_sequences": "Most sequences waiting or running in all (more: 429).",
    "max_body_bytes": "Largest request body (larger: 413).",
    "header_timeout_s": "Seconds a connection has to send a request's headers.",
    "body_timeout_s": "Seconds a request has to send its body (then 408).",
    "keep_alive_s": "Seconds an idle keep-alive connection stays open.",
    "max_connections": "Most open connections and requests together (more: 503).",
}


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("checkpoint", None, "Native checkpoint, MODEL_DIR or HF T5 folder.")
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
    flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port, printed at start).")
    flags.DEFINE_string("model_name", None, "Model id reported by /v1/models (default: dir name).")
    flags.DEFINE_integer("max_batch_size", 16, "Most rows in one generate call.")
    flags.DEFINE_float("batch_window_ms", 5.0, "How long to gather concurrent requests.")
    flags.DEFINE_integer("max_input_length", 512, "Inputs are truncated to this many tokens.")
    for f in dataclasses.fields(Limits):
        define = flags.DEFINE_integer if f.type == "int" else flags.DEFINE_float
        define(f.name, f.default, _LIMIT_HELP[f.name])
    flags.DEFINE_string("request_log", None, "Append one JSON line per completion request here.")
    flags.DEFINE_string(
        "api_key_env", None, "Require 'Authorization: Bearer $VAR' (the variable's NAME)."
    )
    flags.DEFINE_boolean(
        "allow_unauthenticated", False, "Allow a non-loopback --host without --api_key_env."
    )
    flags.DEFINE_boolean("debug_endpoints", False, "Serve GET /debug/state (behind the key).")
    flags.DEFINE_boolean(
        "warmup", False, "Compile greedy decoding for every batch/length bucket before serving."
    )
    flags.mark_flag_as_required("checkpoint")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
