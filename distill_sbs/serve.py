r"""An OpenAI-compatible server over a trained student: `python -m distill_sbs.serve`.

    python -m distill_sbs.serve --checkpoint DIR --port 8000 [--host 127.0.0.1]

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (max_tokens, temperature,
top_p, n, stop, seed), and GET /debug/requests (a count of the completion requests that reached
the server, for tests). Chat messages become one input text: the text content of every message, in
order, joined by a blank line ("\n\n"); roles are dropped, because a student is trained on plain
inputs (put a task prefix such as "[label] " in the user message if the student expects one).

Concurrent requests are batched: handler threads put their prompts on a queue, and one batching
thread takes what arrived within --batch_window_ms (up to --max_batch_size rows) and runs one
generate call per distinct set of decoding parameters. Sampling with a batch shares one seed: the
`seed` of the first request in the batch.

A request goes through `parse_request` (validation), the `BatchingEngine` and
`completion_response` (the OpenAI body); `CompletionHandler.complete` strings them together, and
a subclass passed as `Server(handler_class=...)` can change what a request gets (the tests inject
faults that way).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import http.server
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from distill_sbs.generation import GeneratedText, GenerationParams, Generator

logger = logging.getLogger("distill_sbs.serve")

COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions")


@dataclasses.dataclass
class _Job:
    """One request's rows on their way through the batcher; `future` gets their texts."""

    prompts: list[str]
    params: GenerationParams
    seed: int
    future: concurrent.futures.Future


