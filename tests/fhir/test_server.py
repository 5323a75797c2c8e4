"""End to end against a real SEKMET FHIR R4 server."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fhir_adapters.auth import BearerAuth, SmartBackendAuth
from fhir_adapters.bulk import BulkExportClient, BulkExportSource
from fhir_adapters.client import FhirClient, check_fhir_version
from fhir_adapters.errors import FhirAuthError, FhirBaseUrlError, FhirConnectionError, FhirVersionError
from fhir_adapters.features import build_feature_table
from fhir_adapters.featurespec import FeatureSpec
from fhir_adapters.listing import ChangeListing
from fhir_adapters.needs import needs_for
from fhir_adapters.sources import BundleDirSource, FhirSearchSource
from fhir_adapters.synthetic import Hospital
from fhir_adapters.validation import IngestReport
from tests.fixtures.sekmet import SekmetServer, sekmet_server

from .conftest import SYNTHEA_DIR


def test_capabilities_are_r4(client: FhirClient) -> None:
    cs = client.capabilities()
    assert cs["fhirVersion"].startswith("4.0.")
    assert check_fhir_version(cs) == cs["fhirVersion"]


@pytest.mark.parametrize("version", ["5.0.0", "3.0.2", "1.0.2", None])
def test_refuses_servers_that_are_not_r4(version: str | None) -> None:
    cs = {"resourceType": "CapabilityStatement", "fhirVersion": version}
    with pytest.raises(FhirVersionError) as e:
        check_fhir_version(cs)
    assert e.value.code == "FHIR-002" and "R4" in e.value.hint
    check_fhir_version({**cs, "fhirVersion": "4.3.0"})  # R4B is fine


def test_refuses_an_endpoint_that_is_not_fhir(synth_server: SekmetServer) -> None:
    # SEKMET's SMART discovery document is JSON but not a CapabilityStatement
    with FhirClient(f"{synth_server.root_url}/.well-known/smart-configuration#") as c:
        c.base_url = f"{synth_server.root_url}/.well-known/smart-configuration?x="
        with pytest.raises(FhirBaseUrlError) as e:
            c.capabilities()
    assert "not a CapabilityStatement" in e.value.message


def test_a_server_root_is_named_as_not_the_base_url(synth_server: SekmetServer) -> None:
    """The root of the server answers 404 on /metadata: the error says so and names the base that works."""
    with (
        FhirClient(synth_server.root_url, auth=BearerAuth(synth_server.token or "")) as c,
        pytest.raises(FhirBaseUrlError) as e,
    ):
        c.capabilities()
    assert e.value.code == "FHAI-F301"
    assert "probably not the FHIR base URL" in e.value.message and "404" in e.value.message
    assert f"use {synth_server.base_url} " in e.value.hint and "4.0.1" in e.value.hint
    assert "retry later" not in e.value.one_line()


def test_paging_follows_the_servers_next_links(client: FhirClient, hospitals: list[Hospital]) -> None:
    requested: list[str] = []
    client.http.event_hooks["request"].append(lambda req: requested.append(str(req.url)))
    pages = list(client.search_pages("Observation", {"_sort": "_id"}, count=97))
    expected = len(hospitals[0].observations)
    assert len(pages) == math.ceil(expected / 97) >= 15
    # every page after the first was fetched from exactly the previous page's next link
    for prev, url in zip(pages, requested[1:], strict=False):
        nxt = next(link["url"] for link in prev["link"] if link["relation"] == "next")
        assert httpx.URL(url) == httpx.URL(nxt)
    ids = [e["resource"]["id"] for p in pages for e in p.get("entry", [])]
    assert len(ids) == len(set(ids)) == expected
    assert set(ids) == {o["id"] for o in hospitals[0].observations}


def test_search_with_parameters(client: FhirClient, hospitals: list[Hospital]) -> None:
    males = list(client.search("Patient", [("gender", "male")], count=40))
    assert len(males) == sum(1 for p in hospitals[0].patients if p["gender"] == "male")
    bps = list(client.search("Observation", {"code": "http://loinc.org|85354-9"}, count=200))
    assert bps and all(o["code"]["coding"][0]["code"] == "85354-9" for o in bps)


def test_401_without_or_with_a_wrong_token(synth_server: SekmetServer) -> None:
    with FhirClient(synth_server.base_url) as c, pytest.raises(FhirAuthError) as e:
        list(c.search("Patient"))
    assert e.value.code == "FHIR-003" and "401" in e.value.message
    with FhirClient(synth_server.base_url, auth=BearerAuth("wrong")) as c, pytest.raises(FhirAuthError):
        c.get_json("Patient")
    with FhirClient(synth_server.base_url, auth=BearerAuth(synth_server.token or "")) as c:
        assert c.get_json("Patient", {"_count": "1"})["total"] == 150


def test_connection_refused_is_a_clear_error() -> None:
    from tests.fixtures.sekmet import free_port

    url = f"http://127.0.0.1:{free_port()}/fhir"
    with FhirClient(url, sleep=lambda s: None) as c, pytest.raises(FhirConnectionError) as e:
        c.capabilities()
    assert "unreachable" in e.value.message and e.value.hint


def test_listing_from_a_cursor_yields_only_new_records(hospitals: list[Hospital]) -> None:
    h = hospitals[2]
    bundles = list(h.transaction_bundles(patients_per_bundle=20))
    first, second = bundles[:2], bundles[2:]

    def ids(bs: list[dict]) -> set[str]:
        return {e["resource"]["id"] for b in bs for e in b["entry"] if e["resource"]["resourceType"] == "Observation"}

    with sekmet_server() as srv, FhirClient(srv.base_url, auth=BearerAuth(srv.token or "")) as c:
        for b in first:
            c.transaction(b)
        listing = ChangeListing(c, "Observation", count=13)  # many resources share a millisecond: pages split them
        got1 = list(listing)
        assert sorted(r["id"] for r in got1) == sorted(ids(first))  # each once
        assert listing.server_time is not None and listing.ordered and listing.total == len(got1)
        stamps = [r["meta"]["lastUpdated"] for r in got1]
        assert stamps == sorted(stamps)  # oldest first
        since = stamps[-1]
        for b in second:
            c.transaction(b)
        got2 = [r["id"] for r in ChangeListing(c, "Observation", since=since, count=13)]
        # the new ones and those stamped in the cursor's own millisecond (`ge`), each once
        assert sorted(got2) == sorted(ids(second) | {r["id"] for r in got1 if r["meta"]["lastUpdated"] == since})


def test_bulk_export_table_equals_search_table(
    client: FhirClient, hospitals: list[Hospital], synth_spec: FeatureSpec
) -> None:
    progress: list[str] = []
    source = BulkExportSource(client, level="patient")
    source.bulk.on_progress = progress.append
    via_bulk = build_feature_table(source, synth_spec)
    via_search = build_feature_table(FhirSearchSource(client, count=500), synth_spec)
    assert via_bulk.equals(via_search)
    assert via_bulk.equals(build_feature_table(hospitals[0], synth_spec))
    assert via_bulk.n_rows == 150 and via_bulk.report.total_rejected == 0
    assert source.manifest is not None and source.manifest.requires_access_token
    assert {f.type for f in source.manifest.output} == {"Patient", "Observation", "Condition"}
    assert progress  # X-Progress was read while polling


def test_bulk_files_need_the_token_when_the_manifest_says_so(client: FhirClient) -> None:
    bulk = BulkExportClient(client)
    manifest = bulk.export("system", types=["Patient"])
    rep = IngestReport()
    assert len(list(bulk.iter_resources(manifest, rep))) == 150
    lying = replace(manifest, requires_access_token=False)
    with pytest.raises(FhirAuthError):
        list(bulk.iter_resources(lying, rep))


def test_group_export_only_exports_members(client: FhirClient, hospitals: list[Hospital]) -> None:
    members = [p["id"] for p in hospitals[0].patients[:3]]
    group = {
        "resourceType": "Group",
        "id": "cohort-1",
        "type": "person",
        "actual": True,
        "member": [{"entity": {"reference": f"Patient/{m}"}} for m in members],
    }
    client.send("PUT", "Group/cohort-1", json=group)
    bulk = BulkExportClient(client)
    manifest = bulk.export("group", group_id="cohort-1", types=["Patient", "Observation"])
    res = list(bulk.iter_resources(manifest, IngestReport()))
    assert {r["id"] for r in res if r["resourceType"] == "Patient"} == set(members)
    assert {r["subject"]["reference"] for r in res if r["resourceType"] == "Observation"} == {
        f"Patient/{m}" for m in members
    }


def test_synthea_table_over_search_equals_table_from_files(
    synthea_server: SekmetServer, synthea_spec: FeatureSpec
) -> None:
    from_files = build_feature_table(BundleDirSource(SYNTHEA_DIR), synthea_spec)
    with FhirClient(synthea_server.base_url, auth=BearerAuth(synthea_server.token or ""), timeout=60) as c:
        source = FhirSearchSource(c, needs=needs_for(synthea_spec), count=1000)
        over_search = build_feature_table(source, synthea_spec)
    assert from_files.n_rows == over_search.n_rows == 102  # 3 of 105 were born after the index date
    assert int(from_files.y.sum()) == 7
    assert from_files.equals(over_search)
    assert over_search.report.accepted["Observation"] == from_files.report.accepted["Observation"]


# ---------------- SMART Backend Services ----------------


def _keys(tmp: Path) -> dict[str, tuple[bytes, dict]]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP384R1())
    out = {}
    for name, key, alg in (("rs", rsa_key, "RS384"), ("es", ec_key, "ES384")):
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        algo = jwt.get_algorithm_by_name(alg)
        jwk = algo.to_jwk(key.public_key(), as_dict=True)
        jwk.update({"kid": f"{name}-1", "alg": alg, "use": "sig"})
        out[name] = (pem, jwk)
    return out


@pytest.fixture(scope="module")
def smart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SekmetServer, dict[str, tuple[bytes, dict]]]]:
    keys = _keys(tmp_path_factory.mktemp("keys"))
    clients = [
        {"client_id": f"fhai-{n}", "jwks": {"keys": [jwk]}, "scopes": "system/*.read"} for n, (_, jwk) in keys.items()
    ]
    with sekmet_server(auth_types=("smart",), token=None, smart_clients=clients, token_lifetime=30) as srv:
        yield srv, keys


@pytest.mark.parametrize(("name", "alg"), [("rs", "RS384"), ("es", "ES384")])
def test_smart_backend_services(smart: tuple[SekmetServer, dict], name: str, alg: str) -> None:
    srv, keys = smart
    pem, jwk = keys[name]
    auth = SmartBackendAuth(f"fhai-{name}", pem, base_url=srv.base_url, alg=alg, kid=jwk["kid"])
    with FhirClient(srv.base_url, auth=auth) as c:
        assert c.get_json("Patient", {"_count": "1"})["resourceType"] == "Bundle"
        c.get_json("Patient", {"_count": "1"})
        assert auth.tokens_fetched == 1  # reused while valid
        assert auth.token_url == f"{srv.root_url}/auth/token"  # discovered from .well-known


def test_smart_token_is_refreshed_before_expiry(smart: tuple[SekmetServer, dict]) -> None:
    srv, keys = smart
    now = [1000.0]
    real_offset = __import__("time").time() - 1000.0 - 30  # stays behind real time: servers refuse a future iat
    auth = SmartBackendAuth(
        "fhai-rs",
        keys["rs"][0],
        base_url=srv.base_url,
        kid="rs-1",
        refresh_margin=5,
        assertion_lifetime=200,
        clock=lambda: now[0] + real_offset,
    )
    with FhirClient(srv.base_url, auth=auth) as c:
        c.get_json("Patient")
        now[0] += 20  # 30 s lifetime, 5 s margin: still fresh
        c.get_json("Patient")
        assert auth.tokens_fetched == 1
        now[0] += 6  # inside the margin: fetch a new one before the old expires
        c.get_json("Patient")
        assert auth.tokens_fetched == 2


def test_smart_401_triggers_one_refresh(smart: tuple[SekmetServer, dict]) -> None:
    srv, keys = smart
    auth = SmartBackendAuth("fhai-es", keys["es"][0], base_url=srv.base_url, alg="ES384", kid="es-1")
    with FhirClient(srv.base_url, auth=auth) as c:
        c.get_json("Patient")
        auth._token = "revoked-or-expired"  # the server no longer honours our cached token
        c.get_json("Patient")
        assert auth.tokens_fetched == 2


def test_smart_with_an_unregistered_key_is_refused(smart: tuple[SekmetServer, dict]) -> None:
    srv, keys = smart
    auth = SmartBackendAuth("fhai-rs", keys["es"][0], base_url=srv.base_url, alg="ES384")
    with FhirClient(srv.base_url, auth=auth) as c, pytest.raises(FhirAuthError) as e:
        c.get_json("Patient")
    assert "token request refused" in e.value.message
