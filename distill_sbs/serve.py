r"""An OpenAI-compatible server over a trained student: `python -m distill_sbs.serve`.

    python -m distill_sbs.serve --checkpoint DIR --port 8000 [--host 127.0.0.1]

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (max_tokens, temperature,
top_p, n, stop, seed), and GET /debug/requests (a count of the completion requests that reached
the server, for tests; with --debug_endpoints also POST /debug/faults to set a fault plan).
Chat messages become one input text: the text content of every message, in
order, joined by a blank line ("\n\n"); roles are dropped, because a student is trained on plain
inputs (put a task prefix such as "[label] " in the user message if the student expects one).

Concurrent requests are batched: handler threads put their prompts on a queue, and one batching
thread takes what arrived within --batch_window_ms (up to --max_batch_size rows) and runs one
generate call per distinct set of decoding parameters. Sampling with a batch shares one seed: the
`seed` of the first request in the batch.

For tests, --inject_faults takes a fault plan (see distill_sbs/teachers/testing.py), e.g.
"429:retry_after=1@3,500@5,slow=3@7,malformed@9".
"""

from __future__ import annotations

import concurrent.futures
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
from collections.abc import Sequence
from typing import Any

from distill_sbs.generation import GeneratedText, GenerationParams, Generator
from distill_sbs.teachers.testing import FaultPlan

logger = logging.getLogger("distill_sbs.serve")


class BatchingEngine:
    """Groups prompts submitted from many threads into batched generate calls."""

    def __init__(
        self, generator: Generator, max_batch_size: int = 16, batch_window_s: float = 0.005
    ):
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self.batches_run = 0
        self.rows_run = 0
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def submit(
        self, prompts: Sequence[str], params: GenerationParams, seed: int
    ) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((list(prompts), params, seed, future))
        return future

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if first is None:
                break
            items = [first]
            rows = len(first[0])
            deadline = time.monotonic() + self.batch_window_s
            while rows < self.max_batch_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    item = self._queue.get(timeout=left)
                except queue.Empty:
                    break
                if item is None:
                    self._stop.set()
                    break
                items.append(item)
                rows += len(item[0])
            groups: dict[GenerationParams, list] = {}
            for item in items:
                groups.setdefault(item[1], []).append(item)
            for params, group in groups.items():
                self._run(params, group)

    def _run(self, params: GenerationParams, group: list) -> None:
        prompts = [p for item in group for p in item[0]]
        try:
            outs = self.generator.generate(prompts, params, group[0][2])
        except Exception as e:  # noqa: BLE001 - reported to each waiting request
            logger.exception("generate failed")
            for item in group:
                item[3].set_exception(e)
            return
        self.batches_run += 1
        self.rows_run += len(prompts)
        i = 0
        for item in group:
            item[3].set_result(outs[i : i + len(item[0])])
            i += len(item[0])

    def close(self) -> None:
        self._stop.set()
        self._queue.put(None)  # wake the batcher now
        self._thread.join(timeout=5)


class _BadRequest(Exception):
    pass


