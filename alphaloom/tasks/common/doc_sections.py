"""Generated sections of a documentation page: one page, several generators.

docs/benchmark.md is written whole by scripts/benchmark_doc.py (the comparisons), and its
walk-forward section by benchmarks/walk_forward.py. Each generator owns the text between its
markers, `<!-- begin generated: NAME -->` and `<!-- end generated: NAME -->`; rewriting the page
keeps the sections another generator owns, so neither run erases the other's numbers.
"""

from __future__ import annotations

import re

_BLOCK = re.compile(
    r"<!-- begin generated: (?P<name>[\w.-]+) -->\n.*?<!-- end generated: (?P=name) -->\n",
    re.DOTALL,
)


def section(name: str, body: str) -> str:
    """`body` between the markers of section `name` (ending with a newline)."""
    return f"<!-- begin generated: {name} -->\n{body.rstrip()}\n<!-- end generated: {name} -->\n"


def sections(text: str) -> dict[str, str]:
    """Every generated section of `text` by name, markers included."""
    return {match["name"]: match[0] for match in _BLOCK.finditer(text)}


def with_section(text: str, name: str, body: str) -> str:
    """`text` with section `name` replaced by `body`, or appended when it has none."""
    block = section(name, body)
    found = sections(text).get(name)
    if found is not None:
        return text.replace(found, block)
    return f"{text.rstrip()}\n\n{block}" if text.strip() else block


def keep_sections(old: str, new: str) -> str:
    """`new` plus the sections of `old` that `new` lacks (another generator's)."""
    kept = [block for name, block in sections(old).items() if name not in sections(new)]
    return "\n".join([new.rstrip() + "\n", *kept]) if kept else new
