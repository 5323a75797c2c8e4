"""Feature extraction: time windows, aggregation, label rules (no leakage), units, rejections, imputation."""

from __future__ import annotations

import random
from datetime import date, timedelta
from typing import Any

import numpy as np
import orjson
import pytest

from fhir_adapters.errors import FeatureSpecError
from fhir_adapters.features import FeatureBuilder, build_feature_table
from fhir_adapters.featurespec import FeatureSpec, load_spec, parse_spec
from fhir_adapters.sources import ListSource

INDEX = date(2020, 1, 1)
LOINC = "http://loinc.org"


def day(offset: int, time: str = "T10:00:00Z") -> str:
    return (INDEX + timedelta(days=offset)).isoformat() + time


def spec(**over: Any) -> FeatureSpec:
    base: dict[str, Any] = {
        "name": "t",
        "index_date": {"rule": "fixed", "date": INDEX.isoformat()},
        "lookback_days": 100,
        "features": [
            {
                "name": "glu_latest",
                "codes": [{"system": LOINC, "code": "2339-0"}],
                "unit": "mg/dL",
                "analyte": "glucose",
                "aggregation": "latest",
            },
            {
                "name": "glu_mean",
                "codes": [{"system": LOINC, "code": "2339-0"}],
                "unit": "mg/dL",
                "analyte": "glucose",
                "aggregation": "mean",
            },
            {
                "name": "glu_min",
                "codes": [{"system": LOINC, "code": "2339-0"}],
                "unit": "mg/dL",
                "analyte": "glucose",
                "aggregation": "min",
            },
            {
                "name": "glu_max",
                "codes": [{"system": LOINC, "code": "2339-0"}],
                "unit": "mg/dL",
                "analyte": "glucose",
                "aggregation": "max",
            },
            {"name": "glu_n", "codes": [{"system": LOINC, "code": "2339-0"}], "aggregation": "count"},
            {"name": "weight", "codes": [{"system": LOINC, "code": "29463-7"}], "unit": "kg", "window_days": 10},
            {
                "name": "sbp",
                "codes": [{"system": LOINC, "code": "85354-9"}],
                "component": [{"system": LOINC, "code": "8480-6"}],
                "unit": "mm[Hg]",
                "aggregation": "mean",
            },
        ],
        "label": {
            "name": "t2dm",
            "codes": [
                {"system": "http://snomed.info/sct", "code": "44054006"},
                {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "E11"},
            ],
            "horizon_days": 365,
        },
    }
    base.update(over)
    return parse_spec(base)


def patient(pid: str, birth: str = "1960-05-05", gender: str | None = "female") -> dict[str, Any]:
    p: dict[str, Any] = {"resourceType": "Patient", "id": pid, "birthDate": birth}
    if gender:
        p["gender"] = gender
    return p


_n = iter(range(10**6))


def obs(pid: str, when: str | None, value: Any, unit: str | None = "mg/dL", code: str = "2339-0", **extra: Any) -> dict:
    o: dict[str, Any] = {
        "resourceType": "Observation",
        "id": f"o{next(_n)}",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
    }
    if when is not None:
        o["effectiveDateTime"] = when
    q: dict[str, Any] = {}
    if value is not None:
        q["value"] = value
    if unit is not None:
        q["unit"] = unit
        q["system"] = "http://unitsofmeasure.org"
        q["code"] = unit
    o["valueQuantity"] = q
    o.update(extra)
    return o


