"""The edge mirror against a real SEKMET server: it pulls only what the spec needs, converges to the server
(deletions, updates while a pass pages, records leaving the search), and an unchanged resync reads no
Observation bodies."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from fhir_adapters.auth import BearerAuth
from fhir_adapters.client import FhirClient
from fhir_adapters.features import build_feature_table
from fhir_adapters.featurespec import FeatureSpec
from fhir_adapters.listing import ChangeListing
from fhir_adapters.mirror import MirrorSource, MirrorStore
from fhir_adapters.mirror_sync import MirrorSync, SyncOptions, SyncReport
from fhir_adapters.needs import TypeNeed, needs_for
from fhir_adapters.sources import FhirSearchSource
from fhir_adapters.sync import is_subsetted
from fhir_adapters.synthetic import Hospital, generate_hospitals
from tests.fixtures.sekmet import SekmetServer, start_sekmet

SEARCH = SyncOptions(bulk="never", page_size=40)


@pytest.fixture(scope="module")
def hospital() -> Hospital:
    return generate_hospitals(1, seed=17, sizes=[36])[0]


@pytest.fixture(scope="module")
def server(hospital: Hospital) -> Iterator[SekmetServer]:
    """One server for the module, loaded with one synthetic hospital. Tests delete and update records on it,
    so each checks its mirror against what the server holds now, not against the hospital's files."""
    s = start_sekmet()
    try:
        with FhirClient(s.base_url, auth=BearerAuth(s.token or "")) as c:
            hospital.load_into(c, patients_per_bundle=36)
        yield s
    finally:
        s.stop()


@pytest.fixture()
def client(server: SekmetServer) -> Iterator[FhirClient]:
    with FhirClient(server.base_url, auth=BearerAuth(server.token or "")) as c:
        yield c


def server_rows(client: FhirClient, needs: dict[str, TypeNeed]) -> dict[tuple[str, str], str]:
    """(type, id) -> versionId of everything the needs select, searched afresh."""
    src = FhirSearchSource(client, needs=needs, count=1000)
    return {(r["resourceType"], r["id"]): r["meta"]["versionId"] for r in src.iter_resources()}


def mirror_rows(path: Path) -> dict[tuple[str, str], str]:
    out = {}
    for lines in MirrorSource(path).iter_files(["Patient", "Observation", "Condition"]):
        for line in lines:
            r = orjson.loads(line)
            out[(r["resourceType"], r["id"])] = r["meta"]["versionId"]
    return out


def sync(client: FhirClient, path: Path, spec: FeatureSpec, options: SyncOptions = SEARCH, **kw: Any) -> SyncReport:
    with MirrorStore(path) as store:
        return MirrorSync(client, store, needs_for(spec), options, **kw).run()


def assert_converged(client: FhirClient, path: Path, spec: FeatureSpec) -> None:
    """The mirror holds exactly what the server answers for the spec, and gives the same feature table."""
    assert mirror_rows(path) == server_rows(client, needs_for(spec))
    via_server = build_feature_table(FhirSearchSource(client, needs=needs_for(spec)), spec)
    assert build_feature_table(MirrorSource(path), spec).equals(via_server)


def put(client: FhirClient, res: dict[str, Any]) -> None:
    client.send("PUT", f"{res['resourceType']}/{res['id']}", json=res)


@pytest.mark.parametrize("bulk", ["never", "always"])
def test_first_sync_pulls_only_what_the_spec_needs(
    tmp_path: Path, client: FhirClient, hospital: Hospital, synth_spec: FeatureSpec, bulk: str
) -> None:
    extra = {  # an Observation of a code no feature uses: the server has it, the mirror must not
        "resourceType": "Observation",
        "id": "not-needed",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
        "subject": {"reference": f"Patient/{hospital.patients[0]['id']}"},
        "effectiveDateTime": "2019-05-01",
        "valueQuantity": {"value": 13.1, "unit": "g/dL", "system": "http://unitsofmeasure.org", "code": "g/dL"},
    }
    put(client, extra)
    path = tmp_path / "mirror.sqlite3"
    report = sync(client, path, synth_spec, SyncOptions(bulk=bulk, page_size=40))  # type: ignore[arg-type]
    assert report.bulk == (bulk == "always")  # SEKMET offers $export
    assert ("Observation", "not-needed") not in mirror_rows(path)
    on_server = sum(1 for _ in client.search("Observation", count=1000))
    assert report.types["Observation"].rows == len(
        server_rows(client, {"Observation": needs_for(synth_spec)["Observation"]})
    )
    assert 0 < report.types["Observation"].rows < on_server
    assert_converged(client, path, synth_spec)


