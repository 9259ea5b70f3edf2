"""Teacher annotation: prompts, backends (OpenAI-compatible HTTP, local model), cache, pipeline.

    from distill_sbs.teachers import TeacherConfig, annotate, make_backend, RequestCache
    cfg = TeacherConfig("gpt", base_url="http://127.0.0.1:8000/v1", model="m", exemplars="cqa")
    with RequestCache("runs/ann/cache.jsonl") as cache:
        result = annotate(records, [(cfg, make_backend(cfg))], cache, metric="multiple_choice")

The command line is `python -m distill_sbs.annotate`; see docs/annotate.md.
"""

from distill_sbs.generation import GenerationParams
from distill_sbs.teachers.backends import (
    Completion,
    HTTPConfig,
    OpenAIBackend,
    RequestFailed,
    TeacherRequest,
)
from distill_sbs.teachers.cache import RequestCache, request_key
from distill_sbs.teachers.exemplars import BUILTIN, Exemplar, get_exemplars, load_exemplars
from distill_sbs.teachers.pipeline import (
    AnnotationResult,
    TeacherConfig,
    TeacherSummary,
    annotate,
    make_backend,
)

__all__ = [
    "BUILTIN",
    "AnnotationResult",
    "Completion",
    "Exemplar",
    "GenerationParams",
    "HTTPConfig",
    "OpenAIBackend",
    "RequestCache",
    "RequestFailed",
    "TeacherConfig",
    "TeacherRequest",
    "TeacherSummary",
    "annotate",
    "get_exemplars",
    "load_exemplars",
    "make_backend",
    "request_key",
]
