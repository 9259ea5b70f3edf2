"""The server's ASGI application: `CompletionHandler` (routes, API key, body limits, one
completion request from body to answer), the state its requests share (`ServerState`), the
client limits (`Limits`) and the Prometheus metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import threading
import time
from typing import Any

import prometheus_client
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from distill_sbs import storage
from distill_sbs.generation import GeneratedText
from distill_sbs.serve.engine import BatchingEngine, Job, QueueFull, ScoringError
from distill_sbs.serve.protocol import (
    APIError,
    BadRequest,
    CompletionRequest,
    completion_response,
    parse_request,
    server_error,
    stream_chunks,
)

logger = logging.getLogger(__name__)


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
        log = storage.Path(request_log).open("a", encoding="utf-8") if request_log else None
        self._log_file = log

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

        async def unhandled(request: Request, exc: Exception) -> Response:
            return server_error(exc, "internal server error").response()

        return Starlette(
            routes=self.routes(),
            exception_handlers={
                HTTPException: http_error,
                APIError: api_error,
                Exception: unhandled,
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
        if req.targets is None:
            self.check_prompt_lengths(req)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue | None = asyncio.Queue() if req.stream else None
        on_token = None
        if events is not None:
            on_token = lambda row, delta, tok: loop.call_soon_threadsafe(  # noqa: E731
                events.put_nowait, (row, delta, tok)
            )
        try:
            if req.targets is not None:
                job = self._submit_scoring(req)
            else:
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

    def check_prompt_lengths(self, req: CompletionRequest) -> None:
        """400 for a prompt longer than the model reads: cutting it would answer another one."""
        generator = self.state.engine.generator
        count = getattr(generator, "prompt_tokens", None)  # None: a test's fake generator
        limit = getattr(generator, "max_input_length", None)
        if count is None or limit is None:
            return
        for i, prompt in enumerate(req.prompts):
            n = count(prompt)
            if n > limit:
                what = "the messages" if req.chat else f"prompt {i}"
                raise BadRequest(
                    f"{what}: {n} tokens (EOS included), more than this server's "
                    f"--max_input_length={limit}",
                    "messages" if req.chat else "prompt",
                )

    def _submit_scoring(self, req: CompletionRequest) -> Job:
        """Queues a scoring request's rows; each target's tokens count against
        max_tokens_limit (a scored token costs about what a generated one does), each prompt
        against --max_input_length."""
        engine, limit = self.state.engine, self.state.limits.max_tokens_limit
        if engine.scorer is None:
            raise BadRequest("this server's model cannot score texts ('max_tokens': 0)")
        assert req.targets is not None
        try:
            rows = [
                engine.scorer.tokenize(p, t, limit, i)
                for i, (p, t) in enumerate(zip(req.prompts, req.targets, strict=True))
            ]
            return engine.submit_scoring(rows)
        except ScoringError as e:
            raise BadRequest(str(e)) from None

    async def _wait(self, request: Request, job: Job) -> list[GeneratedText]:
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
        except Exception as e:  # noqa: BLE001 - logged under the answer's request id
            raise server_error(e, "generation failed") from None
