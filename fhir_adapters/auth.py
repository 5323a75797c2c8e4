"""Credentials for a FHIR server: none, a static bearer token, or SMART Backend Services.

SMART Backend Services (client_credentials + private_key_jwt): the client signs a short-lived JWT assertion
with its private key (RS384 or ES384), trades it at the token endpoint for an access token, and fetches a new
one `refresh_margin` seconds before the old one expires (or at once after a 401).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import httpx
import jwt

from .errors import FhirAuthError

log = logging.getLogger("fhir_adapters.auth")

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
SIGNING_ALGS = ("RS384", "ES384")


class Auth(Protocol):
    def headers(self, http: httpx.Client) -> dict[str, str]:
        """Headers to add to a request (may fetch or refresh a token through `http`)."""
        ...

    def invalidate(self) -> bool:
        """Forget cached credentials after a 401; True when a retry with fresh ones may succeed."""
        ...


class NoAuth:
    def headers(self, http: httpx.Client) -> dict[str, str]:
        return {}

    def invalidate(self) -> bool:
        return False


class BearerAuth:
    """A static bearer token (e.g. issued by the hospital's FHIR server admin)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise FhirAuthError("empty bearer token", hint="pass the token the FHIR server admin gave you")
        self._token = token

    def headers(self, http: httpx.Client) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    def invalidate(self) -> bool:
        return False  # a static token does not get better by asking again

    def __repr__(self) -> str:  # never print the token
        return "BearerAuth(***)"


def discover_token_url(http: httpx.Client, base_url: str) -> str:
    """token_endpoint from [base]/.well-known/smart-configuration."""
    url = f"{base_url.rstrip('/')}/.well-known/smart-configuration"
    try:
        r = http.get(url, headers={"Accept": "application/json"})
        r.raise_for_status()
        return str(r.json()["token_endpoint"])
    except (httpx.HTTPError, KeyError, ValueError) as e:
        raise FhirAuthError(
            f"cannot discover the SMART token endpoint at {url}",
            hint="set token_url explicitly or check that the server supports SMART Backend Services",
            detail=repr(e),
        ) from e


class SmartBackendAuth:
    """SMART Backend Services client (client_credentials grant with a signed JWT assertion)."""

    def __init__(
        self,
        client_id: str,
        private_key: str | bytes | Path,
        *,
        base_url: str | None = None,
        token_url: str | None = None,
        alg: str = "RS384",
        kid: str | None = None,
        scope: str = "system/*.read",
        refresh_margin: float = 60.0,
        assertion_lifetime: float = 240.0,  # servers refuse exp more than 5 minutes ahead
        clock: Callable[[], float] = time.time,
    ) -> None:
        if alg not in SIGNING_ALGS:
            raise FhirAuthError(f"unsupported signing algorithm {alg!r}", hint=f"use one of {SIGNING_ALGS}")
        if token_url is None and base_url is None:
            raise FhirAuthError("SMART auth needs token_url or base_url", hint="pass the FHIR base URL")
        if isinstance(private_key, Path) or (isinstance(private_key, str) and "-----BEGIN" not in private_key):
            key_path = Path(private_key)
            try:
                private_key = key_path.read_bytes()
            except OSError as e:
                raise FhirAuthError(f"cannot read private key {key_path}", hint="check the key path") from e
        self.client_id = client_id
        self._key = private_key
        self.base_url = base_url
        self.token_url = token_url
        self.alg = alg
        self.kid = kid
        self.scope = scope
        self.refresh_margin = refresh_margin
        self.assertion_lifetime = assertion_lifetime
        self._clock = clock
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock = threading.Lock()
        self.tokens_fetched = 0  # observable for tests and logs

    def assertion(self, token_url: str) -> str:
        now = int(self._clock())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": token_url,
            "iat": now,
            "exp": now + int(self.assertion_lifetime),
            "jti": uuid.uuid4().hex,
        }
        headers: dict[str, Any] = {"typ": "JWT"}
        if self.kid:
            headers["kid"] = self.kid
        try:
            return jwt.encode(claims, self._key, algorithm=self.alg, headers=headers)
        except (ValueError, TypeError, jwt.PyJWTError) as e:
            raise FhirAuthError(
                f"cannot sign the client assertion with {self.alg}",
                hint="check that the private key matches the algorithm (RSA for RS384, EC P-384 for ES384)",
                detail=repr(e),
            ) from e

    def _fetch(self, http: httpx.Client) -> None:
        if self.token_url is None:
            assert self.base_url is not None
            self.token_url = discover_token_url(http, self.base_url)
        form = {
            "grant_type": "client_credentials",
            "scope": self.scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": self.assertion(self.token_url),
        }
        try:
            r = http.post(self.token_url, data=form, headers={"Accept": "application/json"})
        except httpx.HTTPError as e:
            raise FhirAuthError(f"token endpoint {self.token_url} unreachable", hint="check the URL") from e
        if r.status_code != 200:
            raise FhirAuthError(
                f"token request refused ({r.status_code})",
                hint="check client_id, the registered public key and the requested scope",
                detail=r.text[:2000],
            )
        body = r.json()
        self._token = str(body["access_token"])
        lifetime = float(body.get("expires_in", 300))
        # refresh `refresh_margin` early, but never in the first half of a short-lived token's life
        self._refresh_at = self._clock() + lifetime - min(self.refresh_margin, lifetime / 2)
        self.tokens_fetched += 1
        log.info("SMART access token fetched for %s (expires in %ss)", self.client_id, body.get("expires_in"))

    def headers(self, http: httpx.Client) -> dict[str, str]:
        with self._lock:
            if self._token is None or self._clock() >= self._refresh_at:
                self._fetch(http)
            return {"Authorization": f"Bearer {self._token}"}

    def invalidate(self) -> bool:
        with self._lock:
            self._token = None
        return True

    def __repr__(self) -> str:
        return f"SmartBackendAuth(client_id={self.client_id!r}, alg={self.alg!r})"
