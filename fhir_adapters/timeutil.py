"""FHIR date/dateTime/instant strings to float days since 1970-01-01 UTC (pure, no dependencies)."""

from __future__ import annotations

from datetime import UTC, date, datetime

_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_fromiso = datetime.fromisoformat


def to_days(value: object) -> float | None:
    """Days since the epoch for a FHIR date/dateTime/instant; None when it is not one.

    Partial dates take their first instant ("2020" -> 2020-01-01); a dateTime without offset counts as UTC.
    """
    if value.__class__ is not str:
        return None
    n = len(value)
    try:
        if n > 10:
            dt = _fromiso(value)
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=UTC)
            d = dt - _EPOCH  # whole microseconds over microseconds per day: one rounding, as parse_times
            return ((d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds) / 86_400_000_000.0
        if n == 10:
            return float(date.fromisoformat(value).toordinal() - _EPOCH_ORDINAL)
        if n == 7:
            return float(date(int(value[:4]), int(value[5:7]), 1).toordinal() - _EPOCH_ORDINAL)
        if n == 4:
            return float(date(int(value), 1, 1).toordinal() - _EPOCH_ORDINAL)
    except ValueError:
        return None
    return None


def date_to_days(d: date) -> float:
    return float(d.toordinal() - _EPOCH_ORDINAL)


def days_to_date(days: float) -> date:
    return date.fromordinal(int(days // 1) + _EPOCH_ORDINAL)


def parse_instant(value: str) -> datetime:
    """An aware datetime for a FHIR instant (raises ValueError when it is not one)."""
    dt = datetime.fromisoformat(value)
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)
