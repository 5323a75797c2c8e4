"""The ingest fast paths give exactly what the reference paths give.

- FeatureBuilder's happy path (plain subscripts, see its docstring) against `_extract`, the per-record
  reference reading, on generated Observations with every kind of irregularity: same table, same report.
- add_ndjson (lines parsed in the builder's loop) against iter_ndjson + add_all.
- parse_times (numpy on the bytes) against to_days, and to_days against numpy's own datetime64 parse.
- order_by_patient_value against lexsort; strict mode on ndjson files in a pool against one process.
"""

from __future__ import annotations

import copy
import math
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhir_adapters.features import (
    USED_TYPES,
    FeatureBuilder,
    FeatureTable,
    build_feature_table,
    order_by_patient_value,
    parse_times,
)
from fhir_adapters.featurespec import FeatureSpec, parse_spec
from fhir_adapters.sources import NdjsonDirSource, iter_ndjson
from fhir_adapters.synthetic import generate_hospitals
from fhir_adapters.timeutil import to_days
from fhir_adapters.validation import IngestReport

LOINC = "http://loinc.org"
GLUCOSE, WEIGHT, BP, SYSTOLIC, DIASTOLIC, HR = "2339-0", "29463-7", "85354-9", "8480-6", "8462-4", "8867-4"


def _feature(name: str, code: str, unit: str | None, how: str, **extra: Any) -> dict[str, Any]:
    f: dict[str, Any] = {"name": name, "codes": [{"system": LOINC, "code": code}], "aggregation": how, **extra}
    if unit:
        f["unit"] = unit
    return f


def _spec(features: list[dict[str, Any]]) -> FeatureSpec:
    return parse_spec(
        {
            "name": "fast",
            "index_date": {"rule": "fixed", "date": "2020-01-01"},
            "lookback_days": 400,
            "features": features,
            "label": {"name": "y", "codes": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
        }
    )


# Single-channel codes (the happy path takes them) ...
HAPPY_SPEC = _spec(
    [
        _feature("glu", GLUCOSE, "mg/dL", "mean", analyte="glucose"),
        _feature("glu_max", GLUCOSE, "mg/dL", "max", analyte="glucose"),
        _feature("weight", WEIGHT, "kg", "latest"),
        _feature("sbp", BP, "mm[Hg]", "mean", component=[{"system": LOINC, "code": SYSTOLIC}]),
    ]
)
# ... and codes that feed several channels or a count (the reference path takes those).
MIXED_SPEC = _spec(
    [
        _feature("glu", GLUCOSE, "mg/dL", "latest", analyte="glucose"),
        _feature("glu_n", GLUCOSE, None, "count"),
        _feature("sbp", BP, "mm[Hg]", "min", component=[{"system": LOINC, "code": SYSTOLIC}]),
        _feature("dbp", BP, "mm[Hg]", "max", component=[{"system": LOINC, "code": DIASTOLIC}]),
        _feature("hr_n", HR, None, "count"),
    ]
)

MISSING = object()  # "leave the element out"

# Each element of an Observation, drawn from the usual shape and from the ways data goes wrong.
ids = st.sampled_from(["o1", "o2", "o3", "o4", "o5", "o6", "o7", "o8", None, 7, MISSING])
statuses = st.sampled_from(["final", "final", "amended", "entered-in-error", "cancelled", None, 5, ["x"], MISSING])
references = st.sampled_from(
    [
        "Patient/a",
        "Patient/a",
        "Patient/b",
        "Patient/ghost",
        "Patient/a/_history/2",
        "http://x/fhir/Patient/b",
        "urn:uuid:c",
        "Group/1",
        "",
        None,
        5,
        MISSING,
    ]
)
subjects = st.one_of(
    references.map(lambda r: {} if r is MISSING else {"reference": r}),
    st.sampled_from([None, "Patient/a", [], MISSING]),
)
times = st.sampled_from(
    [
        "2019-12-01T10:00:00Z",
        "2019-11-02T23:30:00+02:00",
        "2019-10-10",
        "2019-12-31T10:00:00.5Z",
        "2019-12",
        "2020-01-01T00:00:00Z",
        "2020-02-01T00:00:00Z",
        "2019-02-30",
        "yesterday",
        "",
        None,
        5,
    ]
)
effective = st.one_of(
    times.map(lambda t: {"effectiveDateTime": t}),
    times.map(lambda t: {"effectiveInstant": t}),
    times.map(lambda t: {"effectivePeriod": {"start": t}}),
    times.map(lambda t: {"issued": t}),
    st.just({}),
)
codings = st.sampled_from(
    [
        [{"system": LOINC, "code": GLUCOSE}],
        [{"system": LOINC, "code": WEIGHT}],
        [{"system": LOINC, "code": BP}],
        [{"system": LOINC, "code": HR}],
        [{"system": LOINC, "code": "1234-5"}],
        [{"system": LOINC, "code": "1234-5"}, {"system": LOINC, "code": GLUCOSE}],
        [{"system": "http://other", "code": GLUCOSE}],
        [{"system": "http://other", "code": GLUCOSE}, {"system": LOINC, "code": WEIGHT}],
        [{"code": GLUCOSE}],
        [{"system": LOINC, "code": GLUCOSE}, {"system": LOINC, "code": WEIGHT}],
        [],
        [{"system": LOINC, "code": 7}],
        ["text"],
        {"0": {"system": LOINC, "code": GLUCOSE}},
    ]
)
codes = st.one_of(codings.map(lambda c: {"coding": c}), st.sampled_from([None, "2339-0", {}, MISSING]))
values = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.sampled_from([True, "high", None, MISSING]),
)
units = st.sampled_from(["mg/dL", "mg/dL", "mmol/L", "kg", "[lb_av]", "mm[Hg]", "furlong", "", None, 5, MISSING])


