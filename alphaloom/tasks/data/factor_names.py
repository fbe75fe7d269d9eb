"""Alpha158 factor names: the families, their windows, parsing and selecting names from a config."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import numpy as np

KBAR_NAMES = ["KMID", "KLEN", "KMID2", "KUP", "KUP2", "KLOW", "KLOW2", "KSFT", "KSFT2"]


PRICE_NAMES = ["OPEN0", "HIGH0", "LOW0", "VWAP0"]


ROLLING_FAMILIES = [
    "ROC", "MA", "STD", "BETA", "RSQR", "RESI", "MAX", "MIN", "QTLU", "QTLD", "RANK", "RSV",
    "IMAX", "IMIN", "IMXD", "CORR", "CORD", "CNTP", "CNTN", "CNTD", "SUMP", "SUMN", "SUMD",
    "VMA", "VSTD", "WVMA", "VSUMP", "VSUMN", "VSUMD",
]  # fmt: skip


DEFAULT_WINDOWS = (5, 10, 20, 30, 60)


GROUPS = {"KBAR": KBAR_NAMES, "PRICE": PRICE_NAMES}


_NAME = re.compile(r"([A-Z]+)(\d+)")


def _check_windows(windows: Sequence[int]) -> list[int]:
    if len(windows) == 0:
        raise ValueError("features.windows must list at least one window")
    for w in windows:
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1:
            raise ValueError(f"features.windows: every window must be an integer >= 1, got {w!r}")
    return sorted({int(w) for w in windows})


def factor_names(windows: Sequence[int] = DEFAULT_WINDOWS) -> list[str]:
    """All Alpha158 names for these rolling windows, in Qlib's order."""
    windows = _check_windows(windows)
    rolling = [f"{family}{w}" for family in ROLLING_FAMILIES for w in windows]
    return [*KBAR_NAMES, *PRICE_NAMES, *rolling]


ALPHA158_NAMES: list[str] = factor_names(DEFAULT_WINDOWS)


def parse_name(name: str) -> tuple[str, int | None]:
    """(family, window) of a factor name; raises ValueError naming an unknown one."""
    if name in KBAR_NAMES or name in PRICE_NAMES:
        return name, None
    match = _NAME.fullmatch(name)
    if match and match.group(1) in ROLLING_FAMILIES and int(match.group(2)) >= 1:
        return match.group(1), int(match.group(2))
    raise ValueError(
        f"unknown Alpha158 factor {name!r}: expected one of {KBAR_NAMES + PRICE_NAMES} or a "
        f"rolling family {ROLLING_FAMILIES} followed by a window >= 1, e.g. 'ROC5'"
    )


def _canonical_order(name: str) -> tuple[int, int, int]:
    family, window = parse_name(name)
    if window is None:
        fixed = KBAR_NAMES + PRICE_NAMES
        return 0, fixed.index(family), 0
    return 1, ROLLING_FAMILIES.index(family), window


def select_factors(factors: Literal["all"] | list[str], windows: Sequence[int]) -> list[str]:
    """Resolve a factor selection into names in Qlib's order.

    `factors` is "all" or a list whose entries are factor names ("ROC5", "KMID"), rolling family
    names expanded over `windows` ("ROC", "MA"), or the groups "KBAR" and "PRICE". Matching is
    case-insensitive; an unknown entry is a ValueError naming it.
    """
    windows = _check_windows(windows)
    if isinstance(factors, str):
        if factors != "all":
            raise ValueError(f"features.factors must be 'all' or a list of names, got {factors!r}")
        return factor_names(windows)
    chosen: set[str] = set()
    for entry in factors:
        key = str(entry).strip().upper()
        if key in GROUPS:
            chosen.update(GROUPS[key])
        elif key in ROLLING_FAMILIES:
            chosen.update(f"{key}{w}" for w in windows)
        else:
            try:
                parse_name(key)
            except ValueError as err:
                raise ValueError(f"features.factors: {err}") from None
            chosen.add(key)
    if not chosen:
        raise ValueError("features.factors selects no factor")
    return sorted(chosen, key=_canonical_order)