def test_deleted_records_leave_the_mirror(tmp_path: Path, client: FhirClient, synth_spec: FeatureSpec) -> None:
    path = tmp_path / "mirror.sqlite3"
    sync(client, path, synth_spec)
    before = build_feature_table(MirrorSource(path), synth_spec)
    conditions = list(FhirSearchSource(client, needs=needs_for(synth_spec)).iter_resources(["Condition"]))
    by_patient = [c["subject"]["reference"].split("/")[1] for c in conditions]
    label, pid = next(  # a positive patient with a single label Condition
        (c, p)
        for c, p in zip(conditions, by_patient, strict=True)
        if by_patient.count(p) == 1 and before.y[before.patient_ids.index(p)] == 1
    )
    obs = next(iter(FhirSearchSource(client, needs=needs_for(synth_spec)).iter_resources(["Observation"])))
    client.send("DELETE", f"Condition/{label['id']}", ok=(200, 204))
    client.send("DELETE", f"Observation/{obs['id']}", ok=(200, 204))
    report = sync(client, path, synth_spec)
    assert report.types["Condition"].deleted == 1 and report.types["Observation"].deleted == 1
    assert not report.types["Condition"].swept  # history said so; no sweep was needed
    rows = mirror_rows(path)
    assert ("Condition", label["id"]) not in rows and ("Observation", obs["id"]) not in rows
    after = build_feature_table(MirrorSource(path), synth_spec)
    assert after.y[after.patient_ids.index(pid)] == 0  # the device no longer trains on a deleted diagnosis
    assert_converged(client, path, synth_spec)


def test_without_history_the_count_check_finds_deletions(
    tmp_path: Path, client: FhirClient, synth_spec: FeatureSpec
) -> None:
    """A server whose CapabilityStatement offers no _history: the count check notices and a sweep removes."""
    cs = client.capabilities()
    for rest in cs["rest"]:
        for res in rest["resource"]:
            res["interaction"] = [i for i in res["interaction"] if i["code"] != "history-type"]
    path = tmp_path / "mirror.sqlite3"
    sync(client, path, synth_spec)
    obs = next(iter(FhirSearchSource(client, needs=needs_for(synth_spec)).iter_resources(["Observation"])))
    client.send("DELETE", f"Observation/{obs['id']}", ok=(200, 204))
    requested: list[str] = []
    client.http.event_hooks["request"].append(lambda req: requested.append(str(req.url)))
    report = sync(client, path, synth_spec)
    assert not any("_history" in u for u in requested)
    assert report.types["Observation"].swept and report.types["Observation"].deleted == 1
    assert not report.types["Patient"].swept  # counts agree: no sweep
    assert_converged(client, path, synth_spec)


def test_a_record_that_leaves_the_search_leaves_the_mirror(
    tmp_path: Path, client: FhirClient, synth_spec: FeatureSpec
) -> None:
    """An Observation recoded to a code the spec does not use: history shows its new version, which no
    longer matches, so the mirror drops it (the filtered search alone would never return it again)."""
    path = tmp_path / "mirror.sqlite3"
    sync(client, path, synth_spec)
    obs = next(iter(FhirSearchSource(client, needs=needs_for(synth_spec)).iter_resources(["Observation"])))
    obs["code"] = {"coding": [{"system": "http://loinc.org", "code": "718-7"}]}
    put(client, obs)
    report = sync(client, path, synth_spec)
    assert ("Observation", obs["id"]) not in mirror_rows(path)
    assert report.types["Observation"].deleted == 1 and not report.types["Observation"].swept
    assert_converged(client, path, synth_spec)


def test_a_listing_does_not_skip_records_when_one_is_updated_mid_pass(client: FhirClient) -> None:
    """Offset paging would skip one record here: the updated one moves to the end and the rest move up."""
    everything = {r["id"] for r in client.search("Observation", count=1000)}
    listing = ChangeListing(client, "Observation", count=25)
    seen: list[str] = []
    moved = ""
    for i, page in enumerate(listing.pages()):
        seen += [r["id"] for r in page]
        if i == 0:
            moved = page[0]["id"]
            obs = client.get_json(f"Observation/{moved}")
            obs["status"] = "amended"
            put(client, obs)
    assert set(seen) == everything
    assert seen.count(moved) == 2  # the old version, then the new one at the end


