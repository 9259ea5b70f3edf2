"""Running the application: `Server` (uvicorn on one event loop, its socket, batching engine
and thread), uvicorn's HTTP/1.1 protocol with a header timeout, and the API-key policy."""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from distill_sbs.generation import Generator
from distill_sbs.serve.app import CompletionHandler, Limits, ServerState
from distill_sbs.serve.engine import BatchingEngine


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
