"""The local teacher backend: teacher requests run on a `generation.Generator` (for example a
`generation.ModelGenerator` over a native or converted checkpoint), batched by decoding parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

from distill_sbs.generation import GenerationParams, Generator
from distill_sbs.teachers.backends import (
    BackendStats,
    Completion,
    OnResult,
    RequestFailed,
    TeacherRequest,
)


class LocalBackend:
    """A teacher backend over a Generator: requests with equal parameters are batched."""

    def __init__(self, generator: Generator, batch_size: int | None = None):
        self.generator = generator
        self.batch_size = batch_size or generator.max_batch_size
        self.stats = BackendStats()

    def run(self, reqs: Sequence[TeacherRequest], on_result: OnResult) -> None:
        groups: dict[GenerationParams, list[TeacherRequest]] = {}
        for r in reqs:
            groups.setdefault(r.params, []).append(r)
        for params, group in groups.items():
            for i in range(0, len(group), self.batch_size):
                chunk = group[i : i + self.batch_size]
                self.stats.attempts += len(chunk)
                try:
                    outs = self.generator.generate([r.prompt for r in chunk], params, chunk[0].seed)
                except Exception as e:  # noqa: BLE001 - a model error fails these requests only
                    self.stats.errors[type(e).__name__] += len(chunk)
                    self.stats.failures += len(chunk)
                    for r in chunk:
                        on_result(r, RequestFailed(f"local generation failed: {e}", 1))
                    continue
                for r, o in zip(chunk, outs, strict=True):
                    self.stats.prompt_tokens += o.prompt_tokens
                    self.stats.completion_tokens += o.completion_tokens
                    on_result(r, Completion(o.text, o.prompt_tokens, o.completion_tokens))

    def close(self) -> None:
        pass
