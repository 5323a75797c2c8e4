"""FHIR R4 REST client: capability check, search with paging by the server's `next` links, retries with
backoff and Retry-After, bearer and SMART auth, custom CA bundles.

A thin shell over httpx. Listing what changed (keyset search by _lastUpdated, _history) is in listing.py,
its pure logic in sync.py; reading the CapabilityStatement in capabilities.py.
"""

from __future__ import annotations

import email.utils
import logging
import random
import ssl
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from .auth import Auth, NoAuth
from .capabilities import base_url_candidates, check_fhir_version
from .errors import FhirAuthError, FhirBaseUrlError, FhirConnectionError, FhirHttpError

log = logging.getLogger("fhir_adapters.client")

FHIR_JSON = "application/fhir+json"
Params = Sequence[tuple[str, str]] | Mapping[str, str] | None


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before asking again."""

    max_attempts: int = 5
    backoff_base: float = 0.5  # seconds; doubles each attempt, with jitter
    backoff_max: float = 30.0
    max_retry_after: float = 120.0  # cap on a server's Retry-After
    statuses: frozenset[int] = frozenset({429, 502, 503, 504})

    def backoff(self, attempt: int) -> float:
        return min(self.backoff_max, self.backoff_base * (2**attempt)) * (0.5 + random.random() / 2)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None when absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _params_list(params: Params) -> list[tuple[str, str]]:
    if params is None:
        return []
    if isinstance(params, Mapping):
        return [(str(k), str(v)) for k, v in params.items()]
    return [(str(k), str(v)) for k, v in params]


def _outcome_text(r: httpx.Response) -> str:
    """The diagnostics of an OperationOutcome body, or the start of the body."""
    try:
        body = r.json()
        issues = body.get("issue") or []
        text = "; ".join(str(i.get("diagnostics") or i.get("code")) for i in issues)
        return text or r.text[:300]
    except (ValueError, AttributeError):
        return r.text[:300]


def _status_hint(status: int) -> str:
    if status == 404:
        return "the server has no such endpoint or resource: check the base URL and what was asked for"
    if status in (429, 500, 502, 503, 504):
        return "the server is failing or overloaded: retry later, or ask its administrators"
    return "the server refused the request: see its message"


def ssl_verify(verify: bool | str | Path) -> bool | ssl.SSLContext:
    """httpx `verify` from True/False or the path of a CA bundle (PEM) for a hospital's private CA."""
    if isinstance(verify, bool):
        return verify
    path = Path(verify)
    if not path.exists():
        raise FhirConnectionError(f"CA bundle {path} not found", hint="pass the PEM file of the hospital's CA")
    return ssl.create_default_context(cafile=str(path))


