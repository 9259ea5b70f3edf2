r"""An OpenAI-compatible server over a trained student: `python -m distill_sbs.serve`.

Usage and endpoints: __main__.py (its docstring is what `--help` prints). See docs/serve.md.

The HTTP layer is Starlette on uvicorn (HTTP/1.1 keep-alive, one event loop, no thread per
connection); the model runs on one batching thread. A request goes through `parse_request`
(validation), the `BatchingEngine` (rows scheduled fairly, round-robin over requests) and
`completion_response` / `stream_chunks` (the OpenAI bodies); `CompletionHandler` strings them
together, and a subclass passed as `Server(handler_class=...)` can change what a request gets
(the tests inject faults that way).

One job per module:

    protocol.py  OpenAI shapes: parse_request -> CompletionRequest, response/SSE bodies, APIError
    engine.py    BatchingEngine: jobs, fair row scheduling, cancellation
    app.py       CompletionHandler (routes, auth, limits), ServerState, Limits, Prometheus metrics
    server.py    Server: uvicorn, its socket and thread, the header-timeout protocol; auth policy
    cli.py       define_flags and main (`python -m distill_sbs.serve`, __main__.py)
"""

from distill_sbs.serve.app import CompletionHandler, Limits, Metrics, ServerState
from distill_sbs.serve.cli import define_flags, main
from distill_sbs.serve.engine import BatchingEngine, Job, QueueFull
from distill_sbs.serve.protocol import (
    APIError,
    BadRequest,
    CompletionRequest,
    completion_response,
    parse_request,
    stream_chunks,
)
from distill_sbs.serve.server import Server, check_auth_settings

__all__ = [
    "APIError",
    "BadRequest",
    "BatchingEngine",
    "CompletionHandler",
    "CompletionRequest",
    "Job",
    "Limits",
    "Metrics",
    "QueueFull",
    "Server",
    "ServerState",
    "check_auth_settings",
    "completion_response",
    "define_flags",
    "main",
    "parse_request",
    "stream_chunks",
]
