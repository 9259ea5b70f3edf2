"""absl flags + gin for the entry points (train, eval, infer, compare), T5X style:

    python -m distill_sbs.compare --gin_file=quickstart.gin --gin.TRAIN_STEPS=100 \\
        --gin.MODEL_DIR="'/tmp/x'"

Flags: --gin_file (repeatable), --gin_bindings (repeatable), --gin_search_paths (repeatable), and
the shorthand --gin.KEY=VALUE for --gin_bindings="KEY = VALUE". gin files are found by path, then
under each search path, then in the package's own gin/ directory (the configs travel with the
package); ".gin" may be left out.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import gin
from absl import app, flags

GIN_DIR = Path(__file__).resolve().parent / "gin"

flags.DEFINE_multi_string("gin_file", None, "gin config file(s); see --gin_search_paths.")
flags.DEFINE_multi_string(
    "gin_bindings", [], "gin binding(s), e.g. 'TRAIN_STEPS = 100'; short: --gin.TRAIN_STEPS=100"
)
flags.DEFINE_multi_string(
    "gin_search_paths", [], f"directories searched for gin files (and {GIN_DIR} always)."
)
FLAGS = flags.FLAGS


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
    """argv with each --gin.KEY=VALUE turned into --gin_bindings=KEY = VALUE (absl cannot
    define a flag per gin parameter)."""
    out = []
    for arg in argv:
        if arg.startswith("--gin."):
            key, sep, value = arg[len("--gin.") :].partition("=")
            if not sep:
                raise SystemExit(f"{arg}: expected --gin.KEY=VALUE")
            arg = f"--gin_bindings={key} = {value}"
        out.append(arg)
    return out


def resolve(name: str, search_paths: Sequence[str] = ()) -> str:
    """The absolute path of a gin file: `name` as a path, else under each search path, else under
    the package's gin/ directory (".gin" optional)."""
    names = [name] if name.endswith(".gin") else [name, name + ".gin"]
    for directory in ["", *search_paths, str(GIN_DIR)]:
        for n in names:
            candidate = os.path.join(directory, n)
            if os.path.isfile(candidate):
                return os.path.abspath(candidate)
    looked = ", ".join(["the current directory", *search_paths, str(GIN_DIR)])
    raise SystemExit(f"gin file {name!r} not found (looked in {looked})")


def parse_gin(
    files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = ()
) -> None:
    """Parses gin files and bindings; a typo or a missing file is one clear error line."""
    resolved = [resolve(f, search_paths) for f in files]
    # `include` statements are searched under the same directories and beside each given file.
    for directory in [str(GIN_DIR), *search_paths, *(os.path.dirname(f) for f in resolved)]:
        gin.add_config_file_search_path(directory)
    # gin logs an error for each search-path miss of an `include` before it finds the file.
    quiet = _DropMessages("Path not found:")
    logging.getLogger().addFilter(quiet)
    try:
        gin.parse_config_files_and_bindings(resolved, list(bindings), finalize_config=False)
    except (ValueError, KeyError, NameError, ImportError, OSError) as e:
        raise SystemExit(f"gin configuration error: {e}") from e
    finally:
        logging.getLogger().removeFilter(quiet)


def is_bound(parameter: str) -> bool:
    """Whether the parsed gin config binds `parameter` ("configurable.arg")."""
    try:
        gin.query_parameter(parameter)
        return True
    except ValueError:
        return False


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def import_builtin_tasks() -> None:
    """Registers the built-in datasets (distill_sbs.tasks) so gin and get_dataset can name them."""
    try:
        import distill_sbs.tasks  # noqa: F401
    except ImportError as e:  # the package exists in a normal install; say why it is missing
        print(f"warning: built-in tasks not importable: {e}", file=sys.stderr)


def _setup_and_call(main: Callable[[], object], argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"unknown argument(s): {list(argv[1:])}; use --gin_file and --gin.K=V")
    if not FLAGS.gin_file:
        raise SystemExit("no --gin_file given")
    from distill_sbs.partitioning import maybe_initialize_distributed

    maybe_initialize_distributed()  # must precede any other use of the devices
    # seqio's advice that does not apply here: our sources are in memory (not cached on disk), and
    # the evaluator's fixed lengths are what keep generate to one compiled shape.
    logging.getLogger("absl").addFilter(
        _DropMessages(
            "Using an uncached FunctionDataset",
            "Given sequence lengths are longer than necessary",
            "'logger_cls' is empty",
        )
    )
    import_builtin_tasks()
    parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
    main()


def _parse_flags(argv: Sequence[str]) -> list[str]:
    rest = app.parse_flags_with_usage(rewrite_gin_args(argv))
    # absl raises an unset --verbosity to INFO, which floods stderr with the libraries' (orbax,
    # seqio) progress logs; keep warnings and errors only unless the user asks (--verbosity=0).
    if FLAGS["verbosity"].using_default_value:
        FLAGS.verbosity = -1
    return rest


def run(main: Callable[[], object], argv: Sequence[str] | None = None) -> None:
    """The absl app of an entry point: parses the flags and gin, then calls `main` (a function
    whose arguments gin binds). --help prints the entry point's docstring and the flags."""
    argv = list(sys.argv if argv is None else argv)
    for name in ("gin_file", "gin_bindings", "gin_search_paths"):  # listed by the launcher's --help
        FLAGS.register_key_flag_for_module(argv[0], FLAGS[name])
    app.run(lambda args: _setup_and_call(main, args), argv=argv, flags_parser=_parse_flags)
