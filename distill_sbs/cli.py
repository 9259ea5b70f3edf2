"""absl flags + gin for the entry points (train, eval, infer, compare), T5X style:

    python -m distill_sbs.compare --gin_file=quickstart.gin --gin.TRAIN_STEPS=100 \\
        --gin.MODEL_DIR="'/tmp/x'"

Flags: --gin_file (repeatable), --gin_bindings (repeatable), --gin_search_paths (repeatable, or
comma-separated as in T5X), and the shorthand --gin.KEY=VALUE for --gin_bindings="KEY = VALUE".
gin files are found by path, then under each search path, then in the package's own gin/
directory (the configs travel with the package); ".gin" may be left out.

One error path: a user error (errors.UserError, a gin error, a missing file) prints one line
`error: <what and how to fix it>` and exits 2; --debug (or DISTILL_SBS_DEBUG=1) shows the
traceback instead. A macro bound but never referenced (`--gin.TRAIN_STPES=2`) is an error.
T5X habits: its logging flags (absl's), --tfds_data_dir, MIXTURE_OR_TASK_MODULE (imported
after parsing, to register the task) and USE_CACHED_TASKS (accepted; our tasks are built in
memory) work as there.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import gin
from absl import app, flags

from distill_sbs import cpu_host
from distill_sbs.errors import DEBUG_ENV, EXIT_CODE, UserError

GIN_DIR = Path(__file__).resolve().parent / "gin"
# Macros of T5X's run configs that a config may bind without this package referencing them.
T5X_MACROS = ("MIXTURE_OR_TASK_MODULE", "USE_CACHED_TASKS")

flags.DEFINE_multi_string("gin_file", None, "gin config file(s); see --gin_search_paths.")
flags.DEFINE_multi_string(
    "gin_bindings", [], "gin binding(s), e.g. 'TRAIN_STEPS = 100'; short: --gin.TRAIN_STEPS=100"
)
flags.DEFINE_multi_string(
    "gin_search_paths",
    [],
    f"directories searched for gin files (and {GIN_DIR} always); repeatable or comma-separated.",
)
flags.DEFINE_bool("debug", False, f"show the traceback of a user error (also {DEBUG_ENV}=1).")
flags.DEFINE_string(
    "tfds_data_dir", None, "as in T5X: the directory of TensorFlow Datasets' prepared data."
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


def search_paths(values: Sequence[str]) -> list[str]:
    """--gin_search_paths values, each possibly a comma-separated list (T5X's form)."""
    return [p for v in values for p in v.split(",") if p]


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
    raise UserError(
        f"gin file {name!r} not found (looked in {looked}); give its path or --gin_search_paths"
    )


def parse_gin(
    files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = ()
) -> None:
    """Parses gin files and bindings; a typo, a missing file or a macro that nothing references
    is a UserError (one line)."""
    resolved = [resolve(f, search_paths) for f in files]
    # `include` statements are searched under the same directories and beside each given file.
    for directory in [str(GIN_DIR), *search_paths, *(os.path.dirname(f) for f in resolved)]:
        gin.add_config_file_search_path(directory)
    # gin logs an error for each search-path miss of an `include` before it finds the file.
    quiet = _DropMessages("Path not found:")
    logging.getLogger().addFilter(quiet)
    try:
        with _safe_package_lookup():
            gin.parse_config_files_and_bindings(resolved, list(bindings), finalize_config=False)
    except (ValueError, KeyError, NameError, ImportError, OSError, TypeError) as e:
        raise UserError(f"gin configuration error: {one_line(e)}") from e
    finally:
        logging.getLogger().removeFilter(quiet)
    check_macros()


@contextlib.contextmanager
def _safe_package_lookup() -> Iterator[None]:
    """gin also looks an `include 'runs/train.gin'` up as a file of a Python package `runs`; a
    plain folder `runs/` in the working directory is a namespace package without a file, on
    which gin's lookup raises TypeError. Such a folder only means "no such package" here."""
    from gin import config as gin_config

    readers = list(gin_config._FILE_READERS)

    def guarded(check: Callable[[str], bool]) -> Callable[[str], bool]:
        def exists(path: str) -> bool:
            try:
                return check(path)
            except TypeError:
                return False

        return exists

    gin_config._FILE_READERS[:] = [(r, guarded(c)) for r, c in readers]
    try:
        yield
    finally:
        gin_config._FILE_READERS[:] = readers


def bound_macros() -> set[str]:
    """Names of the macros the parsed config binds (`NAME = value`)."""
    from gin import config as gin_config

    return {scope for scope, name in gin_config._CONFIG if name == "gin.macro" and scope}


def referenced_macros() -> set[str]:
    """Names of the macros referenced (`%NAME`) anywhere in the parsed config."""
    from gin import config as gin_config

    found: set[str] = set()
    stack = [v for params in gin_config._CONFIG.values() for v in params.values()]
    while stack:
        value = stack.pop()
        if isinstance(value, gin_config.ConfigurableReference):
            if value.configurable.selector == "gin.macro":
                found.add("/".join(value.scopes))
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list | tuple | set):
            stack.extend(value)
    return found


