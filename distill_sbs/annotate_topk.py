r"""Save a teacher's top-k log-probabilities for offline logit distillation, from a local teacher

    python -m distill_sbs.annotate_topk --teacher=/ckpt/teacher --task=arith_dss --k=8 \
        --output=/data/arith_dss.train.topk.npz

or from an OpenAI-compatible encoder-decoder server (`python -m distill_sbs.serve` over the
teacher) that scores given text (`echo`, `max_tokens: 0`, `logprobs: k`, `decoder_prompt`):

    python -m distill_sbs.annotate_topk --teacher_url=http://127.0.0.1:8000/v1 --model=teacher \
        --api_key_env=TEACHER_KEY --task=arith_dss --k=8 --output=/data/arith_dss.train.topk.npz

A teacher with another tokenizer (an LLM behind vLLM, or our server over a T5 of another
vocabulary) is scored in its own tokens with --pieces, into cross_tokenizer's pieces file (JSON
lines: per target the teacher's pieces, their character spans in the target text, their
log-probs and each position's top-k {piece: log-prob}); --decoder_only for a decoder-only server,
which scores input + " " + target as one prompt:

    python -m distill_sbs.annotate_topk --teacher_url=http://127.0.0.1:8000/v1 --model=llm \
        --pieces --decoder_only --task=arith_dss --k=8 --output=/data/arith_dss.train.pieces.jsonl

Either way every target token of the task's (or mixture's) split is scored by teacher forcing,
exactly as training tokenizes it, and data/topk.py's file is written; then train with
`teacher_topk_path.path = "<output>"` and `train.kd = @KD()` without `KD.teacher`
(docs/distillation.md). --teacher is a native checkpoint, a MODEL_DIR or a Hugging Face T5 folder.
How a server's answer is checked against the student's tokenizer: teachers/topk.py.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

from absl import flags

from distill_sbs import program
from distill_sbs.errors import UserError

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
    F.pieces = flags.DEFINE_bool(
        "pieces",
        False,
        "With --teacher_url: keep the teacher's own tokens (a teacher with another tokenizer): "
        "write the pieces file of distill_sbs.cross_tokenizer (JSON lines).",
    )
    F.decoder_only = flags.DEFINE_bool(
        "decoder_only",
        False,
        "With --pieces: the server is decoder-only (vLLM): it scores input + ' ' + target as one "
        "prompt rather than the target as decoder_prompt.",
    )
    F.task = flags.DEFINE_string("task", None, "Registered task or mixture, e.g. arith_dss.")
    F.split = flags.DEFINE_string("split", "train", "Split to score.")
    F.k = flags.DEFINE_integer("k", 8, "Log-probabilities kept per target token.")
    F.output = flags.DEFINE_string("output", None, "Output .npz file.")
    F.batch = flags.DEFINE_integer(
        "batch_size", 32, "Examples per teacher batch (with --teacher_url: per request)."
    )
    F.module = flags.DEFINE_string("module", None, "Module to import that registers --task.")


def main() -> None:
    for name, flag in (("task", F.task), ("output", F.output)):
        if not flag.value:
            raise UserError(f"--{name} is required")
    if bool(F.teacher.value) == bool(F.url.value):
        raise UserError("give exactly one of --teacher (local) and --teacher_url (a server)")
    if F.url.value and not F.model.value:
        raise UserError("--teacher_url needs --model (the server's model name)")
    if F.pieces.value and not F.url.value:
        raise UserError("--pieces needs --teacher_url (a server scoring in its own tokenizer)")
    if F.decoder_only.value and not F.pieces.value:
        raise UserError("--decoder_only needs --pieces")
    try:
        importlib.import_module(F.module.value or "distill_sbs.tasks")
    except ImportError as e:
        raise UserError(f"--module {F.module.value}: {e}") from e
    from distill_sbs import data

    try:  # before a teacher is loaded
        data.get_objectives(F.task.value)
    except KeyError as e:
        raise UserError(f"--task: {program.one_line(e)}") from e
    try:
        size = _write()
    except RuntimeError as e:  # a request that failed for good: the server is down or refuses
        raise UserError(str(e)) from e
    if F.pieces.value:
        print(f"wrote {F.output.value}: top-{F.k.value} in the teacher's pieces, {size} targets")
    else:
        print(f"wrote {F.output.value}: top-{F.k.value}, {size:.1f} bytes per target token")


def _write() -> float:
    from distill_sbs import models
    from distill_sbs.teachers import topk
    from distill_sbs.teachers.backends import HTTPConfig

    kwargs = {"k": F.k.value, "split": F.split.value, "batch_size": F.batch.value}
    if F.url.value:
        config = HTTPConfig(
            F.url.value,
            F.model.value,
            api_key_env=F.key_env.value,
            max_concurrency=F.concurrency.value,
            max_retries=F.retries.value,
        )
        if F.pieces.value:
            return topk.write_pieces_from_server(
                config, F.task.value, F.output.value, decoder_only=F.decoder_only.value, **kwargs
            )
        return topk.write_topk_from_server(
            config, F.task.value, F.output.value, vocab_size=F.vocab_size.value, **kwargs
        )
    model, params = models.load(F.teacher.value)
    return topk.write_topk(model, params, F.task.value, F.output.value, **kwargs)


if __name__ == "__main__":
    program.run(main, define_flags)
