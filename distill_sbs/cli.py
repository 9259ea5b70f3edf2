"""Shared gin/absl plumbing of the entry points (train, eval, infer), T5X style:

    python -m distill_sbs.train --gin_file=quickstart.gin --gin.TRAIN_STEPS=100 \
        --gin.MODEL_DIR="'/tmp/x'"

gin files are found by path, or by name relative to the project's gin/ directory; `--gin.KEY=VALUE`
and `--gin_bindings=...` are bindings applied after the files.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import distill_sbs
import gin

GIN_DIR = Path(distill_sbs.__file__).resolve().parent / "gin"


def resolve_gin_file(name: str) -> str:
    """A gin file by path, else relative to the project's gin/ directory (".gin" optional)."""
    candidates = [name, str(GIN_DIR / name)]
    if not name.endswith(".gin"):
        candidates += [name + ".gin", str(GIN_DIR / (name + ".gin"))]
    for c in candidates:
        if os.path.isfile(c):
            return os.path.abspath(c)
    raise FileNotFoundError(
        f"gin file {name!r} not found (looked in the current directory and in {GIN_DIR})"
    )


def split_gin_args(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """(gin files, gin bindings, remaining argv) from T5X-style flags.

    Accepts --gin_file=F (repeatable, or comma-separated), --gin_bindings=B (repeatable), and the
    shorthand --gin.KEY=VALUE for the binding `KEY = VALUE`.
    """
    files: list[str] = []
    bindings: list[str] = []
    rest: list[str] = []
    it = iter(argv)

    def value(arg: str, prefix: str) -> str:
        if arg.startswith(prefix + "="):
            return arg[len(prefix) + 1 :]
        try:
            return next(it)
        except StopIteration:
            raise SystemExit(f"flag {prefix} needs a value") from None

    for arg in it:
        if arg.startswith("--gin_file") or arg.startswith("--gin_files"):
            prefix = "--gin_files" if arg.startswith("--gin_files") else "--gin_file"
            files += [f for f in value(arg, prefix).split(",") if f]
        elif arg.startswith("--gin_bindings") or arg.startswith("--gin_param"):
            prefix = "--gin_bindings" if arg.startswith("--gin_bindings") else "--gin_param"
            bindings.append(value(arg, prefix))
        elif arg.startswith("--gin."):
            key, sep, val = arg[len("--gin.") :].partition("=")
            if not sep:
                raise SystemExit(f"{arg}: expected --gin.KEY=VALUE")
            bindings.append(f"{key} = {val}")
        else:
            rest.append(arg)
    return files, bindings, rest


def parse_gin(files: Sequence[str], bindings: Sequence[str]) -> None:
    """Parses gin files (searched also under gin/) and bindings, with a clear error on a typo."""
    gin.add_config_file_search_path(str(GIN_DIR))
    resolved = [resolve_gin_file(f) for f in files]
    for f in resolved:
        gin.add_config_file_search_path(os.path.dirname(f))
    # gin logs an error for each search-path miss of an `include` before it finds the file.
    quiet = _DropMessages("Path not found:")
    logging.getLogger().addFilter(quiet)
    try:
        gin.parse_config_files_and_bindings(resolved, list(bindings), finalize_config=False)
    except (ValueError, KeyError, NameError, ImportError) as e:
        raise SystemExit(f"gin configuration error: {e}") from e
    finally:
        logging.getLogger().removeFilter(quiet)


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


def run(main: Callable[[], object], argv: Sequence[str] | None = None) -> None:
    """Parses gin flags, then calls `main` (a gin-configurable function with all its arguments
    bound by gin)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        raise SystemExit(0)
    files, bindings, rest = split_gin_args(argv)
    if rest:
        raise SystemExit(f"unknown argument(s): {rest}; use --gin_file=... and --gin.KEY=VALUE")
    if not files:
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
    parse_gin(files, bindings)
    main()
