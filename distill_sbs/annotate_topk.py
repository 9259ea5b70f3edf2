r"""Save a teacher's top-k log-probabilities for offline logit distillation, from a local teacher

    python -m distill_sbs.annotate_topk --teacher=/ckpt/teacher --task=arith_dss --k=8 \
        --output=/data/arith_dss.train.topk.npz

or from an OpenAI-compatible encoder-decoder server (`python -m distill_sbs.serve` over the
teacher) that scores given text (`echo`, `max_tokens: 0`, `logprobs: k`, `decoder_prompt`):

    python -m distill_sbs.annotate_topk --teacher_url=http://127.0.0.1:8000/v1 --model=teacher \
        --api_key_env=TEACHER_KEY --task=arith_dss --k=8 --output=/data/arith_dss.train.topk.npz

Either way every target token of the task's (or mixture's) split is scored by teacher forcing,
exactly as training tokenizes it, and data/topk.py's file is written; then train with
`teacher_topk_path.path = "<output>"` and `train.kd = @KD()` without `KD.teacher`
(docs/distillation.md). --teacher is a native checkpoint, a MODEL_DIR or a Hugging Face T5 folder.

A server answers token strings: each is mapped back to the student's vocabulary id (SentencePiece
piece, a space for "\u2581"; `token_id:N` for an id no piece has), and the scored tokens must be
the student's tokenization of the target (EOS included), else the run stops with one error naming
the example (the server's tokenizer is another one). Only encoder-decoder servers are supported:
a decoder-only server scores prompt + target as one text, whose tokens at the boundary need not
be the target's own tokens, and no decoder-only LLM shares the student's T5 vocabulary.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from absl import app, flags

from distill_sbs.generation import GenerationParams
from distill_sbs.teachers.backends import (
    Completion,
    HTTPConfig,
    OpenAIBackend,
    RequestFailed,
    TeacherRequest,
)

F = SimpleNamespace()  # the flags, once define_flags() has run


def define_flags() -> None:
    """The flags, defined only when run as a program: defined at import they would clash with
    annotate's (--teacher, --model, ...) in a process that imports both."""
    F.teacher = flags.DEFINE_string(
        "teacher", None, "Teacher checkpoint (native, MODEL_DIR or HF)."
    )
    F.url = flags.DEFINE_string(
        "teacher_url", None, "Base URL of an OpenAI-compatible encoder-decoder server (…/v1)."
    )
    F.model = flags.DEFINE_string("model", None, "With --teacher_url: the server's model name.")
    F.key_env = flags.DEFINE_string(
        "api_key_env", None, "With --teacher_url: NAME of the variable holding the API key."
    )
    F.concurrency = flags.DEFINE_integer(
        "max_concurrency", 4, "With --teacher_url: requests at once."
    )
    F.retries = flags.DEFINE_integer("max_retries", 5, "With --teacher_url: retries per request.")
    F.vocab_size = flags.DEFINE_integer(
        "vocab_size",
        None,
        "With --teacher_url: the student's T5Config.vocab_size written to the file (default: the "
        "task vocabulary's size; a T5 student's padded 32128 must be given).",
    )
    F.task = flags.DEFINE_string("task", None, "Registered task or mixture, e.g. arith_dss.")
    F.split = flags.DEFINE_string("split", "train", "Split to score.")
    F.k = flags.DEFINE_integer("k", 8, "Log-probabilities kept per target token.")
    F.output = flags.DEFINE_string("output", None, "Output .npz file.")
    F.batch = flags.DEFINE_integer(
        "batch_size", 32, "Examples per teacher batch (with --teacher_url: per request)."
    )
    F.module = flags.DEFINE_string("module", None, "Module to import that registers --task.")


class ServerTopKError(ValueError):
    """A server's answer that cannot be the student's top-k (tokenizer mismatch, short top-k)."""


@dataclasses.dataclass(frozen=True)
class ScoreRequest(TeacherRequest):
    """One scoring request: the encoder inputs (`prompts`) and the targets to score."""

    prompts: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Scores(Completion):
    """A scoring answer: each choice's `logprobs` object, in prompt order."""

    logprobs: tuple[dict[str, Any], ...] = ()


