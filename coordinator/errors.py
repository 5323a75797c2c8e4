"""Errors with stable codes; the message tells the operator what to do next."""

from __future__ import annotations

from edge_runtime.errors import EdgeError


class CoordinatorError(EdgeError):
    """A task, store or round problem the operator has to act on."""


class RejectedUpdateError(CoordinatorError):
    """An update the coordinator refuses; the reason is logged and stored, and the round goes on."""
