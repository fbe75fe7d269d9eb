"""The checkout is the package: static tools resolve `alphaloom.*` to the source tree.

The code lives in `alphaloom/{flows,tasks,model,configs}`; the design's top-level `flows/`,
`tasks/`, `model/` and `configs/` are relative symlinks to them (CONTRIBUTING.md says why), so an
editor's go-to-definition, import-linter, a structure drawing and `python -c "import
alphaloom..."` from the repository root all find the code without the installed package's hook,
and every path the docs name (tasks/common/config.py, ...) opens the same file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("flows", "tasks", "model", "configs")


@pytest.mark.parametrize("layer", LAYERS)
def test_each_top_level_layer_links_into_the_package(layer: str) -> None:
    link, package = REPO / layer, REPO / "alphaloom" / layer
    assert package.is_dir() and not package.is_symlink(), f"alphaloom/{layer} holds the code"
    assert link.is_symlink(), f"{layer} must be a symlink to alphaloom/{layer}"
    assert os.readlink(link) == f"alphaloom/{layer}", "relative, so any checkout location works"
    assert link.resolve() == package.resolve()


def test_go_to_definition_lands_in_the_top_level_folder() -> None:
    """jedi (behind many editors' go-to-definition) follows an `alphaloom.tasks` import to the
    definition, in the file tasks/common/config.py names, with the repository as its project."""
    jedi = pytest.importorskip("jedi")
    source = "from alphaloom.tasks.common.config import load_config\nload_config\n"
    project = jedi.Project(str(REPO), added_sys_path=[], load_unsafe_extensions=False)
    script = jedi.Script(source, path=str(REPO / "probe.py"), project=project)
    found = script.goto(2, 3, follow_imports=True)
    assert found, "jedi resolved nothing"
    target = Path(found[0].module_path).resolve()
    assert target == (REPO / "tasks" / "common" / "config.py").resolve()
    assert found[0].name == "load_config"
    assert (
        (REPO / "tasks" / "common" / "config.py")
        .read_text()
        .splitlines()[found[0].line - 1]
        .startswith("def load_config(")
    )


def test_the_repository_root_imports_the_source_tree() -> None:
    """From the repository root, `alphaloom.flows.pipeline` is found in the checkout's own
    folders (the path finder), not by the editable install's hook. (`find_spec` locates it
    without importing Prefect and MLflow; every test here imports the tree the same way.)"""
    probe = (
        "import importlib.util as u\n"
        "print(u.find_spec('alphaloom.flows.pipeline').origin)\n"
        "print(u.find_spec('alphaloom.tasks.common.config').origin)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    pipeline, config = (Path(line) for line in result.stdout.splitlines())
    assert pipeline == REPO / "alphaloom" / "flows" / "pipeline.py"
    assert pipeline.resolve() == (REPO / "flows" / "pipeline.py").resolve()
    assert config.resolve() == (REPO / "tasks" / "common" / "config.py").resolve()