@st.composite
def quantities(draw: st.DrawFn) -> Any:
    q: dict[str, Any] = {}
    for key, strategy in (("value", values), ("code", units), ("unit", units)):
        x = draw(strategy)
        if x is not MISSING:
            q[key] = x
    return draw(st.sampled_from([q, q, q, None, [], "5 mg/dL"]))


@st.composite
def components(draw: st.DrawFn) -> Any:
    comps = []
    for code in draw(st.lists(st.sampled_from([SYSTOLIC, DIASTOLIC, "9999-9"]), max_size=3)):
        coding = draw(st.sampled_from([[{"system": LOINC, "code": code}], [{"code": code}], {"0": code}]))
        comps.append({"code": {"coding": coding}, "valueQuantity": draw(quantities())})
    return draw(st.sampled_from([comps, comps, comps, None, {"0": comps}]))


@st.composite
def regular_observations(draw: st.DrawFn) -> dict[str, Any]:
    """An Observation of the usual shape: the happy path keeps it."""
    code = draw(st.sampled_from([GLUCOSE, GLUCOSE, WEIGHT, BP, HR]))
    o: dict[str, Any] = {
        "resourceType": "Observation",
        "id": draw(st.sampled_from(["o1", "o2", "o3", "o4", "o5", "o6", "o7", "o8", "o9"])),
        "status": draw(st.sampled_from(["final", "amended", "preliminary"])),
        "code": {"coding": [{"system": LOINC, "code": code, "display": "x"}], "text": "x"},
        "subject": {"reference": draw(st.sampled_from(["Patient/a", "Patient/b", "Patient/c", "Patient/ghost"]))},
        "effectiveDateTime": draw(st.sampled_from(["2019-12-01T10:00:00Z", "2019-06-01", "2019-12-31T23:00:00-02:00"])),
    }
    unit = {GLUCOSE: "mg/dL", WEIGHT: "kg", BP: "mm[Hg]", HR: "/min"}[code]
    quantity = {"value": draw(values.filter(lambda x: x is not MISSING)), "unit": unit, "code": unit}
    if code == BP:
        o["component"] = [
            {"code": {"coding": [{"system": LOINC, "code": c}]}, "valueQuantity": dict(quantity)}
            for c in draw(st.permutations([SYSTOLIC, DIASTOLIC]))
        ]
    else:
        o["valueQuantity"] = quantity
    return o


# where a regular Observation can go wrong, and how
MUTATIONS: dict[str, Any] = {
    "id": ids,
    "status": statuses,
    "subject": subjects,
    "code": codes,
    "effective": effective,
    "valueQuantity": quantities(),
    "component": components(),
    "value": values,
    "unit": units,
    "component_order": st.just(None),
}


