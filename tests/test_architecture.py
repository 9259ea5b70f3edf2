"""The module map of docs/architecture.md, enforced: imports run from higher layers to lower ones
only, every module of the package has a layer, and no function is over 80 lines without a reason
written beside it (`# long: <why>` on its `def` line)."""

from __future__ import annotations

import ast
import pathlib

import distill_sbs

PACKAGE = pathlib.Path(distill_sbs.__file__).parent

# Lowest first. A module may import modules of its own layer or of lower layers (never higher).
LAYERS: list[set[str]] = [
    # 0: leaves (no project imports beyond this layer)
    {
        "parsing",
        "network",
        "flops",
        "losses",
        "partitioning",
        "optimizers",
        "errors",
        "cpu_host",
        "program",
        "storage",
        "data.records",
        "data.options",
        "data.feature_converter",
    },
    # 1: built on the leaves
    {
        "decoding",
        "metrics",
        "checkpoints",
        "data.vocab",
        "data.arith",
        "data.dss",
        "data.preprocessors",
        "data.methods",
        "data.topk",
    },
    # 2: the model and its conversion
    {"convert", "t5x_checkpoint", "models", "data.build_assets"},
    # 3: what runs a model: batched generation, compiled steps, the data layer's registry
    {"generation", "trainer", "data.registry", "data", "distillation"},
    # 4: libraries over models and data
    {
        "teachers",
        "teachers.backends",
        "teachers.cache",
        "teachers.exemplars",
        "teachers.local",
        "teachers.pipeline",
        "teachers.prompts",
        "teachers.topk",
        "evaluation",
        "inference",
        "training",
        "paper",
        "sweep_report",
        "memory",
        "serve.protocol",
        "serve.engine",
    },
    # 5: applications
    {
        "comparison",
        "serve",
        "serve.app",
        "serve.server",
        "serve.cli",
        "serve.__main__",
        "annotate",
        "annotate_topk",
        "tasks",
        "data.report",
        "",
    },
    # 6: command-line plumbing and launchers (`python -m distill_sbs.X`)
    {
        "cli",
        "train",
        "eval",
        "infer",
        "compare",
        "sweep",
        "launch",
        "launch.local",
        "launch.tpu_vm",
        "launch.gpu",
        "memory_plan",
    },
]


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _project_imports(path: pathlib.Path) -> set[str]:
    """Modules of distill_sbs (relative names) imported by a file, at any depth in it."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from distill_sbs.data import records` names the module data.records.
            names = [
                f"{node.module}.{a.name}" if _is_module(f"{node.module}.{a.name}") else node.module
                for a in node.names
            ]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name == "distill_sbs" or name.startswith("distill_sbs."):
                out.add(name.removeprefix("distill_sbs").removeprefix("."))
    return out


def _is_module(dotted: str) -> bool:
    path = PACKAGE.joinpath(*dotted.split(".")[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _layer_of(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if module in layer:
            return i
    # A name imported from a package (e.g. `from distill_sbs.data import get_dataset`).
    parent = module.rpartition(".")[0]
    if parent or module:
        for i, layer in enumerate(LAYERS):
            if parent in layer:
                return i
    raise KeyError(module)


def _package_files() -> list[pathlib.Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "gin" not in p.relative_to(PACKAGE).parts)


def test_every_module_has_a_layer():
    missing = [_module_name(p) for p in _package_files() if not _has_layer(_module_name(p))]
    assert not missing, f"add these modules to LAYERS (and docs/architecture.md): {missing}"


def _has_layer(module: str) -> bool:
    return any(module in layer for layer in LAYERS)


def test_imports_never_run_upwards():
    upward = []
    for path in _package_files():
        module = _module_name(path)
        own = _layer_of(module)
        for imported in _project_imports(path):
            if _layer_of(imported) > own:
                upward.append(f"{module} (layer {own}) imports {imported} ({_layer_of(imported)})")
    assert not upward, "\n".join(upward)


def test_layer_check_catches_an_upward_import(tmp_path):
    # The checker itself: training (layer 4) imported from a leaf would be reported.
    leaf = tmp_path / "leaf.py"
    leaf.write_text("def f():\n    from distill_sbs import training\n")
    assert _project_imports(leaf) == {"training"}
    assert _layer_of("training") > _layer_of("parsing")


def test_no_long_functions_without_a_reason():
    long = []
    for path in _package_files():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > 80 and "# long:" not in lines[node.lineno - 1]:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({length})")
    assert not long, "functions over 80 lines without `# long: <why>`:\n" + "\n".join(long)


def test_every_module_imports_beside_every_other(subprocess_env):
    """All modules in one fresh process: entry points define their absl flags only when run as
    programs, so no two clash (annotate and annotate_topk both have --teacher) and a library
    user or a test can import any pair."""
    import subprocess
    import sys

    modules = sorted(
        "distill_sbs." + _module_name(p) if _module_name(p) else "distill_sbs"
        for p in _package_files()
        if p.stem != "__main__"
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