class ScoringBackend(OpenAIBackend):
    """The OpenAI client of teachers/backends.py (concurrency, retries, Retry-After, key
    redaction) asking for scores instead of completions: legacy completions with `echo`,
    `max_tokens: 0`, `logprobs: k` and the targets as `decoder_prompt`."""

    def __init__(self, config: HTTPConfig, k: int) -> None:
        super().__init__(config)
        self.k = k

    def _body(self, req: TeacherRequest) -> dict[str, Any]:
        assert isinstance(req, ScoreRequest)
        return {
            "model": self.config.model,
            "prompt": list(req.prompts),
            "decoder_prompt": list(req.targets),
            "echo": True,
            "max_tokens": 0,
            "logprobs": self.k,
            "temperature": 0,
        }

    def _parse(self, req: TeacherRequest, data: Any) -> Completion:
        choices = sorted(data["choices"], key=lambda c: c["index"])
        logprobs = tuple(c["logprobs"] for c in choices)
        if len(logprobs) != len(req.prompts) or not all(isinstance(x, dict) for x in logprobs):
            raise TypeError("one choice with a logprobs object per prompt expected")
        usage = data.get("usage") or {}
        return Scores("", int(usage.get("prompt_tokens") or 0), 0, logprobs=logprobs)


class TokenMap:
    """The server's token strings -> the student's ids (its SentencePiece vocabulary)."""

    def __init__(self, vocabulary: Any, vocab_size: int) -> None:
        self.tokenizer = getattr(vocabulary, "tokenizer", None)
        if self.tokenizer is None:
            raise ServerTopKError("--teacher_url needs a task with a SentencePiece vocabulary")
        self.vocab_size = vocab_size
        self.unk = self.tokenizer.unk_id()

    def __call__(self, token: str, where: str) -> int:
        number = token.removeprefix("token_id:")
        if number != token and number.isdigit() and int(number) < self.vocab_size:
            return int(number)
        piece = token.replace(" ", "\u2581")
        i = self.tokenizer.piece_to_id(piece)
        if i == self.unk and piece != self.tokenizer.id_to_piece(self.unk):
            raise ServerTopKError(
                f"{where}: the server's token {token!r} is not in the student's vocabulary: the "
                "server's tokenizer differs from the student's"
            )
        return i


def _entry(example: dict[str, Any], logprobs: dict[str, Any], k: int, tokens: TokenMap) -> tuple:
    """(id, objective, targets, ids [T, k], log-probs [T, k]) of one example's answer."""
    import numpy as np

    where = f"example {example['id']!r} ({example['objective']})"
    scored = [tokens(t, where) for t in logprobs.get("tokens") or []]
    if scored != example["targets"]:
        raise ServerTopKError(
            f"{where}: the server scored the tokens {scored} but the student tokenizes the target "
            f"as {example['targets']} (EOS included): the server's tokenizer differs"
        )
    tops = logprobs.get("top_logprobs") or []
    ids = np.zeros((len(scored), k), np.int64)
    lps = np.zeros((len(scored), k), np.float32)
    for j, top in enumerate(tops if len(tops) == len(scored) else [None] * len(scored)):
        if not isinstance(top, dict) or len(top) < k:
            raise ServerTopKError(
                f"{where}: the server gave {len(top) if isinstance(top, dict) else 'no'} top "
                f"log-probabilities at target token {j}, {k} were asked for"
            )
        best = sorted(top.items(), key=lambda kv: -float(kv[1]))[:k]  # stable: server's order
        ids[j] = [tokens(t, where) for t, _ in best]
        lps[j] = [float(lp) for _, lp in best]
    return example["id"], example["objective"], example["targets"], ids, lps


