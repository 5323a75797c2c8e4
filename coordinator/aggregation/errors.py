"""Errors the aggregation package raises on purpose: a stable code for logs, a message saying what to do."""

from __future__ import annotations

from coordinator.errors import CoordinatorError


class AggregationError(CoordinatorError):
    """A strategy spec, update, or saved state the coordinator cannot aggregate with.

    Codes (stable): A001 unknown strategy, A002 bad strategy option, A003 update of the wrong shape,
    A004 non-finite update, A005 bad update weight, A006 round without updates, A007 saved state that
    does not fit the strategy, A008 accumulator misuse or spill-file failure, A009 global parameters of
    the wrong shape.
    """
