"""Fault injection for tests of teacher clients against `python -m distill_sbs.serve`.

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
import re

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
        import time

        from distill_sbs.generation import GeneratedText, apply_stop

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