def _messages_to_text(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("'messages' must be a non-empty list")
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "content" not in m:
            raise _BadRequest(f"messages[{i}] must be an object with 'role' and 'content'")
        content = m["content"]
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(
                c.get("text", "")
                for c in content
                if isinstance(c, dict) and c.get("type") == "text"
            )
        if not isinstance(content, str):
            raise _BadRequest(f"messages[{i}].content must be a string or a list of text parts")
        parts.append(content)
    return "\n\n".join(parts)


class ServerState:
    def __init__(
        self,
        engine: BatchingEngine,
        model_name: str,
        max_tokens_limit: int,
        faults: FaultPlan,
        request_log: str | None,
        api_key: str | None = None,
    ):
        self.engine = engine
        self.api_key = api_key
        self.fault_base = 0  # fault plans count requests after this one (POST /debug/faults)
        self.debug_endpoints = False
        self.in_flight = 0
        self.max_in_flight = 0
        self.model_name = model_name
        self.max_tokens_limit = max_tokens_limit
        self.faults = faults
        self.lock = threading.Lock()
        self.count = 0
        self.by_status: Counter = Counter()
        self.log: list[dict[str, Any]] = []
        self._log_file = open(request_log, "a", encoding="utf-8") if request_log else None

    def next_number(self) -> int:
        with self.lock:
            self.count += 1
            return self.count

    def record(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.by_status[str(entry["status"])] += 1
            self.log.append(entry)
            if self._log_file:
                self._log_file.write(json.dumps(entry) + "\n")
                self._log_file.flush()


def _params(body: dict[str, Any], limit: int) -> tuple[GenerationParams, int, int]:
    def number(name: str, default: float, lo: float, hi: float) -> float:
        v = body.get(name, default)
        if v is None:
            v = default
        if not isinstance(v, int | float) or isinstance(v, bool) or not lo <= v <= hi:
            raise _BadRequest(f"'{name}' must be a number in [{lo}, {hi}], got {v!r}")
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
        raise _BadRequest("'stop' must be a string or a list of up to 4 strings")
    params = GenerationParams(
        min(max_tokens, limit), temperature, top_p if top_p > 0 else 1.0, tuple(stop)
    )
    return params, n, seed


def _make_handler(state: ServerState) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "distill_sbs"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            logger.debug("%s " + format, self.address_string(), *args)  # never headers

        def _send(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
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

        def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
            kind = "invalid_request_error" if status < 500 else "server_error"
            self._send(status, {"error": {"message": message, "type": kind}}, headers)

        def do_GET(self) -> None:  # noqa: N802
            if self.path.rstrip("/") == "/v1/models":
                model = {"id": state.model_name, "object": "model", "owned_by": "distill_sbs"}
                self._send(200, {"object": "list", "data": [model]})
            elif self.path.rstrip("/") == "/debug/requests":
                with state.lock:
                    body = {
                        "count": state.count,
                        "by_status": dict(state.by_status),
                        "requests": list(state.log),
                        "batches": state.engine.batches_run,
                        "rows": state.engine.rows_run,
                        "max_in_flight": state.max_in_flight,
                    }
                self._send(200, body)
            elif self.path.rstrip("/") in ("", "/health"):
                self._send(200, {"status": "ok"})
            else:
                self._error(404, f"no route GET {self.path}")

        def do_POST(self) -> None:  # noqa: N802
            path = self.path.rstrip("/")
            if path == "/debug/faults" and state.debug_endpoints:
                self._set_faults()
                return
            if path not in ("/v1/completions", "/v1/chat/completions"):
                self._error(404, f"no route POST {self.path}")
                return
            if state.api_key and self.headers.get("Authorization") != f"Bearer {state.api_key}":
                self._error(401, "missing or wrong API key")
                return
            chat = path.endswith("chat/completions")
            with state.lock:
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                self._complete(chat)
            finally:
                with state.lock:
                    state.in_flight -= 1

        def _set_faults(self) -> None:
            """{"plan": "500@2,..."}: a new fault plan, numbered from the next request."""
            length = int(self.headers.get("Content-Length") or 0)
            try:
                plan = FaultPlan.parse(json.loads(self.rfile.read(length) or b"{}").get("plan"))
            except (ValueError, AttributeError) as e:
                self._error(400, str(e))
                return
            with state.lock:
                state.faults, state.fault_base = plan, state.count
                self._send(200, {"fault_base": state.fault_base})

        def _complete(self, chat: bool) -> None:
            path = self.path.rstrip("/")
            number = state.next_number()
            entry: dict[str, Any] = {"n": number, "path": path, "fault": None}
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            fault = state.faults.for_request(number - state.fault_base)
            if fault is not None:
                entry["fault"] = fault.kind
                if fault.kind == "slow":
                    time.sleep(fault.seconds)
                elif fault.kind == "drop":
                    entry["status"] = "dropped"
                    state.record(entry)
                    self.close_connection = True
                    return
                elif fault.kind == "malformed":
                    entry["status"] = 200
                    state.record(entry)
                    data = b'{"choices": [{"text": "trunc'
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                else:
                    status = int(fault.kind)
                    headers = {"Retry-After": f"{fault.seconds:g}"} if fault.seconds else None
                    entry["status"] = status
                    state.record(entry)
                    self._error(status, f"injected fault {fault.kind}", headers)
                    return
            try:
                body = json.loads(raw or b"null")
                if not isinstance(body, dict):
                    raise _BadRequest("the request body must be a JSON object")
                params, n, seed = _params(body, state.max_tokens_limit)
                if chat:
                    prompts = [_messages_to_text(body.get("messages"))]
                else:
                    prompt = body.get("prompt")
                    prompts = [prompt] if isinstance(prompt, str) else prompt
                    if (
                        not isinstance(prompts, list)
                        or not prompts
                        or not all(isinstance(p, str) for p in prompts)
                    ):
                        raise _BadRequest(
                            "'prompt' must be a string or a non-empty list of strings"
                        )
            except (_BadRequest, ValueError) as e:
                entry["status"] = 400
                state.record(entry)
                self._error(400, str(e))
                return
            entry["seed"] = seed
            entry["prompt_sha256"] = [hashlib.sha256(p.encode()).hexdigest() for p in prompts]
            try:
                outs: list[GeneratedText] = state.engine.submit(
                    [p for p in prompts for _ in range(n)], params, seed
                ).result()
            except Exception as e:  # noqa: BLE001
                entry["status"] = 500
                state.record(entry)
                self._error(500, f"generation failed: {type(e).__name__}: {e}")
                return
            choices = []
            for i, o in enumerate(outs):
                finish = "length" if o.completion_tokens >= params.max_tokens else "stop"
                if chat:
                    choice = {"index": i, "message": {"role": "assistant", "content": o.text}}
                else:
                    choice = {"index": i, "text": o.text, "logprobs": None}
                choice["finish_reason"] = finish
                choices.append(choice)
            # Each prompt counts once for prompt tokens, however many samples were drawn.
            prompt_tokens = sum(o.prompt_tokens for o in outs[::n])
            completion_tokens = sum(o.completion_tokens for o in outs)
            entry["status"] = 200
            state.record(entry)
            self._send(
                200,
                {
                    "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()),
                    "model": state.model_name,
                    "choices": choices,
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                    },
                },
            )

    return Handler


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default listen backlog (5) resets bursts of clients


class Server:
    """The HTTP server, its batching engine and its serving thread."""

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
        faults: str | FaultPlan | None = None,
        request_log: str | None = None,
        api_key: str | None = None,
        debug_endpoints: bool = False,
    ):
        plan = faults if isinstance(faults, FaultPlan) else FaultPlan.parse(faults)
        self.engine = BatchingEngine(
            generator, max_batch_size or generator.max_batch_size, batch_window_ms / 1000
        )
        self.state = ServerState(
            self.engine, model_name, max_tokens_limit, plan, request_log, api_key
        )
        self.state.debug_endpoints = debug_endpoints
        self.httpd = _HTTPServer((host, port), _make_handler(self.state))
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


def main(argv: Sequence[str]) -> None:
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
        faults=FLAGS.inject_faults,
        request_log=FLAGS.request_log,
        api_key=os.environ.get(FLAGS.api_key_env) if FLAGS.api_key_env else None,
        debug_endpoints=FLAGS.debug_endpoints,
    )
    # One line that scripts (and tests) wait for before sending requests.
    print(f"serving {name} on http://{FLAGS.host}:{server.port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.engine.close()


def _define_flags() -> None:
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
    flags.DEFINE_string("inject_faults", None, "Fault plan for tests (teachers/testing.py).")
    flags.DEFINE_string("request_log", None, "Append one JSON line per completion request here.")
    flags.DEFINE_string(
        "api_key_env", None, "If set, require 'Authorization: Bearer $VAR' (the variable's NAME)."
    )
    flags.DEFINE_boolean(
        "warmup", False, "Compile greedy decoding for every batch/length bucket before serving."
    )
    flags.DEFINE_boolean(
        "debug_endpoints", False, "Tests: POST /debug/faults {'plan': ...} sets a fault plan."
    )
    flags.mark_flag_as_required("checkpoint")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