def cond(pid: str, onset: str | None, code: str = "44054006", system: str = "http://snomed.info/sct") -> dict:
    c: dict[str, Any] = {
        "resourceType": "Condition",
        "id": f"c{next(_n)}",
        "code": {"coding": [{"system": system, "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
    }
    if onset:
        c["onsetDateTime"] = onset
    return c


def col(table: Any, name: str) -> np.ndarray:
    return table.X[:, table.columns.index(name)]


def test_window_is_open_below_and_closed_at_index() -> None:
    res = [
        patient("a"),
        obs("a", day(-100, "T00:00:00Z"), 500),  # exactly index - lookback: outside (open lower bound)
        obs("a", day(-99), 100),
        obs("a", day(-50), 120),
        obs("a", INDEX.isoformat(), 90),  # date only = midnight of the index date: inside
        obs("a", day(0, "T00:00:01Z"), 700),  # one second after the index: outside
        obs("a", day(30), 800),  # after the index: must never be a feature
    ]
    t = build_feature_table(ListSource(res), spec())
    assert col(t, "glu_latest")[0] == pytest.approx(90)
    assert col(t, "glu_mean")[0] == pytest.approx((100 + 120 + 90) / 3)
    assert col(t, "glu_min")[0] == pytest.approx(90)
    assert col(t, "glu_max")[0] == pytest.approx(120)
    assert col(t, "glu_n")[0] == 3


def test_feature_window_overrides_lookback() -> None:
    res = [patient("a"), obs("a", day(-20), 80, "kg", "29463-7"), obs("a", day(-5), 70, "kg", "29463-7")]
    res += [patient("b"), obs("b", day(-20), 80, "kg", "29463-7")]
    t = build_feature_table(ListSource(res), spec())
    assert col(t, "weight").tolist() == pytest.approx([70, 70])  # b imputed with the mean of those observed
    assert col(t, "weight_missing").tolist() == [0, 1]


def test_component_values() -> None:
    bp = obs("a", day(-3), None, None, "85354-9")
    del bp["valueQuantity"]
    bp["component"] = [
        {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]}, "valueQuantity": {"value": 80, "code": "mm[Hg]"}},
        {"code": {"coding": [{"system": LOINC, "code": "8480-6"}]}, "valueQuantity": {"value": 130, "code": "mm[Hg]"}},
    ]
    t = build_feature_table(ListSource([patient("a"), bp]), spec())
    assert col(t, "sbp")[0] == 130


def test_label_counts_onset_up_to_horizon_only() -> None:
    res = [
        patient("in"),
        cond("in", day(365, "T00:00:00Z")),  # exactly at the horizon: counts
        patient("late"),
        cond("late", day(365, "T00:00:01Z")),  # after the horizon: must not count
        patient("before"),
        cond("before", day(-400)),  # prevalent: counts unless excluded
        patient("icd"),
        cond("icd", day(10), "E11.9", "http://hl7.org/fhir/sid/icd-10-cm"),  # ICD-10 by prefix
        patient("snomed_prefix"),
        cond("snomed_prefix", day(10), "440540061"),  # SNOMED is exact
        patient("other_system"),
        cond("other_system", day(10), "E11.9", "http://example.org/codes"),  # prefixes only in ICD-10 systems
        patient("none"),
    ]
    t = build_feature_table(ListSource(res), spec())
    labels = dict(zip(t.patient_ids, t.y.tolist(), strict=True))
    assert labels == {"in": 1, "late": 0, "before": 1, "icd": 1, "snomed_prefix": 0, "other_system": 0, "none": 0}


def test_exclude_prevalent_drops_patients_diagnosed_before_index() -> None:
    s = spec(
        label={
            "name": "t2dm",
            "codes": [{"system": "http://snomed.info/sct", "code": "44054006"}],
            "horizon_days": 365,
            "exclude_prevalent": True,
        }
    )
    res = [patient("before"), cond("before", day(-1)), patient("after"), cond("after", day(5)), patient("x")]
    t = build_feature_table(ListSource(res), s)
    assert t.patient_ids == ["after", "x"] and t.y.tolist() == [1, 0]
    assert t.report.dropped_patients["prevalent_at_index"] == 1


def test_post_index_observations_do_not_change_the_table() -> None:
    base = [patient("a"), obs("a", day(-5), 100), cond("a", day(100))]
    leaky = [*base, obs("a", day(1), 400), obs("a", day(200), 400), cond("a", day(500))]
    t1 = build_feature_table(ListSource(base), spec())
    t2 = build_feature_table(ListSource(leaky), spec())
    assert t1.equals(t2)


def test_last_observation_index_rule() -> None:
    s = spec(index_date={"rule": "last_observation", "offset_days": 10})
    res = [patient("a"), obs("a", day(-30), 100), obs("a", day(-15), 110), obs("a", day(0), 300), patient("nobs")]
    t = build_feature_table(ListSource(res), s)
    # index = last observation (day 0, 10:00) - 10 days: the day -30 and -15 values count, day 0 does not
    assert t.patient_ids == ["a"]
    assert col(t, "glu_latest")[0] == 110
    assert t.index_dates() == [day(-10)[:10]]
    assert t.report.dropped_patients["no_index_date"] == 1


def test_age_and_sex() -> None:
    res = [patient("m", "1970-01-01", "male"), patient("f", "2000-01-01", "female"), patient("u", "1990-01-01", None)]
    res += [patient("unborn", "2021-01-01")]
    t = build_feature_table(ListSource(res), spec())
    assert t.patient_ids == ["f", "m", "u"]
    assert col(t, "age").tolist() == pytest.approx([20.0, 50.0, 30.0], abs=0.01)
    assert col(t, "sex_male").tolist() == pytest.approx([0.0, 1.0, 0.5])  # u imputed by the mean
    assert col(t, "sex_male_missing").tolist() == [0, 0, 1]
    assert t.report.dropped_patients["born_after_index"] == 1


def test_units_are_normalised_and_bad_units_rejected() -> None:
    res = [
        patient("a"),
        obs("a", day(-3), 5.5, "mmol/L"),
        obs("a", day(-2), 99.0, "mg/dL"),
        obs("a", day(-1), 7.0, "g/L"),  # no glucose row for g/L: rejected, not mixed in
        obs("a", day(-4), 154.32, "[lb_av]", "29463-7"),
    ]
    t = build_feature_table(ListSource(res), spec())
    assert col(t, "glu_min")[0] == pytest.approx(99.0)
    assert col(t, "glu_max")[0] == pytest.approx(5.5 * 18.0156)
    assert col(t, "glu_n")[0] == 2
    assert col(t, "weight")[0] == pytest.approx(154.32 * 0.45359237, rel=1e-6)
    assert t.report.rejected == {"unconvertible_unit": 1}
    assert t.units[t.columns.index("weight")] == "kg"


def test_rejections_are_counted_by_reason_and_never_raise() -> None:
    b = FeatureBuilder(spec())
    b.add(patient("a"))
    b.add_json(b'{"resourceType": "Observation", "id": ')  # truncated JSON
    b.add_json(b"[1, 2]")
    b.add({"id": "x"})  # no resourceType
    b.add({"resourceType": "observation", "id": "y"})  # wrong (lower-case) resourceType
    b.add(obs("a", day(-1), None))  # no value
    b.add(obs("a", day(-1), "high"))  # value is a string
    b.add(obs("a", day(-1), 100, None))  # no unit
    b.add(obs("a", day(-1), 100, "furlong"))  # unknown unit
    b.add({**obs("a", day(-1), 100), "subject": {}})
    b.add(obs("a", None, 100))  # no effective time
    b.add(obs("a", "yesterday", 100))  # unparseable time
    b.add(obs("a", day(-1), 100, status="entered-in-error"))
    b.add(obs("ghost", day(-1), 100))  # patient not in the data
    dup = obs("a", day(-1), 100)
    b.add(dup)
    b.add(dup)
    b.add({**obs("a", day(-1), 100), "code": "2339-0"})  # not a CodeableConcept
    b.add(cond("a", None))  # label condition without onset: cannot be placed before/after the horizon
    b.add(patient("a"))
    b.add({"resourceType": "Encounter", "id": "e"})
    t = b.build()
    assert dict(t.report.rejected) == {
        "malformed_json": 1,
        "not_an_object": 1,
        "missing_resource_type": 1,
        "wrong_resource_type": 1,
        "missing_value": 1,
        "non_numeric_value": 1,
        "missing_unit": 1,
        "unconvertible_unit": 1,
        "no_subject": 1,
        "no_effective_time": 2,
        "status_excluded": 1,
        "unknown_patient": 1,
        "duplicate": 2,
        "invalid_resource": 1,
    } | {"no_onset": 1}
    assert t.report.ignored == 1
    assert t.report.accepted["Observation"] == 1  # the first copy of the duplicate
    assert col(t, "glu_n")[0] == 1 and col(t, "glu_latest")[0] == 100


@pytest.mark.parametrize("workers", [1, 2])
def test_strict_mode_rejects_what_the_fast_path_accepts(workers: int) -> None:
    bad = obs("a", day(-1), 100)
    bad["status"] = 5  # not a code: R4B refuses it, the fast path does not look
    res = [patient("a"), bad, {**patient("b"), "birthDate": "1960-02-30"}]
    fast = build_feature_table(ListSource(res), spec())
    strict = build_feature_table(ListSource(res), spec(), strict=True, workers=workers)
    assert col(fast, "glu_n")[0] == 1
    assert strict.report.rejected["invalid_resource"] == 2
    assert strict.patient_ids == ["a"] and col(strict, "glu_n")[0] == 0


def test_table_does_not_depend_on_resource_order() -> None:
    rng = random.Random(3)
    res: list[dict] = []
    for i in range(30):
        pid = f"p{i}"
        res.append(patient(pid, f"19{50 + i}-03-04", rng.choice(["male", "female"])))
        for _ in range(rng.randint(0, 5)):
            # ties in time on purpose: latest must still be deterministic
            res.append(obs(pid, day(-rng.randint(1, 4)), round(rng.uniform(70, 200), 1)))
        if rng.random() < 0.3:
            res.append(cond(pid, day(rng.randint(-50, 400))))
    t1 = build_feature_table(ListSource(res), spec())
    rng.shuffle(res)
    t2 = build_feature_table(ListSource(res), spec())
    assert t1.equals(t2)
    assert t1.X.dtype == np.float32 and t1.y.dtype == np.int32


def test_imputation_mean_and_zero() -> None:
    res = [patient("a"), obs("a", day(-1), 100), patient("b"), obs("b", day(-1), 200), patient("c")]
    t = build_feature_table(ListSource(res), spec())
    assert col(t, "glu_mean").tolist() == pytest.approx([100, 200, 150])
    assert col(t, "glu_mean_missing").tolist() == [0, 0, 1]
    assert "glu_n_missing" not in t.columns  # counts are never missing
    tz = build_feature_table(ListSource(res), spec(imputation={"strategy": "zero", "indicators": False}))
    assert col(tz, "glu_mean").tolist() == [100, 200, 0]
    assert not any(c.endswith("_missing") for c in tz.columns)


def test_columns_do_not_depend_on_the_data() -> None:
    empty = build_feature_table(ListSource([patient("a")]), spec())
    full = build_feature_table(ListSource([patient("a"), obs("a", day(-1), 1)]), spec())
    assert empty.columns == full.columns and empty.units == full.units


def test_spec_hash_is_stable_and_tracks_what_matters(tmp_path: Any) -> None:
    s1, s2 = spec(), spec()
    assert s1.spec_hash() == s2.spec_hash() and len(s1.spec_hash()) == 16
    assert spec(description="other words").spec_hash() == s1.spec_hash()
    assert spec(lookback_days=101).spec_hash() != s1.spec_hash()
    t = build_feature_table(ListSource([patient("a")]), s1)
    assert t.spec_hash == s1.spec_hash()


def test_spec_errors_are_clear(tmp_path: Any) -> None:
    with pytest.raises(FeatureSpecError) as e:
        spec(features=[{"name": "g", "codes": [{"system": LOINC, "code": "1"}], "aggregation": "mean"}])
    assert e.value.code == "FHIR-006" and "unit" in e.value.message
    with pytest.raises(FeatureSpecError):
        spec(index_date={"rule": "fixed"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("feature_spec: [unclosed")
    with pytest.raises(FeatureSpecError, match="not valid YAML"):
        load_spec(bad)
    with pytest.raises(FeatureSpecError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")


def test_task_yamls_load() -> None:
    from pathlib import Path

    tasks = Path(__file__).resolve().parents[2] / "firmware_configs" / "tasks"
    specs = {p.stem: load_spec(p) for p in tasks.glob("*.yaml")}
    assert {"diabetes_risk", "synthetic_diabetes"} <= set(specs)
    codes = {c for s in specs.values() for _, c in s.observation_codes()}
    assert {"2339-0", "39156-5", "29463-7", "8302-2", "8867-4", "38483-4"} <= codes


def test_ndjson_line_parse_matches_dict_path() -> None:
    res = [patient("a"), obs("a", day(-1), 100), obs("a", day(-2), 5.0, "mmol/L")]
    b = FeatureBuilder(spec())
    for r in res:
        b.add_json(orjson.dumps(r))
    assert b.build().equals(build_feature_table(ListSource(res), spec()))


def test_time_zones_and_partial_dates_are_placed_correctly() -> None:
    res = [
        patient("a"),
        obs("a", "2020-01-01T01:30:00+02:00", 100),  # = 2019-12-31T23:30Z: before the index, counts
        obs("a", "2019-12-31T23:30:00-02:00", 900),  # = 2020-01-01T01:30Z: after the index, does not
        obs("a", "2019-12", 50),  # partial date: 2019-12-01
        obs("a", "2019-12-31T10:00:00.123456Z", 70),
    ]
    t = build_feature_table(ListSource(res), spec())
    assert col(t, "glu_n")[0] == 3
    assert col(t, "glu_max")[0] == 100 and col(t, "glu_min")[0] == 50
    assert col(t, "glu_latest")[0] == 100
