"""The one contract of every program (`python -m distill_sbs.<name>`):

    def define_flags() -> None: ...          # the program's absl flags
    def main() -> None: ...                  # reads them; raises errors.UserError on bad input
    if __name__ == "__main__":
        program.run(main, define_flags)

`run` sets up the CPU host (cpu_host.prepare, before JAX starts its threads), defines the
program's flags (a module defines none at import, so that any two modules import side by side
and a library user's flags never clash with ours), parses them and calls `main`. A user error
prints one line `error: <what and how to fix it>` on stderr and exits with status 2: an
errors.UserError, a missing or unreadable file, a bad flag (unknown, ill-typed, required but
absent) or an unexpected argument. --debug (or DISTILL_SBS_DEBUG=1) prints the traceback first.

The programs configured by gin (train, eval, infer, compare, sweep, memory_plan) go through
cli.run, which adds the gin flags and gin parsing on top of this.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence

from absl import app, flags

from distill_sbs import cpu_host
from distill_sbs.errors import DEBUG_ENV, EXIT_CODE, UserError

FLAGS = flags.FLAGS

# Errors of the user's making that libraries raise as the standard library's types.
USER_ERRORS = (
    UserError,
    app.UsageError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


def one_line(error: BaseException) -> str:
    """An exception's message on one line, without gin's "In call to configurable" notes."""
    text = str(error).split("\n  In call to configurable")[0]
    if isinstance(error, KeyError) and len(error.args) == 1:
        text = str(error.args[0])
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def debug_enabled() -> bool:
    """--debug, or DISTILL_SBS_DEBUG set to anything but "" or "0"."""
    flag = FLAGS["debug"].value if "debug" in FLAGS and FLAGS.is_parsed() else False
    return bool(flag) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _exit_with(error: BaseException) -> None:
    print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_CODE) from None


def call_reporting_user_errors(fn: Callable[[], object]) -> object:
    """Calls fn; a user error becomes `error: <message>` on stderr and exit status 2 (the
    traceback as well with --debug)."""
    try:
        return fn()
    except USER_ERRORS as e:
        if debug_enabled():
            traceback.print_exc()
        _exit_with(e)


def _parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's parse, with a bad flag reported as a user error (absl: several lines, status 1)."""
    try:
        rest = FLAGS(list(argv))
    except flags.Error as e:
        _exit_with(UserError(f"{one_line(e)} (see --help)"))
        raise  # unreachable: _exit_with raises
    # absl raises an unset --verbosity to INFO right after this parse, which floods stderr with
    # the libraries' (orbax, seqio) progress logs; keep warnings and errors only unless the user
    # asks (--verbosity=0). Set here: once absl has raised it, the flag no longer looks unset.
    if FLAGS["verbosity"].using_default_value:
        FLAGS.verbosity = -1
    return rest


def _new_flags(define_flags: Callable[[], object] | None) -> list[str]:
    """Defines --debug and the program's flags; returns the names defined now."""
    before = set(FLAGS)
    if "debug" not in FLAGS:
        help_ = f"show the traceback of a user error (also {DEBUG_ENV}=1)."
        flags.DEFINE_bool("debug", False, help_)
    if define_flags is not None:
        define_flags()
    return sorted(set(FLAGS) - before)


def run(
    main: Callable[..., object],
    define_flags: Callable[[], object] | None = None,
    *,
    arguments: bool = False,
    argv: Sequence[str] | None = None,
) -> None:
    """Runs a program under the contract above. `main()` takes no arguments, or with
    `arguments=True` the list of positional arguments (a command, say); its return value is the
    exit status (None: 0)."""
    cpu_host.prepare()  # before JAX starts its threads or creates its backend
    argv = list(sys.argv if argv is None else argv)
    for name in _new_flags(define_flags):  # listed by the program's --help, wherever defined
        FLAGS.register_key_flag_for_module(argv[0], FLAGS[name])

    def checked(args: list[str]) -> object:
        if arguments:
            return main(args[1:])
        if len(args) > 1:
            raise UserError(
                f"unexpected argument(s) {args[1:]}: give flags as --name=value (see --help)"
            )
        return main()

    app.run(
        lambda args: call_reporting_user_errors(lambda: checked(args)),
        argv=argv,
        flags_parser=_parse_flags,
    )
