"""Errors with stable codes: the code is for logs and support, the message tells the user what to do."""

from __future__ import annotations


class EdgeError(Exception):
    """Base of every error the edge runtime raises on purpose."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


class ModelError(EdgeError):
    """A model spec, parameter vector or feature matrix that does not fit together."""


class TrainingDataError(EdgeError):
    """Training data the trainer refuses: empty, wrong shape, non-finite, labels outside the classes."""


class ConfigError(EdgeError):
    """A training config or device profile with a value out of range."""