@pytest.mark.parametrize("first", [True, False])
def test_a_sync_pass_loses_nothing_updated_while_it_pages(
    tmp_path: Path, client: FhirClient, synth_spec: FeatureSpec, first: bool
) -> None:
    """Records are updated while the pass pages through Observations (on the first pass, and on an
    increment); the pass itself gets everything right, with no sweep to repair it."""
    path = tmp_path / "mirror.sqlite3"
    if not first:
        sync(client, path, synth_spec)
        for o in list(FhirSearchSource(client, needs=needs_for(synth_spec)).iter_resources(["Observation"]))[:120]:
            o["status"] = "amended"  # 120 changed records: three pages of 40 to list in the increment
            put(client, o)
    # the first records in the server's order: on the first page of the pass
    targets = list(FhirSearchSource(client, needs=needs_for(synth_spec)).iter_resources(["Observation"]))[:3]
    pages = 0

    def on_progress(rtype: str, phase: str, done: int, total: int | None) -> None:
        nonlocal pages
        if rtype == "Observation" and phase == "list":
            pages += 1
            if pages == 1:  # after the first page: update records of every part of the order
                for o in targets:
                    current = client.get_json(f"Observation/{o['id']}")
                    current["valueQuantity"]["value"] = current["valueQuantity"]["value"] + 1
                    put(client, current)

    report = sync(client, path, synth_spec, on_progress=on_progress)
    assert pages >= 3
    assert not report.types["Observation"].swept
    assert_converged(client, path, synth_spec)
    assert sync(client, path, synth_spec).changed()["Observation"] == 0  # and nothing was left for next time


def test_an_unchanged_resync_reads_no_observation_bodies(
    tmp_path: Path, client: FhirClient, synth_spec: FeatureSpec
) -> None:
    path = tmp_path / "mirror.sqlite3"
    sync(client, path, synth_spec, SyncOptions(page_size=40, bulk="always"))  # first sync by Bulk $export
    sync(client, path, synth_spec)  # the pass that covers what changed while exporting
    bodies: list[str] = []

    def count_bodies(resp: httpx.Response) -> None:  # every Observation that crosses the wire whole
        resp.read()
        try:
            doc = orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            return
        for e in doc.get("entry") or () if isinstance(doc, dict) else ():
            r = e.get("resource") or {}
            if r.get("resourceType") == "Observation" and not is_subsetted(r):
                bodies.append(r["id"])

    client.http.event_hooks["response"].append(count_bodies)
    report = sync(client, path, synth_spec)
    assert bodies == []
    assert report.types["Observation"].bodies == 0 and report.changed() == {
        "Patient": 0,
        "Observation": 0,
        "Condition": 0,
    }
    assert report.types["Observation"].listed > 0  # the overlap window was listed, as ids only
    # one change: exactly its body comes
    obs = next(iter(FhirSearchSource(client, needs=needs_for(synth_spec)).iter_resources(["Observation"])))
    obs["status"] = "amended"
    put(client, obs)
    bodies.clear()
    report = sync(client, path, synth_spec)
    assert report.changed()["Observation"] == 1 and set(bodies) == {obs["id"]}
    assert_converged(client, path, synth_spec)


def test_a_spec_that_needs_more_pulls_the_type_again(
    tmp_path: Path, client: FhirClient, synth_spec: FeatureSpec
) -> None:
    path = tmp_path / "mirror.sqlite3"
    narrow = synth_spec.model_copy(update={"features": synth_spec.features[:1]})
    sync(client, path, narrow)
    n_narrow = sum(1 for t, _ in mirror_rows(path) if t == "Observation")
    report = sync(client, path, synth_spec)
    assert report.types["Observation"].written > 0 and report.types["Patient"].written == 0
    assert sum(1 for t, _ in mirror_rows(path) if t == "Observation") > n_narrow
    assert_converged(client, path, synth_spec)


def test_auto_takes_bulk_only_for_a_large_first_sync(
    tmp_path: Path, client: FhirClient, synth_spec: FeatureSpec
) -> None:
    small = sync(client, tmp_path / "a.sqlite3", synth_spec, SyncOptions(bulk="auto"))
    assert not small.bulk  # a few hundred resources: quicker by search
    large = sync(client, tmp_path / "b.sqlite3", synth_spec, SyncOptions(bulk="auto", bulk_min_resources=100))
    assert large.bulk and large.types["Observation"].via == "bulk"
    assert mirror_rows(tmp_path / "a.sqlite3") == mirror_rows(tmp_path / "b.sqlite3")
