"""The module map of docs/architecture.md, enforced. Its layer block ("Modules in layers") is the
one table: LAYERS is read from it. Every module of the package, and of tasks/ (shipped as
distill_sbs.tasks), has one layer, and every module the block lists exists; imports never run to
a higher layer; modules of one layer never import each other in a cycle; no function is over 80
lines without a reason beside it (`# long: <why>` on its `def` line). Each rule is also run on a
small tree that breaks it. Test files are named after the module they test."""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import re
from collections.abc import Collection

import pytest
from _shared_data import REPO

import distill_sbs

PACKAGE = pathlib.Path(distill_sbs.__file__).parent
TASKS = pathlib.Path(importlib.util.find_spec("distill_sbs.tasks").origin).parent
DOC = REPO / "docs" / "architecture.md"
MODULE_COLUMN = 21  # of the layer block: "    6  over runs     sweep.py         grids of runs"
LONG = 80  # lines a function may have without `# long: <why>`


# ---- the layer block --------------------------------------------------------------------------


def _module_of_path(path: str) -> str:
    """`train.py` -> train, `serve/` -> serve (its __init__), `data/records.py` -> data.records,
    `__init__.py` -> "" (the package itself); module names are relative to distill_sbs."""
    if not re.fullmatch(r"(\w+/)*(\w+\.py|\w+/)", path):
        raise ValueError(f"not a module path in the layer block: {path!r}")
    if path == "__init__.py":
        return ""
    return path.removesuffix("/").removesuffix(".py").replace("/", ".")


