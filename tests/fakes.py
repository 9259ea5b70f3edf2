"""Test doubles: a fake Generator and fault injection into `distill_sbs.serve`.

Test modules import this as `fakes` (tests/ is on sys.path through pyproject's pytest
`pythonpath`; tests/fault_server.py runs as a script from this directory).
`fault_server(generator, plan)` is a Server whose requests meet the faults of `plan`;
`POST /debug/faults {"plan": ...}` replaces the plan of a running one, numbered from the next
request.

A fault plan is a comma-separated list of `KIND[:OPTS]@WHEN`, where WHEN is the 1-based number of
a completion request reaching the server (`7`, or a range `7-9`) and KIND is one of

    429[:retry_after=S]   answer 429 Too Many Requests (with a Retry-After header of S seconds)
    500 | 502 | 503[:retry_after=S] | 504   answer that server error
    slow=S                sleep S seconds before answering normally (to exceed a client timeout)
    malformed             answer 200 with a body that is not JSON
    drop                  start a 200 answer and close the connection before its body

Example: "429:retry_after=1@3,500@5,slow=3@7,malformed@9".
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import json
import re
import threading
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from distill_sbs.generation import TOP_LOGPROBS_MAX, GeneratedText, TextTracker, Token
from distill_sbs.serve import APIError, CompletionHandler, Server

_ITEM = re.compile(
    r"^(?P<kind>[a-z0-9]+)(?:=(?P<value>[0-9.]+))?(?::(?P<opts>[^@]*))?@(?P<when>.+)$"
)
_STATUS_KINDS = {"429", "500", "502", "503", "504"}


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str  # "429", "500", ..., "slow", "malformed", "drop"
    seconds: float = 0.0  # slow: the delay; 429/503: the Retry-After value (0 = no header)


class FaultPlan:
    """Maps request numbers (1-based) to the fault injected into that request."""

    def __init__(self, faults: dict[int, Fault] | None = None):
        self.faults = dict(faults or {})

    def __bool__(self) -> bool:
        return bool(self.faults)

    def for_request(self, number: int) -> Fault | None:
        return self.faults.get(number)

    @classmethod
    def parse(cls, spec: str | None) -> FaultPlan:
        faults: dict[int, Fault] = {}
        for item in (spec or "").split(","):
            item = item.strip()
            if not item:
                continue
            m = _ITEM.match(item)
            if not m:
                raise ValueError(f"fault plan: cannot parse {item!r} (expected KIND[:OPTS]@N)")
            kind, value, opts, when = m["kind"], m["value"], m["opts"], m["when"]
            seconds = 0.0
            if kind == "slow":
                if value is None:
                    raise ValueError(f"fault plan: {item!r}: slow needs seconds, e.g. slow=3@7")
                seconds = float(value)
            elif kind in _STATUS_KINDS or kind in ("malformed", "drop"):
                if value is not None:
                    raise ValueError(f"fault plan: {item!r}: {kind} takes no '=' value")
                for opt in filter(None, (opts or "").split(";")):
                    name, _, v = opt.partition("=")
                    if name != "retry_after" or kind not in ("429", "503"):
                        raise ValueError(f"fault plan: {item!r}: unknown option {name!r}")
                    seconds = float(v)
            else:
                raise ValueError(f"fault plan: {item!r}: unknown fault kind {kind!r}")
            lo, _, hi = when.partition("-")
            try:
                first, last = int(lo), int(hi or lo)
            except ValueError:
                raise ValueError(f"fault plan: {item!r}: bad request number {when!r}") from None
            if first < 1 or last < first:
                raise ValueError(f"fault plan: {item!r}: bad request range {when!r}")
            for n in range(first, last + 1):
                if n in faults:
                    raise ValueError(f"fault plan: request {n} has two faults")
                faults[n] = Fault(kind, seconds)
        return cls(faults)


class FakeGenerator:
    """A Generator for tests: `respond(prompt, params, seed)` gives each text; calls are recorded.

    The default response names the prompt's last line and answers "42", which the project's
    chain-of-thought parser reads as rationale + answer. A "token" is a word with the whitespace
    after it (so newlines survive); its logprob is -0.5 and its alternatives are "alt0".. (-1,
    -2, ...). Streaming goes through generation.TextTracker, as ModelGenerator's does, with
    `delay` seconds per token when `stream_delay` is set (so that a test can cancel mid-row).
    """

    def __init__(
        self, respond=None, max_batch_size: int = 8, delay: float = 0.0, stream_delay: float = 0.0
    ):
        self.respond = respond or (
            lambda prompt, params, seed: (
                f"Reading {prompt.splitlines()[-1][:40]!r}. So the answer is 42."
            )
        )
        self.max_batch_size = max_batch_size
        self.delay = delay
        self.stream_delay = stream_delay
        self.calls: list[int] = []  # batch size of each generate call
        self.tokens_made = 0  # tokens handed to on_token (the rest were cancelled)

    @staticmethod
    def token(i: int, word: str) -> Token:
        return Token(word, -0.5, tuple((f"alt{j}", -1.0 - j) for j in range(TOP_LOGPROBS_MAX)))

    def generate(self, prompts, params, seed: int = 0, *, logprobs=False, on_token=None):
        self.calls.append(len(prompts))
        if self.delay:
            time.sleep(self.delay)
        rows = [re.findall(r"\s*\S+\s*", self.respond(p, params, seed)) for p in prompts]
        trackers = [TextTracker("".join, params.stop) for _ in prompts]
        live = [True] * len(prompts)
        for step in range(params.max_tokens):
            if not any(live[r] and step < len(w) for r, w in enumerate(rows)):
                break
            if self.stream_delay and on_token:
                time.sleep(self.stream_delay)
            for r, words in enumerate(rows):
                if not live[r] or step >= len(words):
                    continue
                # the words stand for token ids: the tracker's decode function joins them
                delta = trackers[r].add(words[step], self.token(step, words[step]))
                if on_token is not None:
                    self.tokens_made += 1
                    live[r] = on_token(r, delta, trackers[r].tokens[-1])
                live[r] = live[r] and not trackers[r].stopped
        out = []
        for p, words, t in zip(prompts, rows, trackers, strict=True):
            n = t.kept_tokens()
            length = not t.stopped and n >= params.max_tokens and len(words) >= params.max_tokens
            toks = tuple(t.tokens[:n]) if logprobs else ()
            finish = "length" if length else "stop"
            out.append(GeneratedText(t.text, len(p.split()), n, finish, toks))
        return out


class Faults:
    """The fault plan of one server; requests are numbered from `base` (POST /debug/faults), and
    a log of every completion request with its prompt hashes and seed (for exactly-once checks:
    test-only; the real server keeps no such log)."""

    def __init__(self, plan: FaultPlan):
        self.plan, self.base = plan, 0
        self.lock = threading.Lock()
        self.log: list[dict[str, Any]] = []
        self.by_status: collections.Counter = collections.Counter()

    def for_request(self, number: int) -> Fault | None:
        with self.lock:
            return self.plan.for_request(number - self.base)


async def _drop(scope, receive, send) -> None:
    """Starts a 200 answer, then fails: uvicorn closes the connection with the body unsent."""
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]}
    )
    raise ConnectionAbortedError("injected fault: drop")


class _Raw(Response):
    """An ASGI response that is any callable (for the drop fault)."""

    def __init__(self, app):
        self._app = app
        self.status_code = 200

    async def __call__(self, scope, receive, send) -> None:
        await self._app(scope, receive, send)


class FaultInjectingHandler(CompletionHandler):
    """A CompletionHandler whose completion requests first meet the server's fault plan; it also
    serves POST /debug/faults and GET /debug/requests (unauthenticated: a test double)."""

    faults: Faults  # set by fault_handler

    def routes(self) -> list[Route]:
        return super().routes() + [
            Route("/debug/faults", self.set_faults, methods=["POST"]),
            Route("/debug/requests", self.requests_log, methods=["GET"]),
        ]

    async def set_faults(self, request: Request) -> Response:
        try:
            plan = FaultPlan.parse(json.loads(await request.body() or b"{}").get("plan"))
        except (ValueError, AttributeError) as e:
            return JSONResponse({"error": {"message": str(e)}}, 400)
        with self.state.lock, self.faults.lock:
            self.faults.plan, self.faults.base = plan, self.state.count
        return JSONResponse({"fault_base": self.faults.base})

    async def requests_log(self, request: Request) -> Response:
        with self.faults.lock:
            return JSONResponse(
                {
                    "count": self.state.count,
                    "requests": list(self.faults.log),
                    "by_status": dict(self.faults.by_status),
                    "max_in_flight": self.state.max_in_flight,
                }
            )

    def record(self, entry: dict[str, Any]) -> None:
        super().record(entry)
        with self.faults.lock:
            self.faults.log.append(entry)
            self.faults.by_status[str(entry["status"])] += 1

    async def complete(self, request, chat: bool, raw: bytes, entry: dict[str, Any]) -> Response:
        fault = self.faults.for_request(entry["n"])
        entry["fault"] = fault.kind if fault else None
        try:
            body = json.loads(raw)
            prompts = [body["prompt"]] if isinstance(body.get("prompt"), str) else body["prompt"]
            entry["prompt_sha256"] = [hashlib.sha256(p.encode()).hexdigest() for p in prompts]
            entry["seed"] = body.get("seed")
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeError):
            pass
        if fault is None:
            return await super().complete(request, chat, raw, entry)
        if fault.kind == "slow":
            await asyncio.sleep(fault.seconds)
            return await super().complete(request, chat, raw, entry)
        if fault.kind == "drop":
            return _Raw(_drop)
        if fault.kind == "malformed":
            return Response(b'{"choices": [{"text": "trunc', 200, media_type="application/json")
        headers = {"Retry-After": f"{fault.seconds:g}"} if fault.seconds else None
        raise APIError(
            int(fault.kind), f"injected fault {fault.kind}", type="server_error", headers=headers
        )


def fault_handler(plan: FaultPlan | str | None = None) -> type[FaultInjectingHandler]:
    """A handler class with its own fault plan (one per server)."""
    faults = Faults(plan if isinstance(plan, FaultPlan) else FaultPlan.parse(plan))
    return type("FaultInjectingHandler", (FaultInjectingHandler,), {"faults": faults})


def fault_server(generator, faults: FaultPlan | str | None = None, **kwargs: Any) -> Server:
    """A (not yet started) Server over `generator` whose requests meet `faults`."""
    return Server(generator, handler_class=fault_handler(faults), **kwargs)
