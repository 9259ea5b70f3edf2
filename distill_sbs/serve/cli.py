"""The command line of `python -m distill_sbs.serve`: its flags (`define_flags`), `main`, and
`run` (program.run over both; a user error is one line `error: ...` and exit status 2)."""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import os
import socket
import time

from distill_sbs import program, storage
from distill_sbs.errors import UserError
from distill_sbs.serve.app import CompletionHandler, Limits
from distill_sbs.serve.server import Server, check_auth_settings

logger = logging.getLogger(__name__)


def run(handler_class: type[CompletionHandler] = CompletionHandler) -> None:
    """The program: `python -m distill_sbs.serve`; `handler_class` as in Server."""
    program.run(functools.partial(main, handler_class), define_flags)


def main(handler_class: type[CompletionHandler] = CompletionHandler) -> None:
    """Serves the checkpoint the flags (define_flags) name, until interrupted."""
    from absl import flags

    from distill_sbs.generation import ModelGenerator

    FLAGS = flags.FLAGS
    # this package's progress lines (the libraries' INFO stays off: program.run)
    logging.getLogger("distill_sbs").setLevel(logging.INFO)
    api_key = None
    if FLAGS.api_key_env:
        api_key = os.environ.get(FLAGS.api_key_env)
        if not api_key:
            raise UserError(f"--api_key_env names {FLAGS.api_key_env}, which is unset or empty")
    try:
        check_auth_settings(FLAGS.host, api_key, FLAGS.allow_unauthenticated)
    except ValueError as e:
        raise UserError(str(e)) from e
    limits = Limits(**{f.name: getattr(FLAGS, f.name) for f in dataclasses.fields(Limits)})
    _check_port_free(FLAGS.host, FLAGS.port)  # before minutes of loading and compiling
    try:
        generator = ModelGenerator.from_checkpoint(
            FLAGS.checkpoint,
            max_input_length=FLAGS.max_input_length,
            max_batch_size=FLAGS.max_batch_size,
            max_decode_length=limits.max_tokens_limit,
        )
    except OSError as e:  # a missing or unreadable checkpoint (UserError: a corrupt one)
        raise UserError(f"--checkpoint: {e}") from e
    if generator.model.vocabulary is None:  # prompts are text: no vocabulary, no request works
        raise UserError(
            f"{FLAGS.checkpoint}: the checkpoint has no vocabulary (spiece.model, or a "
            "tokenizer.json for a HF folder); serve needs one to read prompts"
        )
    if FLAGS.warmup:
        t0 = time.monotonic()
        n = generator.warmup(limits.max_tokens_limit)
        logger.info("warm-up: %d greedy programs compiled in %.1fs", n, time.monotonic() - t0)
    name = FLAGS.model_name or storage.Path(FLAGS.checkpoint).name
    try:
        server = Server(
            generator,
            host=FLAGS.host,
            port=FLAGS.port,
            model_name=name,
            batch_window_ms=FLAGS.batch_window_ms,
            limits=limits,
            request_log=FLAGS.request_log,
            api_key=api_key,
            allow_unauthenticated=FLAGS.allow_unauthenticated,
            debug_endpoints=FLAGS.debug_endpoints,
            handler_class=handler_class,
        )
    except OSError as e:
        if e.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise
        raise UserError(f"--host {FLAGS.host} --port {FLAGS.port}: {e.strerror}") from e
    # One line that scripts (and tests) wait for before sending requests.
    print(f"serving {name} on {server.base_url}", flush=True)
    server.serve_forever()


def _check_port_free(host: str, port: int) -> None:
    """A busy or forbidden address is one line before the model loads (the server binds again
    later; another process could take the port in between, which that bind reports the same way)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: {e.strerror}") from e
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind(address)
        except OSError as e:
            raise UserError(f"--host {host} --port {port}: {e.strerror}") from e


_LIMIT_HELP = {
    "max_tokens_limit": "Upper bound on max_tokens (larger ones are clipped).",
    "max_sequences_per_request": "Most prompts x n in one request (more: 400).",
    "max_queued_sequences": "Most sequences waiting or running in all (more: 429).",
    "max_body_bytes": "Largest request body (larger: 413).",
    "header_timeout_s": "Seconds a connection has to send a request's headers.",
    "body_timeout_s": "Seconds a request has to send its body (then 408).",
    "keep_alive_s": "Seconds an idle keep-alive connection stays open.",
    "max_connections": "Most open connections and requests together (more: 503).",
}


def define_flags() -> None:
    """The flags of `python -m distill_sbs.serve` (defined by `run`, never at import)."""
    from absl import flags

    flags.DEFINE_string("checkpoint", None, "Native checkpoint, MODEL_DIR or HF T5 folder.")
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
    flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port, printed at start).")
    flags.DEFINE_string("model_name", None, "Model id reported by /v1/models (default: dir name).")
    flags.DEFINE_integer("max_batch_size", 16, "Most rows in one generate call.")
    flags.DEFINE_float("batch_window_ms", 5.0, "How long to gather concurrent requests.")
    flags.DEFINE_integer("max_input_length", 512, "Longest prompt in tokens (longer: a 400).")
    for f in dataclasses.fields(Limits):
        define = flags.DEFINE_integer if f.type == "int" else flags.DEFINE_float
        define(f.name, f.default, _LIMIT_HELP[f.name])
    flags.DEFINE_string("request_log", None, "Append one JSON line per completion request here.")
    flags.DEFINE_string(
        "api_key_env", None, "Require 'Authorization: Bearer $VAR' (the variable's NAME)."
    )
    flags.DEFINE_boolean(
        "allow_unauthenticated", False, "Allow a non-loopback --host without --api_key_env."
    )
    flags.DEFINE_boolean("debug_endpoints", False, "Serve GET /debug/state (behind the key).")
    flags.DEFINE_boolean(
        "warmup", False, "Compile greedy decoding for every batch/length bucket before serving."
    )
    flags.mark_flag_as_required("checkpoint")
