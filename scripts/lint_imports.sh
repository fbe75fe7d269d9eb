#!/usr/bin/env bash
# Check the import contracts of .importlinter on the package as it installs.
#
# flows/, tasks/ and model/ sit at the repository's top level and are mapped into the
# `alphaloom` namespace by pyproject.toml, so the tree on disk is not laid out as the package is.
# import-linter finds a package by walking its directory, so it checks the built wheel, unpacked
# into a temporary directory: exactly what `pip install .` puts into site-packages.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$work/wheel" "$repo" \
    >/dev/null 2>&1 || "$python" -m pip wheel --no-deps --no-build-isolation \
    --wheel-dir "$work/wheel" "$repo"
"$python" -m zipfile -e "$work"/wheel/*.whl "$work/site"
cd "$work/site"  # not the repository: its top-level folders must not shadow the wheel's package
PYTHONPATH="$work/site" "$python" -c \
    'import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())' \
    --no-cache "$repo/.importlinter" "$@"
