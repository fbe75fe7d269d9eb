"""Generated sections of a page: replaced in place, appended when absent, kept by a rewrite."""

from __future__ import annotations

from alphaloom.tasks.common.doc_sections import keep_sections, section, sections, with_section


def test_a_section_is_replaced_in_place_and_appended_when_absent() -> None:
    page = "# Title\n\nintro\n"
    once = with_section(page, "walk-forward", "table v1")
    assert once.startswith("# Title\n\nintro\n") and "table v1" in once
    twice = with_section(once + "\n## Later\n", "walk-forward", "table v2\n")
    assert "table v1" not in twice and twice.count("begin generated: walk-forward") == 1
    assert twice.index("table v2") < twice.index("## Later")  # replaced where it was
    assert sections(twice) == {"walk-forward": section("walk-forward", "table v2")}


def test_a_rewrite_keeps_the_sections_another_generator_owns() -> None:
    old = with_section("# old page\n", "walk-forward", "numbers")
    old = with_section(old, "comparisons", "old comparisons")
    new = with_section("# new page\n", "comparisons", "new comparisons")
    merged = keep_sections(old, new)
    assert merged.startswith("# new page") and "numbers" in merged
    assert "old comparisons" not in merged and "new comparisons" in merged
    assert keep_sections("# no sections\n", "# page\n") == "# page\n"
