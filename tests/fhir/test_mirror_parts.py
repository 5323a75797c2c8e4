"""The mirror's pure parts: what a spec needs, instants and history entries, the CapabilityStatement, and
the SQLite store feeding the feature builder."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qsl

import orjson
import pytest

from fhir_adapters.capabilities import (
    base_url_candidates,
    check_fhir_version,
    export_level,
    release_name,
    supports_type_history,
)
from fhir_adapters.errors import FhirVersionError, MirrorError
from fhir_adapters.features import build_feature_table
from fhir_adapters.featurespec import FeatureSpec
from fhir_adapters.mirror import MirrorSource, MirrorStore
from fhir_adapters.needs import TypeNeed, merge_needs, needs_for, token_text
from fhir_adapters.sources import NdjsonDirSource
from fhir_adapters.sync import (
    TypeState,
    format_instant,
    history_event,
    instant_us,
    is_subsetted,
    newest_events,
    server_time,
    version_key,
)
from fhir_adapters.synthetic import Hospital

LOINC = "http://loinc.org"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"


def obs(code: str, system: str = LOINC, **kw: object) -> dict:
    return {"resourceType": "Observation", "id": "o", "code": {"coding": [{"system": system, "code": code}]}, **kw}


# ---------------- needs ----------------


def test_needs_of_a_spec(synth_spec: FeatureSpec) -> None:
    needs = needs_for(synth_spec)
    assert set(needs) == {"Patient", "Observation", "Condition"}
    assert needs["Patient"].everything
    assert needs["Observation"].tokens == {(c.system, c.code) for f in synth_spec.features for c in f.codes}
    # ICD-10 label codes match by prefix: the whole system is asked for; SNOMED exactly
    assert needs["Condition"].tokens == {("http://snomed.info/sct", "44054006"), (ICD10CM, None)}
    assert needs["Condition"].search_params() == [[("code", f"{ICD10CM}|,http://snomed.info/sct|44054006")]]


def test_search_params_are_chunked_and_escaped() -> None:
    need = TypeNeed("Observation", "code", frozenset((LOINC, f"{i:04d}-0") for i in range(100)))
    chunks = need.search_params(max_chars=300)
    assert len(chunks) > 1 and all(len(c[0][1]) <= 300 for c in chunks)
    tokens = [t for c in chunks for t in c[0][1].split(",")]
    assert sorted(tokens) == need.token_texts() and len(tokens) == 100
    assert token_text(("http://x", "a,b|c")) == "http://x|a\\,b\\|c" and token_text((None, "x")) == "x"


def test_type_filter_is_one_encoded_query() -> None:
    need = TypeNeed("Observation", "code", frozenset({(LOINC, "2339-0"), (LOINC, "8302-2")}))
    tf = need.type_filter()
    assert tf is not None and "," not in tf  # _typeFilter lists queries with commas: none inside one
    rtype, _, query = tf.partition("?")
    assert rtype == "Observation" and parse_qsl(query) == [("code", f"{LOINC}|2339-0,{LOINC}|8302-2")]
    assert TypeNeed("Patient").type_filter() is None


def test_matches_follows_token_search() -> None:
    need = TypeNeed(
        "Condition", "code", frozenset({(ICD10CM, None), ("http://snomed.info/sct", "44054006"), (None, "X1")})
    )
    cond = {"resourceType": "Condition", "code": {"coding": [{"system": ICD10CM, "code": "E11.9"}]}}
    assert need.matches(cond)  # system|
    assert need.matches({"resourceType": "Condition", "code": {"coding": [{"system": "s", "code": "X1"}]}})  # code
    assert not need.matches({"resourceType": "Condition", "code": {"coding": [{"system": "s", "code": "44054006"}]}})
    assert not need.matches({**cond, "resourceType": "Observation"})
    assert not need.matches({"resourceType": "Condition", "code": "E11"})  # not a CodeableConcept: no match
    assert TypeNeed("Patient").matches({"resourceType": "Patient"})
    many = TypeNeed("Encounter", "type", frozenset({("s", "a")}), element="type")  # a list of concepts
    assert many.matches({"resourceType": "Encounter", "type": [{"coding": [{"system": "s", "code": "a"}]}]})


def test_merged_needs_are_one_search() -> None:
    a = TypeNeed("Observation", "code", frozenset({(LOINC, "1")}))
    b = TypeNeed("Observation", "code", frozenset({(LOINC, "2")}))
    merged = merge_needs([a], [b, TypeNeed("Patient")])
    assert merged["Observation"].tokens == {(LOINC, "1"), (LOINC, "2")} and "Patient" in merged
    assert a.union(TypeNeed("Observation")).everything
    assert a.signature() != merged["Observation"].signature() == merge_needs([b, a])["Observation"].signature()
    with pytest.raises(ValueError):
        a.union(TypeNeed("Patient"))


# ---------------- instants, state, history ----------------


def test_instants() -> None:
    when = datetime(2024, 3, 1, 12, 0, 5, 123999, tzinfo=UTC)
    assert format_instant(when) == "2024-03-01T12:00:05.123Z"  # rounded down: ge it never misses `when`
    assert instant_us("2024-03-01T13:00:05.123+01:00") == instant_us("2024-03-01T12:00:05.123Z")
    assert instant_us("not a time") is None and instant_us(None) is None
    assert server_time({"meta": {"lastUpdated": "2024-03-01T12:00:05.123Z"}}, {}) == datetime(
        2024, 3, 1, 12, 0, 5, 123000, tzinfo=UTC
    )
    # the Date header has whole seconds (and may lag): a second earlier
    assert server_time({}, {"date": "Fri, 01 Mar 2024 12:00:05 GMT"}) == datetime(2024, 3, 1, 12, 0, 4, tzinfo=UTC)
    assert server_time({}, {}) is None


def test_state_after_a_pass() -> None:
    t0 = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
    s = TypeState("sig").after_pass(t0, timedelta(seconds=10))
    assert (s.since, s.history_since, s.passes) == ("2024-03-01T11:59:50.000Z", "2024-03-01T12:00:00.000Z", 1)
    assert TypeState.from_json(s.to_json()) == s
    assert s.after_pass(None, timedelta(seconds=10)) == TypeState("sig", s.since, s.history_since, 2)


def test_history_entries() -> None:
    # as SEKMET writes them: a deletion has no resource, its id is in request.url
    deleted = {
        "fullUrl": "http://x/fhir/Observation/o3",
        "request": {"method": "DELETE", "url": "Observation/o3"},
        "response": {"status": "204 No Content", "etag": 'W/"2"', "lastModified": "2024-01-01T00:00:02.000Z"},
    }
    ev = history_event(deleted)
    assert ev is not None and (ev.resource_type, ev.id, ev.version, ev.deleted) == ("Observation", "o3", "2", True)
    put = {
        "resource": {"resourceType": "Observation", "id": "o3", "meta": {"versionId": "1"}},
        "request": {"method": "PUT", "url": "Observation/o3"},
        "response": {"status": "200 OK", "etag": 'W/"1"', "lastModified": "2024-01-01T00:00:01.000Z"},
    }
    old = history_event(put)
    assert old is not None and not old.deleted and old.resource is not None
    # another server's deletion: status 410, versioned URL, no method
    gone = history_event({"request": {"url": "Condition/c1/_history/4"}, "response": {"status": "410 Gone"}})
    assert gone is not None and (gone.resource_type, gone.id, gone.deleted) == ("Condition", "c1", True)
    assert history_event({"response": {"status": "200"}}) is None
    assert newest_events([old, ev])["o3"].deleted and newest_events([ev, old])["o3"].deleted  # time decides


def test_subsetted_and_versions() -> None:
    tag = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}
    assert is_subsetted({"resourceType": "Observation", "id": "a", "meta": {"tag": [tag]}, "status": "final"})
    assert is_subsetted({"resourceType": "Observation", "id": "a", "meta": {"versionId": "1"}})
    assert not is_subsetted(obs("x", status="final"))
    assert version_key({"meta": {"versionId": "3", "lastUpdated": "t"}}) == "3"
    assert version_key({"meta": {"lastUpdated": "t"}}) == "t" and version_key({}) == ""


# ---------------- CapabilityStatement ----------------


@pytest.mark.parametrize(
    ("cs", "named"),
    [
        ({"resourceType": "Conformance", "fhirVersion": "1.0.2"}, "DSTU2 (1.0.2"),
        ({"resourceType": "Conformance"}, "DSTU2 (no fhirVersion"),
        ({"resourceType": "CapabilityStatement", "fhirVersion": "3.0.2"}, "STU3 (3.0.2)"),
        ({"resourceType": "CapabilityStatement", "fhirVersion": "5.0.0"}, "R5 (5.0.0)"),
        ({"resourceType": "CapabilityStatement", "fhirVersion": "4.6.0"}, "R5 draft (4.6.0)"),
        ({"resourceType": "CapabilityStatement"}, "(no fhirVersion)"),
    ],
)
def test_versions_are_named(cs: dict, named: str) -> None:
    with pytest.raises(FhirVersionError) as e:
        check_fhir_version(cs)
    assert named in e.value.message and "not R4" in e.value.message and "R4" in e.value.hint


def test_release_names() -> None:
    assert [release_name(v) for v in ("4.0.1", "4.3.0", "1.0.2", "3.0.1", "5.0.0", "0.0.82", "9")] == [
        "R4",
        "R4B",
        "DSTU2",
        "STU3",
        "R5",
        "DSTU1",
        "",
    ]


def test_what_the_capability_statement_offers() -> None:
    cs = {
        "rest": [
            {
                "mode": "server",
                "resource": [
                    {"type": "Observation", "interaction": [{"code": "search-type"}, {"code": "history-type"}]},
                    {"type": "Patient", "interaction": [{"code": "read"}], "operation": [{"name": "export"}]},
                ],
            }
        ]
    }
    assert supports_type_history(cs, "Observation") and not supports_type_history(cs, "Patient")
    assert not supports_type_history(cs, "Condition")
    assert export_level(cs) == "patient"
    cs["rest"][0]["operation"] = [{"name": "export"}]
    assert export_level(cs) == "system" and export_level({}) is None


def test_base_url_candidates() -> None:
    assert base_url_candidates("https://h.example/") == [
        "https://h.example/fhir",
        "https://h.example/R4",
        "https://h.example/baseR4",
        "https://h.example/fhir/R4",
    ]
    assert "https://h.example/fhir" in base_url_candidates("https://h.example/metadata")


# ---------------- the store ----------------


def test_store_rows_versions_and_state(tmp_path: Path) -> None:
    with MirrorStore(tmp_path / "m.sqlite3") as store:
        with store.write():
            store.upsert("Observation", [("a", "1", 10, b'{"id":"a"}'), ("b", "1", 20, b'{"id":"b"}')])
            store.set_state("Observation", TypeState("sig", "x", "y", 1))
        assert store.versions("Observation", ["a", "b", "zz"]) == {"a": "1", "b": "1"}
        with store.write():
            store.upsert("Observation", [("a", "2", 30, b'{"id":"a","v":2}')])
            assert store.delete("Observation", ["b", "zz"]) == 1
        assert store.keys("Observation") == {"a": "2"} and list(store.bodies("Observation")) == [b'{"id":"a","v":2}']
        assert store.count("Observation") == 1 and store.count("Observation", before_us=30) == 0
        with pytest.raises(RuntimeError), store.write():  # a failed transaction leaves nothing behind
            store.upsert("Patient", [("p", "1", 1, b"{}")])
            raise RuntimeError
        assert store.counts() == {"Observation": 1}
    with MirrorStore(tmp_path / "m.sqlite3") as store:  # durable
        assert store.state("Observation") == TypeState("sig", "x", "y", 1) and store.state("Patient") is None
    assert (tmp_path / "m.sqlite3").stat().st_mode & 0o077 == 0  # patient data: owner only


def test_a_file_that_is_not_a_mirror_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "m.sqlite3"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(MirrorError) as e:
        MirrorStore(bad)
    assert e.value.code == "FHAI-F302" and "delete the file" in e.value.hint


def test_mirror_source_gives_the_table_of_the_files(
    tmp_path: Path, hospitals: list[Hospital], synth_spec: FeatureSpec
) -> None:
    h = hospitals[1]  # glucose in mmol/L, weights in [lb_av]
    h.write_ndjson(tmp_path / "files")
    with MirrorStore(tmp_path / "m.sqlite3") as store, store.write():
        for rtype, items in (("Patient", h.patients), ("Observation", h.observations), ("Condition", h.conditions)):
            store.upsert(rtype, [(r["id"], "1", None, orjson.dumps(r)) for r in items])
    source = MirrorSource(tmp_path / "m.sqlite3")
    table = build_feature_table(source, synth_spec)
    assert table.equals(build_feature_table(NdjsonDirSource(tmp_path / "files"), synth_spec))
    assert table.report.as_dict() == build_feature_table(h, synth_spec).report.as_dict()
    assert sum(1 for _ in source.iter_resources(["Patient"])) == h.n_patients
