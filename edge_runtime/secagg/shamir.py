"""Shamir secret sharing over the prime field GF(2^521 - 1), for 32-byte secrets (see decision 0011).

A secret s is the constant term of a random polynomial f of degree t - 1; share i is (i, f(i)) for
i = 1..n. Any t shares give s back by Lagrange interpolation at 0; fewer leave every secret equally
likely. The field is the Mersenne prime p = 2^521 - 1, large enough for any 32-byte string (an X25519
private key or a mask seed) as one element, and its coefficients come from `secrets` (the OS CSPRNG).
Python integers are exact, so this is plain modular arithmetic; the share values travel as 66 bytes.
"""

from __future__ import annotations

import secrets as _secrets
from collections.abc import Sequence

from edge_runtime.secagg.errors import PrivacyError

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)
SECRET_BYTES = 32
MAX_SHARES = 1 << 16


def _check(threshold: int, n_shares: int) -> None:
    if not 1 <= threshold <= n_shares <= MAX_SHARES:
        raise PrivacyError(
            "FHAI-V610", f"Shamir needs 1 <= threshold <= shares <= {MAX_SHARES}, got t={threshold}, n={n_shares}"
        )


def split(secret: int, threshold: int, xs: Sequence[int], coefficients: Sequence[int] | None = None) -> list[int]:
    """f(x) for each x in `xs`, where f(0) = secret has degree threshold - 1 and random coefficients.

    `coefficients` (a_1..a_{t-1}) is for known-answer tests only; production draws them from the OS.
    """
    _check(threshold, len(xs))
    if not 0 <= secret < PRIME:
        raise PrivacyError("FHAI-V610", "a Shamir secret must be a field element (0 <= s < 2^521 - 1)")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise PrivacyError("FHAI-V610", "share points must be distinct and non-zero")
    if coefficients is None:
        coefficients = [_secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    elif len(coefficients) != threshold - 1:
        raise PrivacyError("FHAI-V610", f"a threshold-{threshold} polynomial has {threshold - 1} random coefficients")
    poly = [secret, *coefficients]
    out = []
    for x in xs:
        acc = 0
        for a in reversed(poly):  # Horner
            acc = (acc * x + a) % PRIME
        out.append(acc)
    return out


def lagrange_at(points: Sequence[tuple[int, int]], at: int = 0) -> int:
    """f(at) for the polynomial of degree len(points) - 1 through `points` (mod p)."""
    xs = [x for x, _ in points]
    if len(set(xs)) != len(xs):
        raise PrivacyError("FHAI-V610", "two shares have the same point: a share was duplicated")
    # One inversion in total: accumulate numerators and denominators as fractions.
    num_total, den_total = 0, 1
    for j, (xj, yj) in enumerate(points):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * (at - xm) % PRIME
                den = den * (xj - xm) % PRIME
        # num_total/den_total + yj*num/den
        num_total = (num_total * den + yj * num * den_total) % PRIME
        den_total = den_total * den % PRIME
    return num_total * pow(den_total, -1, PRIME) % PRIME


def combine(points: Sequence[tuple[int, int]], threshold: int) -> int:
    """The secret from at least `threshold` shares (the first `threshold` are used)."""
    if len(points) < threshold:
        raise PrivacyError(
            "FHAI-V606", f"{len(points)} shares cannot rebuild a secret shared with threshold {threshold}"
        )
    return lagrange_at(list(points)[:threshold], 0)


def consistent(points: Sequence[tuple[int, int]], basis: Sequence[tuple[int, int]]) -> list[bool]:
    """For each point, whether it lies on the polynomial through `basis` (threshold many trusted shares)."""
    return [lagrange_at(basis, x) == y % PRIME for x, y in points]


def secret_to_int(secret: bytes) -> int:
    if len(secret) != SECRET_BYTES:
        raise PrivacyError("FHAI-V610", f"secrets shared here are {SECRET_BYTES} bytes, got {len(secret)}")
    return int.from_bytes(secret, "big")


def int_to_secret(value: int) -> bytes:
    if not 0 <= value < 1 << (8 * SECRET_BYTES):
        raise PrivacyError("FHAI-V607", "the rebuilt value is not a 32-byte secret: a share was false")
    return value.to_bytes(SECRET_BYTES, "big")


def share_to_bytes(value: int) -> bytes:
    return value.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    value = int.from_bytes(data, "big")
    if len(data) != SHARE_BYTES or value >= PRIME:
        raise PrivacyError("FHAI-V603", f"a share is {SHARE_BYTES} bytes holding a field element")
    return value
