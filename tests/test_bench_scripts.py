"""`make bench` runs every benchmarks/*.py without arguments: check each one can (not running it).

Each script must parse, must not import from `tests` (the test helpers are not part of what a
benchmark measures, and `tests` is no package on a user's path), and must expose
`build_parser()` whose parser accepts an empty command line, with `main(argv=None)` using it.
The parser is built for real, but the script's module code runs with every non-stdlib import
stubbed (torch, mlflow, the package itself, sibling scripts), so the whole check takes well
under a second; the benchmarks themselves never run here.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(BENCH_DIR.glob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imported_modules(tree: ast.Module) -> list[str]:
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def _top_level_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
    return names


def _run_stubbed(path: Path) -> dict[str, Any]:
    """Execute the script's module code (not its __main__ block) with non-stdlib imports
    replaced by mocks; return its namespace."""
    real_import = builtins.__import__

    def fake_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name.partition(".")[0] in sys.stdlib_module_names:
            return real_import(name, globals, locals, fromlist, level)
        return mock.MagicMock(name=name)

    namespace: dict[str, Any] = {
        "__name__": f"benchmark_{path.stem}",
        "__file__": str(path),
        "__builtins__": {**vars(builtins), "__import__": fake_import},
    }
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    return namespace


def test_every_script_is_found() -> None:
    assert len(SCRIPTS) >= 9, SCRIPTS


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_does_not_import_tests(path: Path) -> None:
    imported = _imported_modules(_tree(path))
    from_tests = [name for name in imported if name.partition(".")[0] == "tests"]
    assert not from_tests, f"{path.name} imports {from_tests}: benchmarks must not use tests/"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_sibling_imports_exist(path: Path) -> None:
    """`from loader import ...` style imports name a script here that defines those names."""
    for node in ast.walk(_tree(path)):
        if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
            continue
        sibling = BENCH_DIR / f"{node.module}.py"
        if not sibling.exists():
            continue
        defined = _top_level_names(_tree(sibling))
        missing = [alias.name for alias in node.names if alias.name not in defined]
        assert not missing, f"{path.name}: {node.module}.py defines no {missing}"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_runs_with_no_arguments(path: Path) -> None:
    tree = _tree(path)
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert "build_parser" in functions, f"{path.name} has no build_parser()"
    main = functions.get("main")
    assert main is not None, f"{path.name} has no main()"
    params = main.args.args
    assert len(main.args.defaults) == len(params), f"{path.name}: main() needs arguments"
    calls = {
        node.func.id
        for node in ast.walk(main)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert "build_parser" in calls, f"{path.name}: main() does not use build_parser()"
    guard = [
        node
        for node in tree.body
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
    ]
    assert guard, f"{path.name} has no `if __name__ == '__main__':` block"

    namespace = _run_stubbed(path)
    parser = namespace["build_parser"]()
    assert isinstance(parser, argparse.ArgumentParser)
    try:
        parser.parse_args([])
    except SystemExit as err:  # argparse exits on a missing required option or positional
        pytest.fail(f"{path.name}: its parser rejects an empty command line (exit {err.code})")
