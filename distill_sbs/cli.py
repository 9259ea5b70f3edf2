"""gin for the programs it configures (train, eval, infer, compare, sweep, memory_plan), T5X style:

    python -m distill_sbs.compare --gin_file=quickstart.gin --gin.TRAIN_STEPS=100 \\
        --gin.MODEL_DIR="'/tmp/x'"

Flags: --gin_file (repeatable), --gin_bindings (repeatable), --gin_search_paths (repeatable, or
comma-separated as in T5X), and the shorthand --gin.KEY=VALUE for --gin_bindings="KEY = VALUE".
gin files are found by path, then under each search path, then in the package's own gin/
directory (the configs travel with the package); ".gin" may be left out.

`run` is program.run (CPU host set-up, flags defined only when run, a user error as one line
`error: ...` and exit status 2) with the gin flags added; a gin error is a user error, and so is
a macro bound but never referenced (`--gin.TRAIN_STPES=2`).
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
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import gin
from absl import flags

from distill_sbs import program
from distill_sbs.errors import UserError
from distill_sbs.program import call_reporting_user_errors, one_line

GIN_DIR = Path(__file__).resolve().parent / "gin"
# Macros of T5X's run configs that a config may bind without this package referencing them.
T5X_MACROS = ("MIXTURE_OR_TASK_MODULE", "USE_CACHED_TASKS")

FLAGS = flags.FLAGS


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
    """argv with each --gin.KEY=VALUE turned into --gin_bindings=KEY = VALUE (absl cannot
    define a flag per gin parameter)."""
    out = []
    for arg in argv:
        if arg.startswith("--gin."):
            key, sep, value = arg[len("--gin.") :].partition("=")
            if not sep:
                raise UserError(f"{arg}: expected --gin.KEY=VALUE")
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
    except SyntaxError as e:  # gin's parser: a value that is not a Python literal, a bad line
        raise UserError(_gin_syntax_message(e)) from e
    except (ValueError, KeyError, NameError, ImportError, OSError, TypeError) as e:
        raise UserError(f"gin configuration error: {one_line(e)}") from e
    finally:
        logging.getLogger().removeFilter(quiet)
    user_text = [b for b in bindings] + [
        Path(f).read_text(encoding="utf-8", errors="replace")
        for f in resolved
        if not Path(f).is_relative_to(GIN_DIR)
    ]
    check_macros(_macros_assigned(user_text))


def _gin_syntax_message(error: SyntaxError) -> str:
    """One line for gin's SyntaxError: where, the offending line, and the likeliest fix (a string
    value given without its inner quotes, as the shell strips the outer ones)."""
    line = (error.text or "").strip()
    where = "a --gin binding" if error.filename in (None, "<string>") else error.filename
    if error.filename not in (None, "<string>") and error.lineno:
        where += f":{error.lineno}"
    message = f"gin syntax error in {where}: {line!r}"
    name, sep, value = line.partition("=")
    value = value.strip()
    if sep and value.replace("_", "").replace("-", "").replace("/", "").isalnum():
        message += (
            f" ({value} is not a Python value; a string needs quotes inside the shell's: "
            f"--gin.{name.strip()}=\"'{value}'\")"
        )
    return message


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


_MACRO_ASSIGNMENT = re.compile(r"^\s*([A-Za-z_][\w/]*)\s*=", re.MULTILINE)


def _macros_assigned(texts: Sequence[str]) -> set[str]:
    """Macro names assigned (`NAME = ...`, no dot: not a parameter) in gin text."""
    return {m for text in texts for m in _MACRO_ASSIGNMENT.findall(text)}


def check_macros(candidates: set[str] | None = None) -> None:
    """A macro that nothing references is a typo (gin itself ignores it): a UserError.

    candidates: the macros the user assigned (command-line bindings, their own gin files); a macro
    of the package's gin files that a user's parameter binding overrides is not an error."""
    used = referenced_macros()
    bound = bound_macros() if candidates is None else bound_macros() & candidates
    unused = sorted(bound - used - set(T5X_MACROS))
    if unused:
        hints = []
        for name in unused:
            close = difflib.get_close_matches(name, sorted(used), n=1)
            hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
        raise UserError(
            f"gin macro {', '.join(hints)} is bound but the config never uses it; "
            "bind one of the config's macros or a configurable's parameter"
        )


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


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """The gin flags (--gin_file, --gin_bindings, --gin_search_paths) and T5X's --tfds_data_dir,
    defined by `run` (importing cli defines none)."""
    if "gin_file" in flag_values:  # run twice in one process (a test)
        return
    fv = {"flag_values": flag_values}
    flags.DEFINE_multi_string("gin_file", None, "gin config file(s); see --gin_search_paths.", **fv)
    flags.DEFINE_multi_string(
        "gin_bindings",
        [],
        "gin binding(s), e.g. 'TRAIN_STEPS = 100'; short: --gin.TRAIN_STEPS=100",
        **fv,
    )
    flags.DEFINE_multi_string(
        "gin_search_paths",
        [],
        f"directories searched for gin files (and {GIN_DIR} always); repeatable or "
        "comma-separated.",
        **fv,
    )
    flags.DEFINE_string(
        "tfds_data_dir",
        None,
        "as in T5X: the directory of TensorFlow Datasets' prepared data.",
        **fv,
    )


def _setup_and_call(main: Callable[[], object]) -> None:
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


def run(
    main: Callable[[], object],
    define_program_flags: Callable[[], object] | None = None,
    argv: Sequence[str] | None = None,
) -> None:
    """A program configured by gin, under program.run's contract: defines the gin flags (and
    the program's own, `define_program_flags`), parses the flags and gin, then calls `main` (a
    function whose arguments gin binds). --help prints the program's docstring and the flags."""

    def define() -> None:
        define_flags()
        if define_program_flags is not None:
            define_program_flags()

    args = call_reporting_user_errors(lambda: rewrite_gin_args(sys.argv if argv is None else argv))
    program.run(lambda: _setup_and_call(main), define, argv=args)
