"""One import name, stages layered, no cycles: the package's shape is checked, not hoped for."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("flows", "tasks", "model")
PACKAGE_DIRS = {"alphaloom.flows": "flows", "alphaloom.tasks": "tasks", "alphaloom.model": "model"}
LINT = REPO / "scripts" / "lint_imports.sh"
LINT_ENV = {**os.environ, "PYTHON": sys.executable}


def _module_name(path: Path) -> str:
    relative = path.relative_to(REPO).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["alphaloom", *parts])


def _imports(path: Path) -> set[str]:
    """Every alphaloom module `path` imports, at module level or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("alphaloom.")}


def _source_files() -> list[Path]:
    return sorted(path for layer in LAYERS for path in (REPO / layer).rglob("*.py"))


def test_no_import_cycles() -> None:
    modules = {_module_name(path): path for path in _source_files()}
    graph = {
        name: sorted(_imports(path) & modules.keys() - {name}) for name, path in modules.items()
    }
    # Tarjan's strongly connected components: any component of two or more modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in graph:
        if name not in index:
            visit(name)
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_over_500_lines() -> None:
    long = {
        str(path.relative_to(REPO)): n
        for path in _source_files()
        if (n := len(path.read_text().splitlines())) > 500
    }
    assert not long, f"split these by concern: {long}"


def test_every_package_folder_is_listed_in_pyproject() -> None:
    """pyproject lists packages by hand (the folders are mapped into the namespace): a folder
    missing there would be silently left out of the wheel."""
    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {"alphaloom", "alphaloom.configs"}
    for layer in LAYERS:
        for init in (REPO / layer).rglob("__init__.py"):
            on_disk.add(_module_name(init))
    assert on_disk == listed


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`pip install .` into a bare target folder: exactly what lands in site-packages."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(REPO)],
        check=True, capture_output=True, cwd=target,
    )  # fmt: skip
    return target


def test_install_adds_one_top_level_name(installed: Path) -> None:
    top_level = {path.name for path in installed.iterdir() if not path.name.endswith(".dist-info")}
    assert top_level - {"bin", "__pycache__"} == {"alphaloom"}
    probe = (
        "import importlib.util, alphaloom\n"
        "print(alphaloom.__file__)\n"
        "print([importlib.util.find_spec(n) is None for n in ('tasks', 'model', 'flows')])\n"
        "import importlib.resources as r\n"
        "print(r.files('alphaloom.configs').joinpath('default.yaml').is_file())\n"
    )
    # -S: no site-packages, so only the installed folder can answer (not the editable checkout)
    result = subprocess.run(
        [sys.executable, "-S", "-c", probe],
        env={"PYTHONPATH": str(installed)}, cwd=installed, capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert lines[0].startswith(str(installed))
    assert lines[1:] == ["[True, True, True]", "True"]


def test_import_contracts_hold() -> None:
    result = subprocess.run(
        ["bash", str(LINT)], capture_output=True, text=True, check=False, env=LINT_ENV
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_import_contract_fails_on_mlflow_in_model(tmp_path) -> None:
    """A deliberate `import mlflow` in model/ breaks `make lint` and names the import."""
    copy = tmp_path / "repo"
    copy.mkdir()
    for name in ("alphaloom", "flows", "tasks", "model", "configs", "scripts"):
        if (REPO / name).is_symlink():  # the top-level layers link into alphaloom/
            os.symlink(os.readlink(REPO / name), copy / name)
        else:
            shutil.copytree(REPO / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", ".importlinter"):
        shutil.copy(REPO / name, copy / name)
    network = copy / "model" / "network.py"
    network.write_text(network.read_text() + "\nimport mlflow  # noqa\n")
    result = subprocess.run(
        ["bash", str(copy / "scripts" / "lint_imports.sh")],
        capture_output=True, text=True, check=False, env=LINT_ENV,
    )  # fmt: skip
    assert result.returncode != 0
    assert "alphaloom.model.network -> mlflow" in result.stdout


def _private_imports(path: Path, root: Path = REPO) -> list[str]:
    """`from alphaloom.x import _name` lines of `path`: another module's private names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("alphaloom"):
            found += [
                f"{path.relative_to(root)}:{node.lineno} {node.module}.{alias.name}"
                for alias in node.names
                if alias.name.startswith("_") and not alias.name.startswith("__")
            ]
    return found


def test_no_module_imports_another_modules_private_names() -> None:
    """A leading underscore means "only this module uses it": a name another module needs is
    public (and documented) in the module that owns it."""
    scripts = [
        *sorted((REPO / "benchmarks").glob("*.py")),
        *sorted((REPO / "scripts").glob("*.py")),
    ]
    offenders = [line for path in [*_source_files(), *scripts] for line in _private_imports(path)]
    assert not offenders, "import a public name instead:\n" + "\n".join(offenders)


def test_the_private_import_rule_sees_an_offender(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from alphaloom.tasks.common.hashing import sha256_file\n"
        "def f():\n    from alphaloom.tasks.common.hashing import _parse_imports, __all__\n"
    )
    assert _private_imports(probe, tmp_path) == [
        "probe.py:3 alphaloom.tasks.common.hashing._parse_imports"
    ]
