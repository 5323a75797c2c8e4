"""Errors of the privacy layer: secure aggregation, the shared grid, Shamir shares, DP noise.

Codes (stable, issue10's range): V601 grid or cohort parameters that cannot work together, V602 an
update that does not fit the grid, V603 a protocol message that is malformed or oversized, V604 a
signature or AEAD tag that does not verify (forged, replayed, other round or task), V605 a message
out of turn or from a device not in the round, V606 too few shares or survivors to finish the round,
V607 a share or input that the checks show to be false (the sender is named), V608 a sum that left the
range the grid allows (some device sent an input off the grid), V609 a privacy budget or DP setting
that cannot be met, V610 Shamir parameters or shares that are invalid.
"""

from __future__ import annotations

from edge_runtime.errors import EdgeError


class PrivacyError(EdgeError):
    """A privacy-layer problem: the code says which, the message says what to do next."""


class ProtocolError(PrivacyError):
    """A secure-aggregation message that is refused: the round goes on without it."""

    def __init__(self, code: str, message: str, culprit: str | None = None) -> None:
        super().__init__(code, message)
        self.culprit = culprit  # the device the evidence points at, when there is one