@st.composite
def observations(draw: st.DrawFn) -> dict[str, Any]:
    """A regular Observation with zero, one or two of its elements changed (each change alone is what the
    happy path must notice; two at once check which reason wins)."""
    o = draw(regular_observations())
    for what in draw(st.lists(st.sampled_from(sorted(MUTATIONS)), max_size=2)):
        x = draw(MUTATIONS[what])
        if what == "effective":
            o.pop("effectiveDateTime", None)
            o.update(x)
        elif what in ("value", "unit"):
            comps = o.get("component")
            first = comps[0] if isinstance(comps, list) and comps and isinstance(comps[0], dict) else {}
            q = o["valueQuantity"] if "valueQuantity" in o else first.get("valueQuantity")
            if isinstance(q, dict):
                key = "value" if what == "value" else draw(st.sampled_from(["code", "unit"]))
                if x is MISSING:
                    q.pop(key, None)
                else:
                    q[key] = x
        elif what == "component_order":
            if isinstance(o.get("component"), list):
                o["component"].reverse()
        elif x is MISSING:
            o.pop(what, None)
        else:
            o[what] = x
    return o


def _happy(when: str, value: float, oid: str, pid: str = "a", code: str = GLUCOSE) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": "mg/dL", "code": "mg/dL"},
    }


PATIENTS = [
    {"resourceType": "Patient", "id": "a", "birthDate": "1960-01-01", "gender": "female"},
    {"resourceType": "Patient", "id": "b", "birthDate": "1970-06-30", "gender": "male"},
    {"resourceType": "Patient", "id": "c"},
]


def _reference_builder(spec: FeatureSpec) -> FeatureBuilder:
    """A builder whose every record goes through _extract: a gate sends records off the happy path, and
    this one lets everything through."""
    b = FeatureBuilder(spec)
    b._gate = lambda res: True
    return b


def _same(a: FeatureTable, b: FeatureTable) -> None:
    assert a.columns == b.columns and a.patient_ids == b.patient_ids
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.y, b.y)
    assert a.report.as_dict() == b.report.as_dict()
    assert a.report.examples == b.report.examples


@pytest.mark.parametrize("spec", [HAPPY_SPEC, MIXED_SPEC], ids=["single-channel", "multi-channel"])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obs=st.lists(observations(), max_size=25), warm=st.booleans())
def test_happy_path_equals_reference_path(spec: FeatureSpec, obs: list[dict[str, Any]], warm: bool) -> None:
    # `warm` puts regular records first, so the happy path has its caches (references, units) filled when
    # the generated ones arrive, as it has in a long stream
    lead = [_happy("2019-12-01T10:00:00Z", 100.0, f"w{i}", pid) for i, pid in enumerate("abc")] if warm else []
    stream = lead + PATIENTS + obs
    fast = FeatureBuilder(spec).add_all(copy.deepcopy(stream)).build()
    ref = _reference_builder(spec).add_all(copy.deepcopy(stream)).build()
    _same(fast, ref)