def check_macros() -> None:
    """A macro that nothing references is a typo (gin itself ignores it): a UserError."""
    used = referenced_macros()
    unused = sorted(bound_macros() - used - set(T5X_MACROS))
    if unused:
        hints = []
        for name in unused:
            close = difflib.get_close_matches(name, sorted(used), n=1)
            hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
        raise UserError(
            f"gin macro {', '.join(hints)} is bound but the config never uses it; "
            "bind one of the config's macros or a configurable's parameter"
        )


def one_line(error: BaseException) -> str:
    """An exception's message on one line, without gin's "In call to configurable" notes."""
    text = str(error).split("\n  In call to configurable")[0]
    if isinstance(error, KeyError) and len(error.args) == 1:
        text = str(error.args[0])
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def is_bound(parameter: str) -> bool:
    """Whether the parsed gin config binds `parameter` ("configurable.arg" or "%MACRO")."""
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


def import_task_module() -> None:
    """Imports the module that MIXTURE_OR_TASK_MODULE names (T5X: it registers the task)."""
    if not is_bound("%MIXTURE_OR_TASK_MODULE"):
        return
    module = gin.query_parameter("%MIXTURE_OR_TASK_MODULE")
    if not module:
        return
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"MIXTURE_OR_TASK_MODULE={module!r} cannot be imported: {e}") from e


# Errors of the user's making that libraries raise as the standard library's types.
_USER_ERRORS = (
    UserError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


def debug_enabled() -> bool:
    """--debug, or DISTILL_SBS_DEBUG set to anything but "" or "0"."""
    flag = FLAGS["debug"].value if FLAGS.is_parsed() else False
    return bool(flag) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def call_reporting_user_errors(fn: Callable[[], object]) -> object:
    """Calls fn; a user error becomes `error: <message>` on stderr and exit status 2 (the
    traceback as well with --debug). Used by every entry point's main."""
    try:
        return fn()
    except _USER_ERRORS as e:
        if debug_enabled():
            traceback.print_exc()
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CODE) from None


def _setup_and_call(main: Callable[[], object], argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unknown argument(s): {list(argv[1:])}; use --gin_file and --gin.K=V")
    if not FLAGS.gin_file:
        raise UserError("no --gin_file given (e.g. --gin_file=runs/train.gin)")
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
    if FLAGS.tfds_data_dir:
        import seqio

        seqio.set_tfds_data_dir_override(FLAGS.tfds_data_dir)
    import_builtin_tasks()
    parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, search_paths(FLAGS.gin_search_paths))
    import_task_module()
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
    cpu_host.prepare()  # before JAX starts its threads or creates its backend
    argv = list(sys.argv if argv is None else argv)
    # listed by the launcher's --help
    for name in ("gin_file", "gin_bindings", "gin_search_paths", "debug"):
        FLAGS.register_key_flag_for_module(argv[0], FLAGS[name])
    app.run(
        lambda args: call_reporting_user_errors(lambda: _setup_and_call(main, args)),
        argv=argv,
        flags_parser=_parse_flags,
    )