def write_topk_from_server(
    config: HTTPConfig,
    mixture_or_task_name: str,
    output: str,
    *,
    k: int,
    split: str = "train",
    batch_size: int = 16,
    vocab_size: int | None = None,
) -> float:
    """`distillation.write_topk` with the teacher behind an OpenAI-compatible encoder-decoder
    server: the same file, from the server's top-k of each example's target given its input.
    Returns the file's bytes per target token; ServerTopKError for an answer that does not fit
    the student's tokenization, RuntimeError for a request that failed for good."""
    import seqio

    from distill_sbs import distillation

    examples = distillation.task_examples(mixture_or_task_name, split)
    if any(e["inputs_text"] is None or e["targets_text"] is None for e in examples):
        raise ServerTopKError(
            f"{mixture_or_task_name}: its examples keep no inputs_/targets_pretokenized text "
            "to send to a server"
        )
    vocabulary = (
        seqio.get_mixture_or_task(mixture_or_task_name).output_features["targets"].vocabulary
    )
    tokens = TokenMap(vocabulary, vocab_size or vocabulary.vocab_size)
    chunks = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    backend = ScoringBackend(config, k)
    answers: dict[str, Scores | RequestFailed] = {}
    reqs = [_request(i, chunk) for i, chunk in enumerate(chunks)]
    try:
        backend.run(reqs, lambda req, result: answers.__setitem__(req.key, result))
    finally:
        backend.close()
    entries = []
    for req, chunk in zip(reqs, chunks, strict=True):
        answer = answers[req.key]
        if isinstance(answer, RequestFailed):
            raise RuntimeError(
                f"{config.base_url}: scoring examples {chunk[0]['id']!r}..{chunk[-1]['id']!r} "
                f"failed: {answer}"
            )
        entries += [_entry(e, lp, k, tokens) for e, lp in zip(chunk, answer.logprobs, strict=True)]
        _check_prompt_tokens(answer, chunk)  # after the targets: their error names the example
    return distillation.save_topk(output, entries, tokens.vocab_size)


def _check_prompt_tokens(answer: Scores, chunk: Sequence[dict[str, Any]]) -> None:
    """The encoder side, which the answer does not list: the usage our server reports (input +
    target tokens, EOS included) must be the student's count."""
    want = sum(len(e["inputs"]) + len(e["targets"]) for e in chunk)
    if answer.prompt_tokens and answer.prompt_tokens != want:
        raise ServerTopKError(
            f"examples {chunk[0]['id']!r}..{chunk[-1]['id']!r}: the server counts "
            f"{answer.prompt_tokens} input + target tokens, the student's tokenizer {want}: the "
            "server's tokenizer differs"
        )


def _request(i: int, chunk: Sequence[dict[str, Any]]) -> ScoreRequest:
    prompts = tuple(e["inputs_text"] for e in chunk)
    targets = tuple(e["targets_text"] for e in chunk)
    return ScoreRequest(f"chunk-{i}", "", GenerationParams(0), 0, prompts, targets)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for name, flag in (("task", F.task), ("output", F.output)):
        if not flag.value:
            raise app.UsageError(f"--{name} is required")
    if bool(F.teacher.value) == bool(F.url.value):
        raise app.UsageError("give exactly one of --teacher (local) and --teacher_url (a server)")
    if F.url.value and not F.model.value:
        raise app.UsageError("--teacher_url needs --model (the server's model name)")
    importlib.import_module(F.module.value or "distill_sbs.tasks")
    try:
        size = _write()
    except (ValueError, RuntimeError) as e:  # one line, not a traceback: the input is wrong
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {F.output.value}: top-{F.k.value}, {size:.1f} bytes per target token")


def _write() -> float:
    from distill_sbs import distillation, models

    kwargs = {"k": F.k.value, "split": F.split.value, "batch_size": F.batch.value}
    if F.url.value:
        config = HTTPConfig(
            F.url.value,
            F.model.value,
            api_key_env=F.key_env.value,
            max_concurrency=F.concurrency.value,
            max_retries=F.retries.value,
        )
        return write_topk_from_server(
            config, F.task.value, F.output.value, vocab_size=F.vocab_size.value, **kwargs
        )
    model, params = models.load(F.teacher.value)
    return distillation.write_topk(model, params, F.task.value, F.output.value, **kwargs)


if __name__ == "__main__":
    define_flags()
    app.run(main)