class BatchingEngine:
    """Groups prompts submitted from many threads into batched generate calls."""

    def __init__(
        self, generator: Generator, max_batch_size: int = 16, batch_window_s: float = 0.005
    ):
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._stop = threading.Event()
        self.batches_run = 0
        self.rows_run = 0
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def submit(
        self, prompts: Sequence[str], params: GenerationParams, seed: int
    ) -> concurrent.futures.Future:
        """A future of the GeneratedText list of `prompts`, in order."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Job(list(prompts), params, seed, future))
        return future

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if first is None:
                break
            groups: dict[GenerationParams, list[_Job]] = {}
            for job in self._gather(first):
                groups.setdefault(job.params, []).append(job)
            for params, group in groups.items():
                self._run(params, group)

    def _gather(self, first: _Job) -> list[_Job]:
        """`first` and what else arrives within the batch window, up to max_batch_size rows."""
        jobs = [first]
        rows = len(first.prompts)
        deadline = time.monotonic() + self.batch_window_s
        while rows < self.max_batch_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                job = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if job is None:
                self._stop.set()
                break
            jobs.append(job)
            rows += len(job.prompts)
        return jobs

    def _run(self, params: GenerationParams, group: list[_Job]) -> None:
        prompts = [p for job in group for p in job.prompts]
        try:
            outs = self.generator.generate(prompts, params, group[0].seed)
        except Exception as e:  # noqa: BLE001 - reported to each waiting request
            logger.exception("generate failed")
            for job in group:
                job.future.set_exception(e)
            return
        self.batches_run += 1
        self.rows_run += len(prompts)
        i = 0
        for job in group:
            job.future.set_result(outs[i : i + len(job.prompts)])
            i += len(job.prompts)

    def close(self) -> None:
        self._stop.set()
        self._queue.put(None)  # wake the batcher now
        self._thread.join(timeout=5)


class BadRequest(Exception):
    """A request the client must fix: answered 400 with this message."""


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    """A validated completion or chat request."""

    chat: bool
    prompts: list[str]  # chat: the one text the messages become
    params: GenerationParams
    n: int  # samples per prompt
    seed: int

    def rows(self) -> list[str]:
        """What the generator gets: each prompt n times, samples of a prompt side by side."""
        return [p for p in self.prompts for _ in range(self.n)]


def _messages_to_text(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
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
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string or a list of text parts")
        parts.append(content)
    return "\n\n".join(parts)


def _prompt_list(prompt: Any) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise BadRequest("'prompt' must be a string or a non-empty list of strings")
    return prompts


def _params(body: dict[str, Any], limit: int) -> tuple[GenerationParams, int, int]:
    """(decoding parameters, n, seed); max_tokens above `limit` is clipped to it."""

    def number(name: str, default: float, lo: float, hi: float) -> float:
        v = body.get(name, default)
        if v is None:
            v = default
        if not isinstance(v, int | float) or isinstance(v, bool) or not lo <= v <= hi:
            raise BadRequest(f"'{name}' must be a number in [{lo}, {hi}], got {v!r}")
        return v

    max_tokens = int(number("max_tokens", 16, 1, 1 << 20))
    temperature = float(number("temperature", 1.0, 0.0, 2.0))
    top_p = float(number("top_p", 1.0, 0.0, 1.0))
    n = int(number("n", 1, 1, 16))
    seed = int(number("seed", 0, -(1 << 63), 1 << 63))
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise BadRequest("'stop' must be a string or a list of up to 4 strings")
    params = GenerationParams(
        min(max_tokens, limit), temperature, top_p if top_p > 0 else 1.0, tuple(stop)
    )
    return params, n, seed


def parse_request(raw: bytes, chat: bool, max_tokens_limit: int) -> CompletionRequest:
    """The request in a POST body; raises BadRequest naming what is wrong."""
    try:
        body = json.loads(raw or b"null")
    except ValueError as e:  # not JSON, or not UTF-8
        raise BadRequest(str(e)) from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    params, n, seed = _params(body, max_tokens_limit)
    if chat:
        prompts = [_messages_to_text(body.get("messages"))]
    else:
        prompts = _prompt_list(body.get("prompt"))
    return CompletionRequest(chat, prompts, params, n, seed)


def completion_response(
    req: CompletionRequest, outs: Sequence[GeneratedText], model_name: str
) -> dict[str, Any]:
    """The OpenAI response body for `req` given its rows' outputs (see CompletionRequest.rows)."""
    choices = []
    for i, o in enumerate(outs):
        if req.chat:
            choice: dict[str, Any] = {
                "index": i,
                "message": {"role": "assistant", "content": o.text},
            }
        else:
            choice = {"index": i, "text": o.text, "logprobs": None}
        choice["finish_reason"] = (
            "length" if o.completion_tokens >= req.params.max_tokens else "stop"
        )
        choices.append(choice)
    # Each prompt counts once for prompt tokens, however many samples were drawn.
    prompt_tokens = sum(o.prompt_tokens for o in outs[:: req.n])
    completion_tokens = sum(o.completion_tokens for o in outs)
    return {
        "id": ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex,
        "object": "chat.completion" if req.chat else "text_completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class ServerState:
    """What the handler threads share: the engine, settings, counters and the request log."""

    def __init__(
        self,
        engine: BatchingEngine,
        model_name: str,
        max_tokens_limit: int,
        request_log: str | None,
        api_key: str | None = None,
    ):
        self.engine = engine
        self.api_key = api_key
        self.in_flight = 0
        self.max_in_flight = 0
        self.model_name = model_name
        self.max_tokens_limit = max_tokens_limit
        self.lock = threading.Lock()
        self.count = 0
        self.by_status: Counter = Counter()
        self.log: list[dict[str, Any]] = []
        self._log_file = open(request_log, "a", encoding="utf-8") if request_log else None

    def next_number(self) -> int:
        with self.lock:
            self.count += 1
            return self.count

    @contextlib.contextmanager
    def in_flight_request(self) -> Iterator[None]:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield
        finally:
            with self.lock:
                self.in_flight -= 1

    def record(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.by_status[str(entry["status"])] += 1
            self.log.append(entry)
            if self._log_file:
                self._log_file.write(json.dumps(entry) + "\n")
                self._log_file.flush()

    def debug_body(self) -> dict[str, Any]:
        with self.lock:
            return {
                "count": self.count,
                "by_status": dict(self.by_status),
                "requests": list(self.log),
                "batches": self.engine.batches_run,
                "rows": self.engine.rows_run,
                "max_in_flight": self.max_in_flight,
            }


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default listen backlog (5) resets bursts of clients

    def __init__(
        self,
        address: tuple[str, int],
        handler_class: type[CompletionHandler],
        state: ServerState,
    ):
        self.state = state  # reached by the handlers as self.server.state
        super().__init__(address, handler_class)


class CompletionHandler(http.server.BaseHTTPRequestHandler):
    """Answers one HTTP request; the server's shared state is `self.state`."""

    server_version = "distill_sbs"
    server: _HTTPServer

    @property
    def state(self) -> ServerState:
        return self.server.state

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        logger.debug("%s " + format, self.address_string(), *args)  # never headers

    def send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. it timed out on a slow response)

    def send_error_json(
        self, status: int, message: str, headers: dict[str, str] | None = None
    ) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self.send_json(status, {"error": {"message": message, "type": kind}}, headers)

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.rstrip("/")
        if path == "/v1/models":
            model = {"id": self.state.model_name, "object": "model", "owned_by": "distill_sbs"}
            self.send_json(200, {"object": "list", "data": [model]})
        elif path == "/debug/requests":
            self.send_json(200, self.state.debug_body())
        elif path in ("", "/health"):
            self.send_json(200, {"status": "ok"})
        else:
            self.send_error_json(404, f"no route GET {self.path}")

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.rstrip("/")
        if path not in COMPLETION_PATHS:
            self.send_error_json(404, f"no route POST {self.path}")
            return
        key = self.state.api_key
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            self.send_error_json(401, "missing or wrong API key")
            return
        with self.state.in_flight_request():
            entry: dict[str, Any] = {"n": self.state.next_number(), "path": path}
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            self.complete(path.endswith("chat/completions"), raw, entry)

    def complete(self, chat: bool, raw: bytes, entry: dict[str, Any]) -> None:
        """Validates, generates and answers one completion request; logs it as `entry`."""
        try:
            req = parse_request(raw, chat, self.state.max_tokens_limit)
        except (BadRequest, ValueError) as e:
            self.finish_request(entry, 400, error=str(e))
            return
        entry["seed"] = req.seed
        entry["prompt_sha256"] = [hashlib.sha256(p.encode()).hexdigest() for p in req.prompts]
        try:
            outs = self.state.engine.submit(req.rows(), req.params, req.seed).result()
        except Exception as e:  # noqa: BLE001 - the client gets the reason
            self.finish_request(entry, 500, error=f"generation failed: {type(e).__name__}: {e}")
            return
        self.finish_request(entry, 200, completion_response(req, outs, self.state.model_name))

    def finish_request(
        self,
        entry: dict[str, Any],
        status: int,
        body: Any = None,
        *,
        error: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Logs `entry` with `status`, then answers with `body` (or the error message)."""
        entry["status"] = status
        self.state.record(entry)
        if error is not None:
            self.send_error_json(status, error, headers)
        else:
            self.send_json(status, body, headers)


class Server:
    """The HTTP server, its batching engine and its serving thread.

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
        max_tokens_limit: int = 512,
        request_log: str | None = None,
        api_key: str | None = None,
        handler_class: type[CompletionHandler] = CompletionHandler,
    ):
        self.engine = BatchingEngine(
            generator, max_batch_size or generator.max_batch_size, batch_window_ms / 1000
        )
        self.state = ServerState(self.engine, model_name, max_tokens_limit, request_log, api_key)
        self.httpd = _HTTPServer((host, port), handler_class, self.state)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.httpd.server_address[0]}:{self.port}/v1"

    def start(self) -> Server:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.engine.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: Sequence[str], handler_class: type[CompletionHandler] = CompletionHandler) -> None:
    """The command line (flags from define_flags); `handler_class` as in Server."""
    from absl import flags

    from distill_sbs.generation import ModelGenerator

    FLAGS = flags.FLAGS
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    generator = ModelGenerator.from_checkpoint(
        FLAGS.checkpoint,
        max_input_length=FLAGS.max_input_length,
        max_batch_size=FLAGS.max_batch_size,
        max_decode_length=FLAGS.max_tokens_limit,
    )
    if FLAGS.warmup:
        t0 = time.monotonic()
        n = generator.warmup(FLAGS.max_tokens_limit)
        logger.info("warm-up: %d greedy programs compiled in %.1fs", n, time.monotonic() - t0)
    name = FLAGS.model_name or os.path.basename(os.path.normpath(FLAGS.checkpoint))
    server = Server(
        generator,
        host=FLAGS.host,
        port=FLAGS.port,
        model_name=name,
        batch_window_ms=FLAGS.batch_window_ms,
        max_tokens_limit=FLAGS.max_tokens_limit,
        request_log=FLAGS.request_log,
        api_key=os.environ.get(FLAGS.api_key_env) if FLAGS.api_key_env else None,
        handler_class=handler_class,
    )
    # One line that scripts (and tests) wait for before sending requests.
    print(f"serving {name} on http://{FLAGS.host}:{server.port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.engine.close()


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("checkpoint", None, "Native checkpoint, MODEL_DIR or HF T5 folder.")
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
    flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port, printed at start).")
    flags.DEFINE_string("model_name", None, "Model id reported by /v1/models (default: dir name).")
    flags.DEFINE_integer("max_batch_size", 16, "Most rows in one generate call.")
    flags.DEFINE_float("batch_window_ms", 5.0, "How long to gather concurrent requests.")
    flags.DEFINE_integer("max_input_length", 512, "Inputs are truncated to this many tokens.")
    flags.DEFINE_integer(
        "max_tokens_limit", 256, "Upper bound on max_tokens (larger ones are clipped)."
    )
    flags.DEFINE_string("request_log", None, "Append one JSON line per completion request here.")
    flags.DEFINE_string(
        "api_key_env", None, "If set, require 'Authorization: Bearer $VAR' (the variable's NAME)."
    )
    flags.DEFINE_boolean(
        "warmup", False, "Compile greedy decoding for every batch/length bucket before serving."
    )
    flags.mark_flag_as_required("checkpoint")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
