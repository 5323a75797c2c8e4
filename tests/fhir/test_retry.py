"""Retries on 429/503 with Retry-After. A real server cannot be made to emit these on demand, so this is the
one place a local httpx MockTransport stands in for SEKMET."""

from __future__ import annotations

import email.utils
import time

import httpx
import pytest

from fhir_adapters.client import FhirClient, RetryPolicy, retry_after_seconds
from fhir_adapters.errors import FhirConnectionError, FhirHttpError

BASE = "http://fhir.test/fhir"
OK_BUNDLE = {"resourceType": "Bundle", "type": "searchset", "entry": []}


def scripted(responses: list[httpx.Response]) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return responses[min(len(seen) - 1, len(responses) - 1)]

    return httpx.MockTransport(handler), seen


def make_client(transport: httpx.MockTransport, sleeps: list[float], **policy: float) -> FhirClient:
    return FhirClient(BASE, transport=transport, sleep=sleeps.append, retry=RetryPolicy(**policy))  # type: ignore[arg-type]


def test_429_waits_retry_after_seconds_then_succeeds() -> None:
    transport, seen = scripted(
        [
            httpx.Response(429, headers={"Retry-After": "3"}),
            httpx.Response(503, headers={"Retry-After": "1.5"}),
            httpx.Response(200, json=OK_BUNDLE),
        ]
    )
    sleeps: list[float] = []
    with make_client(transport, sleeps) as c:
        assert c.get_json("Observation")["resourceType"] == "Bundle"
    assert sleeps == [3.0, 1.5]
    assert len(seen) == 3


def test_retry_after_http_date() -> None:
    when = email.utils.formatdate(time.time() + 10, usegmt=True)
    wait = retry_after_seconds(when)
    assert wait is not None and 8.0 <= wait <= 10.0
    assert retry_after_seconds("garbage") is None
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("-5") == 0.0


def test_without_retry_after_backoff_grows_and_is_capped() -> None:
    transport, _ = scripted([httpx.Response(503)] * 4 + [httpx.Response(200, json=OK_BUNDLE)])
    sleeps: list[float] = []
    with make_client(transport, sleeps, backoff_base=1.0, backoff_max=3.0) as c:
        c.get_json("Patient")
    assert len(sleeps) == 4
    # jittered exponential: base * 2^k * [0.5, 1], capped at backoff_max
    for k, s in enumerate(sleeps):
        assert min(3.0, 2**k) * 0.5 <= s <= min(3.0, 2**k)


def test_retry_after_is_capped() -> None:
    transport, _ = scripted([httpx.Response(429, headers={"Retry-After": "9999"}), httpx.Response(200, json=OK_BUNDLE)])
    sleeps: list[float] = []
    with make_client(transport, sleeps, max_retry_after=5.0) as c:
        c.get_json("Patient")
    assert sleeps == [5.0]


def test_gives_up_after_max_attempts_with_a_clear_error() -> None:
    transport, seen = scripted([httpx.Response(503, json={"resourceType": "OperationOutcome", "issue": []})])
    sleeps: list[float] = []
    with make_client(transport, sleeps, max_attempts=3) as c, pytest.raises(FhirHttpError) as e:
        c.get_json("Patient")
    assert e.value.status == 503 and e.value.code == "FHIR-004"
    assert len(seen) == 3 and len(sleeps) == 2


def test_4xx_is_not_retried() -> None:
    transport, seen = scripted([httpx.Response(404, json={"resourceType": "OperationOutcome", "issue": []})])
    sleeps: list[float] = []
    with make_client(transport, sleeps) as c, pytest.raises(FhirHttpError):
        c.get_json("Patient/nope")
    assert len(seen) == 1 and sleeps == []


def test_network_errors_retry_reads_but_not_writes() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        raise httpx.ConnectError("refused", request=request)

    sleeps: list[float] = []
    with make_client(httpx.MockTransport(handler), sleeps, max_attempts=3) as c:
        with pytest.raises(FhirConnectionError):
            c.get_json("Patient")
        assert calls == ["GET"] * 3
        calls.clear()
        with pytest.raises(FhirConnectionError):
            c.transaction({"resourceType": "Bundle", "type": "transaction", "entry": []})
        assert calls == ["POST"]


def test_timeout_is_reported_as_connection_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with make_client(httpx.MockTransport(handler), [], max_attempts=1) as c, pytest.raises(FhirConnectionError) as e:
        c.get_json("Patient")
    assert "timed out" in e.value.message
