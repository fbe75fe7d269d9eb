"""The order of a column's slashed dates (day/month or month/day), decided once from all of them.

Why from all values: pandas infers the order of `02/01/2019` from a column's first value, so a
day-first file was read month-first; its rows with a day past the 12th then failed to parse and
the others were kept with day and month swapped, silently. Here every value of the column has a
say: a first field that is no valid month (13/01/2019) means day-first, a second field that is no
valid month (01/13/2019) means month-first, and rows saying both make the column mixed. When no
value decides, the spacing of the dates can: daily bars read the right way are mostly a few
trading days apart, read the wrong way they jump by about a month. Otherwise the column is
undecidable. Mixed and undecidable columns are refused whole (`data.date_format` reads them);
nothing is ever read partly one way and partly the other.

Slashed means `d/m/y` with `/`, `.` or `-` between one- or two-digit fields and a two- or
four-digit year, optionally followed by a time; ISO dates (2019-01-02), 20190102 and every other
spelling are left untouched for the usual parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

# day-or-month, separator, day-or-month, separator (the same), year, an optional time; no
# backreference, so pyarrow's regex engine runs it (the separators are compared afterwards)
SLASHED = r"^(\d{1,2})([/.\-])(\d{1,2})([/.\-])(\d{4}|\d{2})((?:[ T].*)?)$"

UNDECIDED = "date_order_undecided"  # problem kinds, worded in checks.PROBLEM_NAMES
MIXED = "date_order_mixed"

# Spacing that reads as daily trading bars: most gaps short, almost no weekend dates; and the
# median gap of a reading that swapped day and month (about a month).
DAILY_MEDIAN_GAP = 4
DAILY_SHORT_GAP = 7
DAILY_SHORT_SHARE = 0.9
DAILY_WEEKEND_SHARE = 0.1
SWAPPED_MEDIAN_GAP = 20
MIN_DATES_FOR_SPACING = 3


@dataclass
class DateOrder:
    """How a column's slashed dates read: in one order (`order`), or not at all (`kind`).

    `iso` holds, for every slashed value (indexed by its position in the column), its ISO
    spelling in the decided order (time kept) or NA where that order makes no valid date; it
    is empty when nothing was slashed.
    """

    order: Literal["day", "month"] | None
    iso: pd.Series
    kind: str | None = None  # UNDECIDED or MIXED when the column cannot be read
    examples: list[str] = field(default_factory=list)  # "row 1: '05/01/2020'", ...
    formats: tuple[str, str] = ("%d/%m/%Y", "%m/%d/%Y")  # (day-first, month-first) to suggest

    @property
    def decided(self) -> bool:
        return self.kind is None


def _calendar(year: pd.Series, month: pd.Series, day: pd.Series) -> pd.Series:
    """The dates these fields make, NaT where they make none (month 13, 31 February)."""
    parts = pd.DataFrame({"year": year, "month": month, "day": day})
    return pd.to_datetime(parts, errors="coerce")


def _gaps(dates: pd.Series) -> tuple[pd.DatetimeIndex, np.ndarray]:
    """The distinct dates, sorted, and the days between consecutive ones."""
    unique = pd.DatetimeIndex(dates.dropna().unique()).sort_values()
    return unique, (unique[1:] - unique[:-1]).days.to_numpy()


def _looks_daily(dates: pd.Series) -> bool:
    """Clearly daily trading bars: short gaps and (almost) no Saturday or Sunday."""
    unique, gaps = _gaps(dates)
    if len(unique) < MIN_DATES_FOR_SPACING:
        return False
    weekend = float(np.mean(unique.day_of_week >= 5))
    return (
        float(np.median(gaps)) <= DAILY_MEDIAN_GAP
        and float(np.mean(gaps <= DAILY_SHORT_GAP)) >= DAILY_SHORT_SHARE
        and weekend <= DAILY_WEEKEND_SHARE
    )


def _looks_swapped(dates: pd.Series) -> bool:
    """Clearly not daily: consecutive dates typically about a month apart."""
    unique, gaps = _gaps(dates)
    return len(unique) >= MIN_DATES_FOR_SPACING and float(np.median(gaps)) >= SWAPPED_MEDIAN_GAP


def _by_spacing(day_first: pd.Series, month_first: pd.Series) -> Literal["day", "month"] | None:
    """The reading whose dates look like daily bars when the other's clearly do not."""
    if _looks_daily(day_first) and _looks_swapped(month_first):
        return "day"
    if _looks_daily(month_first) and _looks_swapped(day_first):
        return "month"
    return None


