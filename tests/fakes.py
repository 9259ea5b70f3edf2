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
    drop                  close the connection without answering

Example: "429:retry_after=1@3,500@5,slow=3@7,malformed@9".
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from typing import Any

from distill_sbs.generation import GeneratedText, apply_stop
from distill_sbs.serve import CompletionHandler, Server

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
    chain-of-thought parser reads as rationale + answer.
    """

    def __init__(self, respond=None, max_batch_size: int = 8, delay: float = 0.0):
        self.respond = respond or (
            lambda prompt, params, seed: (
                f"Reading {prompt.splitlines()[-1][:40]!r}. So the answer is 42."
            )
        )
        self.max_batch_size = max_batch_size
        self.delay = delay
        self.calls: list[int] = []  # batch size of each generate call

    def generate(self, prompts, params, seed: int = 0):
        self.calls.append(len(prompts))
        if self.delay:
            time.sleep(self.delay)
        out = []
        for p in prompts:
            # A "token" is a word with the whitespace after it, so newlines survive.
            words = re.findall(r"\s*\S+\s*", self.respond(p, params, seed))[: params.max_tokens]
            text = apply_stop("".join(words), params.stop)
            out.append(GeneratedText(text, len(p.split()), len(words)))
        return out


class Faults:
    """The fault plan of one server; requests are numbered from `base` (POST /debug/faults)."""

    def __init__(self, plan: FaultPlan):
        self.plan, self.base = plan, 0
        self.lock = threading.Lock()

    def for_request(self, number: int) -> Fault | None:
        with self.lock:
            return self.plan.for_request(number - self.base)


class FaultInjectingHandler(CompletionHandler):
    """A CompletionHandler whose completion requests first meet the server's fault plan."""

    faults: Faults  # set by fault_handler

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") != "/debug/faults":
            super().do_POST()
            return
        length = int(self.headers.get("Content-Length") or 0)
        try:
            plan = FaultPlan.parse(json.loads(self.rfile.read(length) or b"{}").get("plan"))
        except (ValueError, AttributeError) as e:
            self.send_error_json(400, str(e))
            return
        with self.state.lock, self.faults.lock:
            self.faults.plan, self.faults.base = plan, self.state.count
            self.send_json(200, {"fault_base": self.faults.base})

    def complete(self, chat: bool, raw: bytes, entry: dict[str, Any]) -> None:
        fault = self.faults.for_request(entry["n"])
        entry["fault"] = fault.kind if fault else None
        if fault is None:
            super().complete(chat, raw, entry)
        elif fault.kind == "slow":
            time.sleep(fault.seconds)
            super().complete(chat, raw, entry)
        elif fault.kind == "drop":
            entry["status"] = "dropped"
            self.state.record(entry)
            self.close_connection = True
        elif fault.kind == "malformed":
            entry["status"] = 200
            self.state.record(entry)
            data = b'{"choices": [{"text": "trunc'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            headers = {"Retry-After": f"{fault.seconds:g}"} if fault.seconds else None
            status = int(fault.kind)
            self.finish_request(
                entry, status, error=f"injected fault {fault.kind}", headers=headers
            )


def fault_handler(plan: FaultPlan | str | None = None) -> type[FaultInjectingHandler]:
    """A handler class with its own fault plan (one per server)."""
    faults = Faults(plan if isinstance(plan, FaultPlan) else FaultPlan.parse(plan))
    return type("FaultInjectingHandler", (FaultInjectingHandler,), {"faults": faults})


def fault_server(generator, faults: FaultPlan | str | None = None, **kwargs: Any) -> Server:
    """A (not yet started) Server over `generator` whose requests meet `faults`."""
    return Server(generator, handler_class=fault_handler(faults), **kwargs)
