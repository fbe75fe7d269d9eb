#!/usr/bin/env bash
# Check the import contracts of .importlinter on the source tree.
#
# The package is the folder alphaloom/ (the top-level flows/, tasks/, model/ are links into it,
# CONTRIBUTING.md), so import-linter walks the checkout directly: run from the repository root,
# `alphaloom` is this tree, not the installed copy.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
# A relative path (PYTHON=.venv/bin/python) is relative to where this was called from, and the
# script changes directory below: made absolute here, without resolving the venv's symlink.
if [[ "$python" == */* && "$python" != /* ]]; then
    python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"
fi
cd "$repo"
PYTHONPATH="$repo" "$python" -c \
    'import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())' \
    --no-cache "$repo/.importlinter" "$@"