class FhirClient:
    """Synchronous FHIR R4 REST client. Use as a context manager or call close()."""

    def __init__(
        self,
        base_url: str,
        *,
        auth: Auth | None = None,
        timeout: float | httpx.Timeout = 30.0,
        verify: bool | str | Path = True,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.auth: Auth = auth or NoAuth()
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self.http = httpx.Client(
            timeout=timeout,
            verify=ssl_verify(verify),
            transport=transport,
            headers={"Accept": FHIR_JSON, "User-Agent": "fhai-fhir/0.1"},
            follow_redirects=True,
        )
        self._capabilities: dict[str, Any] | None = None
        self.requests_sent = 0

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url(self, path_or_url: str) -> str:
        if path_or_url.startswith(("http://", "https://")):
            return path_or_url
        return f"{self.base_url}/{path_or_url.lstrip('/')}"

    # ---------------- transport with retries ----------------

    def send(
        self,
        method: str,
        path_or_url: str,
        *,
        params: Params = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        ok: Sequence[int] = (200, 201),
        stream: bool = False,
        authenticate: bool = True,
    ) -> httpx.Response:
        """Send a request; retry 429/5xx with backoff (honouring Retry-After) and network errors on reads;
        refresh credentials once on 401. Raises a FhirAdapterError for any status not in `ok`."""
        url = self.url(path_or_url)
        content = orjson.dumps(json) if json is not None else None
        refreshed = False
        attempt = 0
        while True:
            h = dict(headers or {})
            if content is not None:
                h.setdefault("Content-Type", FHIR_JSON)
            if authenticate:
                h.update(self.auth.headers(self.http))
            pl = _params_list(params)
            req = self.http.build_request(
                method, url, params=httpx.QueryParams(tuple(pl)) if pl else None, content=content, headers=h
            )
            try:
                self.requests_sent += 1
                resp = self.http.send(req, stream=stream)
            except httpx.TimeoutException as e:
                err: Exception = e
                what = f"timed out after {self.http.timeout.read}s"
            except httpx.TransportError as e:
                err, what = e, f"unreachable ({e.__class__.__name__}: {e})"
            else:
                status = resp.status_code
                if status in ok:
                    return resp
                if status in self.retry.statuses and attempt + 1 < self.retry.max_attempts:
                    wait = retry_after_seconds(resp.headers.get("Retry-After"))
                    wait = self.retry.backoff(attempt) if wait is None else min(wait, self.retry.max_retry_after)
                    log.info("%s %s -> %s; retrying in %.2fs", method, url, status, wait)
                    resp.close()
                    self._sleep(wait)
                    attempt += 1
                    continue
                if status == 401 and authenticate and not refreshed and self.auth.invalidate():
                    resp.close()
                    refreshed = True
                    continue
                if stream:
                    resp.read()
                raise self._status_error(method, url, resp)
            # network error: reads are safe to repeat; a write might have been applied, so do not repeat it
            if method in ("GET", "HEAD") and attempt + 1 < self.retry.max_attempts:
                wait = self.retry.backoff(attempt)
                log.info("%s %s %s; retrying in %.2fs", method, url, what, wait)
                self._sleep(wait)
                attempt += 1
                continue
            raise FhirConnectionError(
                f"FHIR server {self.base_url} {what}",
                hint="check the URL, the network and that the server is running",
                detail=repr(err),
            ) from err

    def _status_error(self, method: str, url: str, r: httpx.Response) -> Exception:
        detail = f"{method} {url} -> {r.status_code}: {r.text[:2000]}"
        text = _outcome_text(r)
        if r.status_code == 401:
            return FhirAuthError(
                f"the FHIR server refused the credentials (401: {text})",
                hint="check the bearer token or SMART client registration",
                detail=detail,
            )
        if r.status_code == 403:
            return FhirAuthError(
                f"access forbidden (403: {text})", hint="ask for a token with the needed scopes", detail=detail
            )
        return FhirHttpError(
            f"{method} {url} failed with {r.status_code}: {text}",
            status=r.status_code,
            hint=_status_hint(r.status_code),
            detail=detail,
        )

    def get_json(self, path_or_url: str, params: Params = None) -> dict[str, Any]:
        return self.get_response_json(path_or_url, params)[0]

    def get_response_json(self, path_or_url: str, params: Params = None) -> tuple[dict[str, Any], httpx.Headers]:
        """A GET's JSON object and the response headers (for the Date a server answered at)."""
        r = self.send("GET", path_or_url, params=params)
        try:
            body = orjson.loads(r.content)
        except orjson.JSONDecodeError as e:
            raise FhirHttpError(
                f"{path_or_url} did not answer with JSON",
                status=r.status_code,
                hint="is this the FHIR base URL?",
                detail=r.text[:2000],
            ) from e
        if not isinstance(body, dict):
            raise FhirHttpError(f"{path_or_url} answered with a non-object", status=r.status_code)
        return body, r.headers

    # ---------------- capabilities ----------------

    def capabilities(self) -> dict[str, Any]:
        """The server's CapabilityStatement; raises FhirVersionError unless it is FHIR R4 or R4B (naming the
        release it is), FhirBaseUrlError when the URL does not look like a FHIR base URL at all."""
        if self._capabilities is None:
            try:
                cs = self.get_json("metadata")
            except FhirHttpError as e:
                if e.status == 404 or e.status == 200:  # 200: an answer that is not JSON
                    answer = "404 Not Found" if e.status == 404 else "something that is not JSON"
                    raise self._not_a_base_url(answer, e.detail) from e
                raise
            if cs.get("resourceType") not in ("CapabilityStatement", "Conformance"):
                raise self._not_a_base_url(f"a {cs.get('resourceType') or 'JSON object'}, not a CapabilityStatement")
            check_fhir_version(cs)
            self._capabilities = cs
        return self._capabilities

    def _not_a_base_url(self, answer: str, detail: str = "") -> FhirBaseUrlError:
        """The error for a URL that is not a FHIR base, naming a usual base below it that answers."""
        candidates = base_url_candidates(self.base_url)
        for url in candidates:
            try:
                r = self.http.get(f"{url}/metadata", timeout=5.0)
                cs = orjson.loads(r.content) if r.status_code == 200 else None
            except (httpx.HTTPError, orjson.JSONDecodeError):
                continue
            if isinstance(cs, dict) and cs.get("resourceType") in ("CapabilityStatement", "Conformance"):
                hint = f"use {url} (its /metadata answers FHIR {cs.get('fhirVersion', '?')})"
                break
        else:
            hint = (
                "a FHIR base URL usually ends in /fhir, /R4, /baseR4 or /fhir/R4 (none of those answered below this "
                "URL either); check the server's documentation"
            )
        return FhirBaseUrlError(
            f"{self.base_url} is probably not the FHIR base URL: GET /metadata answered {answer}",
            hint=hint,
            detail=detail,
        )

    # ---------------- search ----------------

    def search_pages(
        self, resource_type: str, params: Params = None, *, count: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """searchset Bundles, first page by query, the rest by following Bundle.link[next] as given."""
        p = _params_list(params)
        if count is not None:
            p = [(k, v) for k, v in p if k != "_count"] + [("_count", str(count))]
        bundle = self.get_json(resource_type, p)
        seen: set[str] = set()
        while True:
            yield bundle
            nxt = next_link(bundle)
            if nxt is None:
                return
            if nxt in seen:
                raise FhirHttpError(
                    f"server returned the same next link twice ({nxt})", status=200, hint="report a server bug"
                )
            seen.add(nxt)
            bundle = self.get_json(nxt)

    def search(
        self, resource_type: str, params: Params = None, *, count: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Resources matching a search (entries in search mode `match`; includes and outcomes skipped)."""
        for bundle in self.search_pages(resource_type, params, count=count):
            for entry in bundle.get("entry") or ():
                mode = (entry.get("search") or {}).get("mode", "match")
                res = entry.get("resource")
                if mode == "match" and isinstance(res, dict) and res.get("resourceType") == resource_type:
                    yield res

    # ---------------- writes ----------------

    def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """POST a transaction (or batch) Bundle to the base URL; returns the response Bundle."""
        r = self.send("POST", self.base_url, json=bundle)
        body: dict[str, Any] = orjson.loads(r.content)
        return body

    @contextmanager
    def stream(self, url: str, *, authenticate: bool = True) -> Iterator[httpx.Response]:
        """A streamed GET (for Bulk files); closes the response on exit."""
        r = self.send("GET", url, stream=True, authenticate=authenticate, headers={"Accept": "application/fhir+ndjson"})
        try:
            yield r
        finally:
            r.close()


def next_link(bundle: dict[str, Any]) -> str | None:
    for link in bundle.get("link") or ():
        if link.get("relation") == "next" and link.get("url"):
            return str(link["url"])
    return None