def _set(path: str, value: Any) -> Any:
    """A change to a regular glucose Observation: set (or, with MISSING, remove) the element at `path`."""

    def change(o: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = o
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        if value is MISSING:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = copy.deepcopy(value)

    return change


def _bp_first_diastolic(o: dict[str, Any]) -> None:
    o["code"]["coding"][0]["code"] = BP
    q = o.pop("valueQuantity")
    o["component"] = [
        {"code": {"coding": [{"system": LOINC, "code": c}]}, "valueQuantity": {**q, "code": "mm[Hg]"}}
        for c in (DIASTOLIC, SYSTOLIC)
    ]


def _bp_components_keyed(o: dict[str, Any]) -> None:
    _bp_first_diastolic(o)
    o["component"] = {0: o["component"][1]}


def _bp_component_coding_keyed(o: dict[str, Any]) -> None:
    _bp_first_diastolic(o)
    o["component"].reverse()
    o["component"][0]["code"]["coding"] = {0: o["component"][0]["code"]["coding"][0]}


# Each change alone takes a regular Observation off the happy path (or should be harmless).
CHANGES = {
    "no id": _set("id", MISSING),
    "null id": _set("id", None),
    "number id": _set("id", 7),
    "entered-in-error": _set("status", "entered-in-error"),
    "cancelled": _set("status", "cancelled"),
    "no status": _set("status", MISSING),
    "list status": _set("status", ["final"]),
    "group subject": _set("subject.reference", "Group/1"),
    "empty reference": _set("subject.reference", ""),
    "no reference": _set("subject.reference", MISSING),
    "absolute reference": _set("subject.reference", "http://x/fhir/Patient/b"),
    "versioned reference": _set("subject.reference", "Patient/b/_history/3"),
    "string subject": _set("subject", "Patient/a"),
    "empty time": _set("effectiveDateTime", ""),
    "number time": _set("effectiveDateTime", 5),
    "bad time": _set("effectiveDateTime", "yesterday"),
    "period": lambda o: o.update(effectivePeriod={"start": o.pop("effectiveDateTime")}),
    "instant": lambda o: o.update(effectiveInstant=o.pop("effectiveDateTime")),
    "other system": _set("code.coding.0.system", "http://other"),
    "no system": _set("code.coding.0.system", MISSING),
    "other code first": lambda o: o["code"]["coding"].insert(0, {"system": LOINC, "code": "1234-5"}),
    "other code only": _set("code.coding.0.code", "1234-5"),
    "other system, then spec code": lambda o: o["code"]["coding"].insert(0, {"system": "http://x", "code": WEIGHT}),
    "empty coding": _set("code.coding", []),
    "keyed coding": lambda o: o["code"].update(coding={0: o["code"]["coding"][0]}),
    "tuple coding": lambda o: o["code"].update(coding=tuple(o["code"]["coding"])),
    "number code": _set("code.coding.0.code", 2339),
    "bool value": _set("valueQuantity.value", True),
    "string value": _set("valueQuantity.value", "95"),
    "int value": _set("valueQuantity.value", 95),
    "no value": _set("valueQuantity.value", MISSING),
    "mmol/L": _set("valueQuantity.code", "mmol/L"),
    "empty unit code": _set("valueQuantity.code", ""),
    "no unit code": _set("valueQuantity.code", MISSING),
    "unknown unit": _set("valueQuantity.code", "furlong"),
    "number unit": _set("valueQuantity.code", 5),
    "list quantity": _set("valueQuantity", [95, "mg/dL"]),
    "null quantity": _set("valueQuantity", None),
    "diastolic first": _bp_first_diastolic,
    "keyed components": _bp_components_keyed,
    "keyed component coding": _bp_component_coding_keyed,
}


@pytest.mark.parametrize("spec", [HAPPY_SPEC, MIXED_SPEC], ids=["single-channel", "multi-channel"])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_each_change_off_the_happy_path_reads_as_the_reference(spec: FeatureSpec, change: str) -> None:
    stream: list[dict[str, Any]] = [*PATIENTS]
    for i, pid in enumerate(["a", "b", "a"]):  # fill the happy path's caches first
        stream.append(_happy(f"2019-11-0{i + 1}T10:00:00Z", 100.0 + i, f"w{i}", pid))
    for i in range(2):  # twice: the second meets whatever the first put in the caches
        o = _happy("2019-12-01T10:00:00Z", 95.0, f"x{i}")
        CHANGES[change](o)
        stream.append(o)
    fast = FeatureBuilder(spec).add_all(copy.deepcopy(stream)).build()
    ref = _reference_builder(spec).add_all(copy.deepcopy(stream)).build()
    _same(fast, ref)


@settings(max_examples=100, deadline=None)
@given(obs=st.lists(observations(), max_size=20))
def test_ndjson_lines_equal_parsed_resources(obs: list[dict[str, Any]]) -> None:
    lines = [orjson.dumps(r) for r in PATIENTS + obs]
    lines += [b"", b"   ", b'{"resourceType": "Observ', b"[1]", b'{"id": "no-type"}', b'{"resourceType": "Encounter"}']
    lines += [b'{"resourceType": null}', b'{"resourceType": "observation", "id": "x"}']
    text = FeatureBuilder(HAPPY_SPEC).add_ndjson(lines).build()
    report = IngestReport()
    parsed = FeatureBuilder(HAPPY_SPEC, report=report).add_all(iter_ndjson(lines, report, USED_TYPES)).build()
    _same(text, parsed)


def test_generated_sites_take_the_happy_path_and_match_the_reference(synth_spec: FeatureSpec) -> None:
    for h in generate_hospitals(5, seed=4, sizes=[60, 50, 40, 30, 20]):
        stream = list(h.resources())
        fast_builder = FeatureBuilder(synth_spec)
        fast = fast_builder.add_all(stream).build()
        _same(fast, _reference_builder(synth_spec).add_all(stream).build())
        assert fast.report.total_rejected == 0 and fast.n_rows == h.n_patients


def test_bad_times_are_rejected_once_per_observation() -> None:
    # regression: records of one-channel features were misaligned with their observation, so two bad times
    # in a row counted once and a good observation could be dropped in their place
    res = [*PATIENTS[:1], _happy("bad", 1, "o1", code=WEIGHT), _happy("worse", 2, "o2", code=WEIGHT)]
    res += [_happy("2019-12-01", 70, "o3", code=WEIGHT), _happy("2019-12-02", 80, "o4", code=WEIGHT)]
    for r in res[1:]:
        r["valueQuantity"] = {"value": r["valueQuantity"]["value"], "code": "kg"}
    t = build_feature_table(res, HAPPY_SPEC)
    assert t.report.rejected == {"no_effective_time": 2}
    assert t.report.accepted["Observation"] == 2
    assert t.X[0, t.columns.index("weight")] == 80


def test_duplicates_are_found_in_arrival_order() -> None:
    first = _happy("2019-12-01T10:00:00Z", 100.0, "dup")
    again = _happy("2019-12-02T10:00:00Z", 300.0, "dup")  # same id: dropped, whichever path read it
    again["subject"] = {"reference": "http://x/fhir/Patient/a"}  # (this one takes the reference path)
    no_id = {k: x for k, x in _happy("2019-12-03T10:00:00Z", 200.0, "").items() if k != "id"}
    res = [*PATIENTS, first, again, no_id, copy.deepcopy(no_id), {**first, "id": {"not": "hashable"}}]
    t = build_feature_table(res, HAPPY_SPEC)
    assert t.report.rejected == {"duplicate": 1, "invalid_resource": 1}
    assert t.report.accepted["Observation"] == 3  # the first "dup" and both without an id
    assert t.X[0, t.columns.index("glu")] == pytest.approx((100 + 200 + 200) / 3)


def test_latest_breaks_ties_on_time_by_the_largest_value() -> None:
    res = [*PATIENTS[:1]] + [
        _happy("2019-12-01T10:00:00Z", v, f"o{i}", code=WEIGHT) for i, v in enumerate([70.0, 90.0, 80.0])
    ]
    for r in res[1:]:
        r["valueQuantity"]["code"] = "kg"
    forward = build_feature_table(res, HAPPY_SPEC)
    backward = build_feature_table(res[:1] + res[:0:-1], HAPPY_SPEC)
    assert forward.X[0, forward.columns.index("weight")] == 90.0
    _same(forward, backward)


# ---------------- times ----------------


def _days(s: str) -> float:
    """Independent reading of the fixed forms: numpy's datetime64 parse of the UTC instant."""
    naive, offset = s, 0
    if s.endswith("Z"):
        naive = s[:-1]
    elif len(s) == 25:
        naive, sign = s[:19], 1 if s[19] == "+" else -1
        offset = sign * (int(s[20:22]) * 60 + int(s[23:25]))
    us = np.datetime64(naive, "us").astype(np.int64) - offset * 60_000_000
    return float(us) / 86_400_000_000.0


fixed_forms = st.builds(
    lambda d, secs, tail: d.isoformat() + ("" if secs is None else "T{:02d}:{:02d}:{:02d}".format(*secs) + tail),
    st.dates(min_value=date(1, 1, 1), max_value=date(9999, 12, 31)),
    st.one_of(st.none(), st.tuples(st.integers(0, 23), st.integers(0, 59), st.integers(0, 59))),
    st.sampled_from(["", "Z", "+00:00", "-05:00", "+14:00", "+23:59", "-23:59"]),
)
odd_strings = st.one_of(
    st.text(alphabet="0123456789-T:Z+. ", max_size=26),
    st.text(max_size=12),
    st.sampled_from(
        [
            "2020-02-29",
            "2019-02-29",
            "1900-02-29",
            "2000-02-29T12:00:00Z",
            "0000-01-01",
            "2020-13-01",
            "2020-00-10",
            "2020-01-32",
            "2020-01-01T24:00:00Z",
            "2020-01-01T23:60:00Z",
            "2020-01-01T23:59:60Z",
            "2020-01-01T10:00:00+24:00",
            "2020-01-01T10:00:00+0200",
            "2020-01-01T10:00:00*02:00",
            "2020-01-01T10:00:00.123Z",
            "2020-01-01 10:00:00Z",
            "2020-01-01t10:00:00z",
            "２０２０-01-01",
            "2020-01-01\x00",
            "2020-01-01\n",
            "2020",
            "2020-06",
            "",
        ]
    ),
)


@settings(max_examples=400, deadline=None)
@given(strings=st.lists(st.one_of(fixed_forms, odd_strings), max_size=40))
def test_parse_times_equals_to_days(strings: list[str]) -> None:
    got = parse_times(strings)
    want = [to_days(s) for s in strings]
    for s, g, w in zip(strings, got.tolist(), want, strict=True):
        assert (math.isnan(g) and w is None) or g == w, (s, g, w)


@settings(max_examples=300, deadline=None)
@given(s=fixed_forms)
def test_to_days_matches_numpy_datetime64(s: str) -> None:
    assert to_days(s) == _days(s)


def test_parse_times_reads_each_form_and_refuses_impossible_dates() -> None:
    strings = ["2019-12-31T23:30:00-02:00", "2020-01-01T01:30:00+02:00", "2020-01-01", "2020-02-29T00:00:00"]
    strings += ["2020-01-01T00:00:00Z", "2019-02-29", "2020-04-31", "1970-01-01T00:00:01Z"]
    got = parse_times(strings).tolist()
    base = (date(2020, 1, 1) - date(1970, 1, 1)).days
    assert got[:5] == [base + 1.5 / 24, base - 0.5 / 24, base, base + 59, base]
    assert math.isnan(got[5]) and math.isnan(got[6])
    assert got[7] == 1 / 86400
    assert len(parse_times([])) == 0


# ---------------- sorting ----------------


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(0, 300),
    top=st.sampled_from([1, 10, 70_000, 2**33]),
    seed=st.integers(0, 2**32 - 1),
)
def test_order_by_patient_value_matches_lexsort(n: int, top: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    P = rng.integers(0, top, n)
    V = rng.choice([1.5, -2.0, 3.25, 0.0], n) if seed % 2 else rng.normal(0, 1, n)
    order = order_by_patient_value(P, V)
    assert sorted(order.tolist()) == list(range(n))
    want = np.lexsort((V, P))
    np.testing.assert_array_equal(P[order], P[want])
    np.testing.assert_array_equal(V[order], V[want])


# ---------------- strict on files ----------------


def test_strict_on_ndjson_files_in_a_pool_equals_one_process(tmp_path: Path, synth_spec: FeatureSpec) -> None:
    h = generate_hospitals(1, seed=8, sizes=[40])[0]
    h.write_ndjson(tmp_path)
    bad = {**copy.deepcopy(h.observations[3]), "id": "bad", "status": 5}  # R4B refuses it, the fast path
    extra = {**h.patients[0], "id": "extra", "gender": 5}  # does not look at either
    with (tmp_path / "Observation.ndjson").open("ab") as f:
        f.write(orjson.dumps(bad) + b"\n" + b'{"resourceType": "Observ\n')
    with (tmp_path / "Patient.ndjson").open("ab") as f:
        f.write(b"\n" + orjson.dumps(extra) + b"\n")
    fast = build_feature_table(NdjsonDirSource(tmp_path), synth_spec)
    pooled = build_feature_table(NdjsonDirSource(tmp_path), synth_spec, strict=True, workers=2)
    alone = build_feature_table(NdjsonDirSource(tmp_path), synth_spec, strict=True, workers=1)
    _same(pooled, alone)
    assert pooled.report.rejected["invalid_resource"] == 2
    assert pooled.report.rejected["malformed_json"] == 1
    assert fast.report.rejected.get("invalid_resource", 0) == 0
    assert "extra" in fast.patient_ids and "extra" not in pooled.patient_ids


def test_days_helper_agrees_on_a_known_instant() -> None:
    # the independent reading used above, checked once by hand: 2000-03-01T00:00:00Z is day 11017
    assert _days("2000-03-01T00:00:00Z") == 11017.0 == (date(2000, 3, 1) - date(1970, 1, 1)) / timedelta(days=1)