def read_layers(doc: str) -> list[set[str]]:
    """The modules of each layer, lowest first, from the indented block after "## Modules in
    layers": a number at column 4 opens a layer; a line with text at MODULE_COLUMN lists module
    paths there (one or more, one space apart, ended by two spaces); the rest is prose."""
    section = doc.split("\n## Modules in layers\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(section) if line.startswith("    "))
    end = next(
        (i for i in range(start, len(section)) if section[i] and not section[i].startswith(" ")),
        len(section),
    )
    layers: dict[int, set[str]] = {}
    seen: set[str] = set()
    current = None
    for line in section[start:end]:
        if number := re.match(r" {4}(\d+) ", line):
            current = layers.setdefault(int(number[1]), set())
        entry = line[MODULE_COLUMN:].split("  ")[0]
        if not entry or entry[0] == " " or line[MODULE_COLUMN - 1] != " ":
            continue  # prose
        if current is None:
            raise ValueError(f"{entry} is listed before the first layer's number")
        for path in entry.split(" "):
            module = _module_of_path(path)
            if module in seen:
                raise ValueError(f"{path} is listed twice in the layer block")
            seen.add(module)
            current.add(module)
    if sorted(layers) != list(range(len(layers))):
        raise ValueError(f"the layer block numbers its layers {sorted(layers)}, not 0..N")
    return [layers[i] for i in range(len(layers))]


# ---- the modules and what they import ---------------------------------------------------------


def module_files(roots: dict[str, pathlib.Path]) -> dict[str, pathlib.Path]:
    """Module name (relative to distill_sbs) -> its file, for every .py under each root; a root's
    key is the name of the package it is (distill_sbs itself: "")."""
    out = {}
    for prefix, root in roots.items():
        for path in sorted(root.rglob("*.py")):
            parts = [prefix] * bool(prefix) + list(path.relative_to(root).with_suffix("").parts)
            out[".".join(parts).removesuffix("__init__").rstrip(".")] = path
    return out


def project_imports(path: pathlib.Path, modules: Collection[str]) -> set[str]:
    """The modules (of `modules`) a file imports, at any depth in it: an import inside a function
    counts. `from distill_sbs.data import records` names data.records, `from distill_sbs.data
    import get_dataset` names data (the package that defines the name)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name == "distill_sbs" or name.startswith("distill_sbs."):
                out.add(_enclosing(name.removeprefix("distill_sbs").removeprefix("."), modules))
    return out


def _enclosing(name: str, modules: Collection[str]) -> str:
    """The longest of `modules` that is `name` or holds it (data.registry.X -> data.registry)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


# ---- the rules, each a list of what breaks it -------------------------------------------------


def _layer_of(layers: list[set[str]]) -> dict[str, int]:
    return {module: i for i, layer in enumerate(layers) for module in layer}


def without_layer(files: dict[str, pathlib.Path], layers: list[set[str]]) -> list[str]:
    return sorted(set(files) - set(_layer_of(layers)))


def listed_without_file(files: dict[str, pathlib.Path], layers: list[set[str]]) -> list[str]:
    return sorted(set(_layer_of(layers)) - set(files))


def upward_imports(files: dict[str, pathlib.Path], layers: list[set[str]]) -> list[str]:
    layer = _layer_of(layers)
    return [
        f"{module} (layer {layer[module]}) imports {imported} (layer {layer[imported]})"
        for module, path in files.items()
        if module in layer
        for imported in sorted(project_imports(path, files))
        if layer.get(imported, -1) > layer[module]
    ]


def same_layer_cycles(files: dict[str, pathlib.Path], layers: list[set[str]]) -> list[list[str]]:
    """The groups of modules of one layer that import each other round in a circle (a module
    importing itself, as a program re-importing its package's copy, is no cycle)."""
    layer = _layer_of(layers)
    graph = {
        module: {
            imported
            for imported in project_imports(path, files)
            if imported != module and module in layer and layer.get(imported) == layer[module]
        }
        for module, path in files.items()
    }

    def reachable(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
        return seen

    reach = {module: reachable(module) for module in graph}
    cycles = {
        frozenset({module} | {other for other in reach[module] if module in reach[other]})
        for module in graph
        if module in reach[module]
    }
    return sorted(sorted(cycle) for cycle in cycles)


def long_functions(files: dict[str, pathlib.Path]) -> list[str]:
    out = []
    for module, path in files.items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > LONG and "# long:" not in lines[node.lineno - 1]:
                    out.append(f"{module}:{node.lineno} {node.name} ({length} lines)")
    return out


# ---- the project ------------------------------------------------------------------------------

FILES = module_files({"": PACKAGE, "tasks": TASKS})
LAYERS = read_layers(DOC.read_text())


def test_every_module_has_one_layer_and_every_listed_one_exists():
    unlisted, stale = without_layer(FILES, LAYERS), listed_without_file(FILES, LAYERS)
    assert not unlisted, f"modules missing from docs/architecture.md's layer block: {unlisted}"
    assert not stale, f"docs/architecture.md's layer block lists modules with no file: {stale}"


def test_imports_never_run_upwards():
    upward = upward_imports(FILES, LAYERS)
    assert not upward, "\n".join(upward)


def test_modules_of_one_layer_import_each_other_without_cycles():
    cycles = same_layer_cycles(FILES, LAYERS)
    assert not cycles, f"modules of one layer that import each other round in a circle: {cycles}"


def test_no_long_functions_without_a_reason():
    long = long_functions(FILES)
    assert not long, f"functions over {LONG} lines without `# long: <why>`:\n" + "\n".join(long)


def _row(layer: str, paths: str, text: str) -> str:
    return f"    {layer:<{MODULE_COLUMN - 4}}{paths:<17}{text}"


def test_each_rule_fails_on_a_tree_that_breaks_it(tmp_path):
    doc = "\n".join([
        "# A map", "", "## Modules in layers", "", "Prose.", "",
        _row("1  top", "high.py", "imports low (downwards)"),
        _row("", "a.py b.py", "a imports b, b imports a in a function: a cycle"),
        _row("", "", "(prose carried over)"),
        _row("0  bottom", "low.py", "imports high: upwards"),
        _row("", "long.py", f"a function of {LONG + 1} lines, another with a reason"),
        _row("", "ghost.py", "listed, no file"),
        "", "## Next", "    not.py the layer block",
    ])  # fmt: skip
    body = "".join(f"    x = {i}\n" for i in range(LONG))
    for name, text in {
        "__init__.py": "",
        "high.py": "from distill_sbs import low\n",
        "a.py": "import distill_sbs.b\n",
        "b.py": "def f():\n    from distill_sbs import a\n",
        "low.py": "from distill_sbs.high import something\n",
        "long.py": f"def f():\n{body}\n\ndef g():  # long: a table\n{body}",
        "orphan.py": "",
    }.items():
        (tmp_path / name).write_text(text)
    layers = read_layers(doc)
    assert layers == [{"low", "long", "ghost"}, {"high", "a", "b"}]
    files = module_files({"": tmp_path})
    assert without_layer(files, layers) == ["", "orphan"]
    assert listed_without_file(files, layers) == ["ghost"]
    assert upward_imports(files, layers) == ["low (layer 0) imports high (layer 1)"]
    assert same_layer_cycles(files, layers) == [["a", "b"]]
    assert long_functions(files) == [f"long:1 f ({LONG + 1} lines)"]
    with pytest.raises(ValueError, match="a.py is listed twice"):
        read_layers(doc.replace("low.py ", "a.py   "))
    with pytest.raises(ValueError, match="not a module path"):
        read_layers(doc.replace("low.py ", "low.txt"))


def test_every_module_imports_beside_every_other(subprocess_env):
    """All modules in one fresh process: entry points define their absl flags only when run as
    programs, so no two clash (annotate and annotate_topk both have --teacher) and a library
    user or a test can import any pair."""
    import subprocess
    import sys

    modules = sorted(
        f"distill_sbs.{module}".rstrip(".") for module in FILES if not module.endswith("__main__")
    )
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    out = subprocess.run(
        [sys.executable, "-c", code, *modules],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]


# ---- test files named after what they test ----------------------------------------------------

# Tests of behaviour across the system rather than of one module, and what each covers.
SYSTEM_TESTS = {
    "architecture": "this map (docs/architecture.md)",
    "lint": "ruff over the repository",
    "quickstart": "the README's command, end to end",
    "multihost": "training over several processes joined by jax.distributed",
    "sharding": "the sharded forward pass and decoding on a device mesh",
    "resume": "a killed run resumed equals an uninterrupted one",
    "gcs": "gs:// through every reader and writer",
    "user_errors": "one-line user errors in every program (issue 9)",
    "benchmarks": "benchmarks/ scripts and the train step on a host without TensorFlow",
}


def _named_module(name: str) -> str | None:
    """The module a test's name (test_<module>[_<aspect>].py, dots as _) names; the longest."""
    named = [m for m in FILES if m and (name + "_").startswith(m.replace(".", "_") + "_")]
    return max(named, key=len, default=None)


def _defines(path: pathlib.Path) -> set[str]:
    """Names a module defines at its top level (functions, classes, assignments)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            out.update(t.id for t in targets if isinstance(t, ast.Name))
    return out


def _tested_modules(path: pathlib.Path) -> set[str]:
    """The modules a test file reaches: those it imports (a name imported from a package counts
    for the module of the package that defines it), those it runs or loads by name
    (`distill_sbs.<module>` or `distill_sbs/<path>.py` in its text: `python -m`, a gin import), and
    those the imported ones import (a module tested through its caller)."""
    imported = project_imports(path, FILES)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("distill_sbs."):
            names, package = {a.name for a in node.names}, node.module[len("distill_sbs.") :]
            imported |= {
                module
                for module, file in FILES.items()
                if module.startswith(package + ".") and names & _defines(file)
            }
    named = re.findall(r"distill_sbs[./]([\w./]*\w)", path.read_text())
    runs = {_enclosing(n.removesuffix(".py").replace("/", "."), FILES) for n in named} - {""}
    return imported | runs | {m for i in imported for m in project_imports(FILES[i], FILES)}


def test_test_files_are_named_after_the_module_they_test():
    """test_<module>[_<aspect>].py reaches that module or a module of that package (see
    _tested_modules); a test of the whole system is listed in SYSTEM_TESTS instead. A test named
    after a module that was renamed or removed, or after one it does not test, fails here."""
    wrong = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        name = path.stem.removeprefix("test_")
        if any((name + "_").startswith(system + "_") for system in SYSTEM_TESTS):
            continue
        module = _named_module(name)
        if module is None:
            wrong.append(f"{path.name}: names no module of distill_sbs")
        elif not any(m == module or m.startswith(module + ".") for m in _tested_modules(path)):
            wrong.append(f"{path.name}: named after {module}, which it does not reach")
    wrong += [
        f"SYSTEM_TESTS names {s}, but there is no tests/test_{s}*.py"
        for s in SYSTEM_TESTS
        if not list((REPO / "tests").glob(f"test_{s}*.py"))
    ]
    assert not wrong, "\n".join(wrong)