def _shown(text: pd.Series, positions: np.ndarray, note: str = "") -> list[str]:
    suffix = f" ({note})" if note else ""
    return [f"row {p + 1}: {text.iloc[p]!r}{suffix}" for p in positions]


def read_order(text: pd.Series) -> DateOrder:
    """Decide the order of the slashed values of `text` (strings; missing ones are ignored).

    Rows are numbered in `examples` by their position in `text`, from 1. The work is done once
    per distinct value (a long table repeats each date once per symbol).
    """
    text = text.astype("string")
    codes, uniques = pd.factorize(text)  # codes in order of first appearance; -1: missing
    values = pd.Series(uniques, dtype="string")
    candidate = values.str.match(r"\d{1,2}[/.\-]\d{1,2}[/.\-]\d").fillna(False).to_numpy(bool)
    fields = values[candidate].str.extract(SLASHED)
    slashed = (fields[0].notna() & (fields[1] == fields[3])).fillna(False).to_numpy(bool)
    distinct = np.flatnonzero(candidate)[slashed]  # which distinct values are slashed
    if not len(distinct):
        return DateOrder("month", pd.Series([], dtype="string"))
    first_row = np.unique(codes[codes >= 0], return_index=True)[1]
    first_row = np.flatnonzero(codes >= 0)[first_row][distinct]  # where each first appears
    fields = fields[slashed]
    first, second = fields[0].astype(int), fields[2].astype(int)
    year = fields[4].astype(int)
    short_year = fields[4].str.len() == 2
    year = year.where(~short_year, year + np.where(year < 69, 2000, 1900))  # strptime's %y
    day_first = _calendar(year, second, first)
    month_first = _calendar(year, first, second)
    sep = str(fields[1].iloc[0])
    y = "%y" if bool(short_year.iloc[0]) else "%Y"
    formats = (f"%d{sep}%m{sep}{y}", f"%m{sep}%d{sep}{y}")
    only_day = (day_first.notna() & month_first.isna()).to_numpy()
    only_month = (month_first.notna() & day_first.isna()).to_numpy()
    if only_day.any() and only_month.any():
        day_rows, month_rows = first_row[only_day], first_row[only_month]
        shown = [  # both kinds among the first examples shown
            *_shown(text, day_rows[:1], "only valid day first"),
            *_shown(text, month_rows[:1], "only valid month first"),
            *_shown(text, day_rows[1:2], "only valid day first"),
            *_shown(text, month_rows[1:2], "only valid month first"),
        ]
        return DateOrder(None, pd.Series(dtype="string"), MIXED, shown, formats)
    if only_day.any():
        order = "day"
    elif only_month.any():
        order = "month"
    else:
        both = (day_first.notna() & month_first.notna()).to_numpy()
        same = (first == second).to_numpy()
        order = "month" if (same | ~both).all() else _by_spacing(day_first, month_first)
    if order is None:
        shown = _shown(text, np.sort(first_row)[:3])
        return DateOrder(None, pd.Series(dtype="string"), UNDECIDED, shown, formats)
    dates = day_first if order == "day" else month_first
    iso = (dates.dt.strftime("%Y-%m-%d") + fields[5].fillna("")).where(dates.notna())
    spelled = np.full(len(values), -1)
    spelled[distinct] = np.arange(len(distinct))  # distinct value -> its slashed number
    number = np.where(codes >= 0, spelled[codes], -1)
    rows = np.flatnonzero(number >= 0)
    iso = pd.Series(iso.to_numpy()[number[rows]], index=rows, dtype="string")
    return DateOrder(order, iso, formats=formats)
