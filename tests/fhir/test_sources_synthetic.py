"""File sources and the synthetic hospitals: same table from memory, ndjson and bundles; known risk model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fhir_adapters.features import build_feature_table
from fhir_adapters.featurespec import FeatureSpec
from fhir_adapters.sources import BundleDirSource, ListSource, NdjsonDirSource, ResourceSource
from fhir_adapters.synthetic import RISK_MODEL, Hospital, generate_hospitals
from fhir_adapters.validation import IngestReport


def test_sources_share_one_interface(tmp_path: Path, hospitals: list[Hospital]) -> None:
    h = hospitals[1]
    h.write_ndjson(tmp_path / "nd")
    h.write_bundles(tmp_path / "bu", patients_per_bundle=30, gz=True)
    for src in (h, ListSource(h.resources()), NdjsonDirSource(tmp_path / "nd"), BundleDirSource(tmp_path / "bu")):
        assert isinstance(src, ResourceSource)
        types = {r["resourceType"] for r in src.iter_resources(["Patient", "Condition"])}
        assert types == {"Patient", "Condition"}


def test_tables_from_files_equal_table_from_memory(
    tmp_path: Path, hospitals: list[Hospital], synth_spec: FeatureSpec
) -> None:
    h = hospitals[1]  # the site with mmol/L glucose and [lb_av] weight
    h.write_ndjson(tmp_path / "nd", gz=True)
    h.write_bundles(tmp_path / "bu", patients_per_bundle=40)
    mem = build_feature_table(h, synth_spec)
    nd = build_feature_table(NdjsonDirSource(tmp_path / "nd"), synth_spec)
    bu = build_feature_table(BundleDirSource(tmp_path / "bu"), synth_spec)
    assert mem.n_rows == h.n_patients
    assert mem.equals(nd) and mem.equals(bu)
    assert mem.report.total_rejected == 0


def test_bad_lines_in_ndjson_are_counted_not_fatal(tmp_path: Path, synth_spec: FeatureSpec) -> None:
    h = generate_hospitals(1, seed=5, sizes=[20])[0]
    h.write_ndjson(tmp_path)
    obs = tmp_path / "Observation.ndjson"
    good = obs.read_bytes()
    obs.write_bytes(good + b'{"resourceType": "Observ\n\n[]\n{"id": "no-type"}\n')
    (tmp_path / "Encounter.ndjson").write_bytes(b"not even json\n")  # other types are not even opened
    rep = IngestReport()
    t = build_feature_table(NdjsonDirSource(tmp_path), synth_spec, report=rep)
    assert t.report is rep
    assert dict(rep.rejected) == {"malformed_json": 1, "not_an_object": 1, "missing_resource_type": 1}
    assert t.equals(build_feature_table(h, synth_spec))


def test_bad_bundle_file_is_counted(tmp_path: Path, synth_spec: FeatureSpec) -> None:
    h = generate_hospitals(1, seed=5, sizes=[10])[0]
    h.write_bundles(tmp_path)
    (tmp_path / "broken.json").write_text('{"resourceType": "Bundle", "entry": [')
    (tmp_path / "broken2.json.gz").write_bytes(b"not gzip")
    t = build_feature_table(BundleDirSource(tmp_path), synth_spec)
    assert t.report.rejected["malformed_json"] == 2
    assert t.n_rows == 10


def test_generator_is_seeded_and_sized() -> None:
    a = generate_hospitals(3, seed=42, sizes=[30, 20, 10])
    b = generate_hospitals(3, seed=42, sizes=[30, 20, 10])
    c = generate_hospitals(3, seed=43, sizes=[30, 20, 10])
    assert [h.n_patients for h in a] == [30, 20, 10]
    assert list(a[0].resources()) == list(b[0].resources())
    assert list(a[0].resources()) != list(c[0].resources())
    default = generate_hospitals(5, seed=1)
    assert default[-1].n_patients < min(h.n_patients for h in default[:-1])  # one small site
    assert len(generate_hospitals(7, seed=1)) == 7


def test_generator_makes_large_cohorts() -> None:
    # How fast it does so is a benchmark's business (bench/fhir_ingest.py generates its cohorts), not a test's.
    hs = generate_hospitals(5, seed=3, sizes=[1000] * 5)
    assert [h.n_patients for h in hs] == [1000] * 5
    assert sum(len(h.observations) for h in hs) > 50_000


def test_sites_differ_like_real_ones(hospitals: list[Hospital], synth_spec: FeatureSpec) -> None:
    units = {h.site_id: {o["valueQuantity"]["code"] for o in h.observations if "valueQuantity" in o} for h in hospitals}
    assert {"mmol/L", "[lb_av]"} <= units["site-b"]
    assert "mmol/L" not in units["site-a"] and "[lb_av]" not in units["site-a"]
    systems = {h.site_id: {c["code"]["coding"][0]["system"] for c in h.conditions} for h in hospitals}
    assert "http://hl7.org/fhir/sid/icd-10-cm" in systems["site-c"]
    ages = [float(h.truth["age"].mean()) for h in hospitals]
    assert max(ages) - min(ages) > 10
    # after unit normalisation, site-b's glucose lands on the true mg/dL scale (plus its calibration offset)
    hb = hospitals[1]
    t = build_feature_table(hb, synth_spec)
    g = t.X[:, t.columns.index("glucose")]
    seen = t.X[:, t.columns.index("glucose_missing")] == 0
    offset = hb.profile.glucose_offset
    assert abs(float(np.mean(g[seen] - hb.truth["glucose"][seen])) - offset) < 1.5


def test_labels_follow_the_risk_model_and_traps_do_not_leak(synth_spec: FeatureSpec) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    hs = generate_hospitals(5, seed=2, sizes=[900, 700, 600, 600, 200])
    tabs = [build_feature_table(h, synth_spec) for h in hs]
    for h, t in zip(hs, tabs, strict=True):
        assert np.array_equal(t.y, h.truth["label"].astype(np.int32))  # the late diagnoses do not count
        # the post-index glucose (raised for cases) is not a feature: max stays near the measured mean
        gmax = t.X[:, t.columns.index("glucose_max")]
        gmean = t.X[:, t.columns.index("glucose")]
        assert float(np.median(gmax - gmean)) < 15
    X = np.vstack([t.X for t in tabs])
    y = np.concatenate([t.y for t in tabs])
    p = np.concatenate([h.truth["p"] for h in hs])
    idx = np.random.default_rng(0).permutation(len(y))
    tr, te = idx[:2000], idx[2000:]
    mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-9
    model = LogisticRegression(max_iter=2000).fit((X[tr] - mu) / sd, y[tr])
    auc = roc_auc_score(y[te], model.predict_proba((X[te] - mu) / sd)[:, 1])
    oracle = roc_auc_score(y[te], p[te])
    assert oracle > 0.8
    assert auc > oracle - 0.05, (auc, oracle)
    # and the exposed model reproduces the truth's probabilities
    truth = {k: hs[0].truth[k] for k in RISK_MODEL.terms}
    assert np.allclose(RISK_MODEL.probability(truth, hs[0].profile.prevalence_shift), hs[0].truth["p"])


@pytest.mark.parametrize("gz", [False, True])
def test_write_ndjson_layout(tmp_path: Path, gz: bool) -> None:
    h = generate_hospitals(1, seed=0, sizes=[5])[0]
    paths = h.write_ndjson(tmp_path, gz=gz)
    suffix = ".ndjson.gz" if gz else ".ndjson"
    assert sorted(p.name for p in paths) == sorted(f"{t}{suffix}" for t in ("Patient", "Observation", "Condition"))
