"""Fixtures for the FHIR adapter tests: real SEKMET servers loaded with synthetic hospitals and Synthea."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from fhir_adapters.auth import BearerAuth
from fhir_adapters.client import FhirClient
from fhir_adapters.featurespec import FeatureSpec, load_spec
from fhir_adapters.synthetic import Hospital, generate_hospitals
from tests.fixtures.sekmet import SekmetServer, start_sekmet

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "firmware_configs" / "tasks"
SYNTHEA_DIR = REPO.parent / "shared" / "data" / "synthea-r4"


@pytest.fixture(scope="session")
def synth_spec() -> FeatureSpec:
    return load_spec(TASKS / "synthetic_diabetes.yaml")


@pytest.fixture(scope="session")
def synthea_spec() -> FeatureSpec:
    return load_spec(TASKS / "diabetes_risk.yaml")


@pytest.fixture(scope="session")
def hospitals() -> list[Hospital]:
    return generate_hospitals(5, seed=11, sizes=[150, 100, 80, 60, 25])


@pytest.fixture(scope="session")
def synth_server(hospitals: list[Hospital]) -> Iterator[SekmetServer]:
    """SEKMET (bearer auth, strict validation) holding synthetic site-a."""
    server = start_sekmet()
    try:
        with FhirClient(server.base_url, auth=BearerAuth(server.token or "")) as c:
            hospitals[0].load_into(c, patients_per_bundle=50)
        yield server
    finally:
        server.stop()


@pytest.fixture()
def client(synth_server: SekmetServer) -> Iterator[FhirClient]:
    with FhirClient(synth_server.base_url, auth=BearerAuth(synth_server.token or "")) as c:
        yield c


def synthea_bundles(spec: FeatureSpec) -> Iterator[dict]:
    """The Synthea sample's transaction bundles, cut to what the spec reads (Patient, Condition and the
    spec's Observation codes) so loading under strict validation stays within the suite's time budget."""
    codes = spec.observation_codes()
    for path in sorted(SYNTHEA_DIR.glob("*.json.gz")):
        bundle = orjson.loads(gzip.decompress(path.read_bytes()))
        keep = []
        for e in bundle["entry"]:
            r = e["resource"]
            t = r["resourceType"]
            if t in ("Patient", "Condition") or (
                t == "Observation"
                and any((c.get("system"), c.get("code")) in codes for c in r.get("code", {}).get("coding", []))
            ):
                keep.append(e)
        bundle["entry"] = keep
        yield bundle


@pytest.fixture(scope="session")
def synthea_server(synthea_spec: FeatureSpec) -> Iterator[SekmetServer]:
    if not SYNTHEA_DIR.is_dir():
        pytest.skip(f"Synthea sample not found at {SYNTHEA_DIR}")
    server = start_sekmet()
    try:
        with FhirClient(server.base_url, auth=BearerAuth(server.token or ""), timeout=120) as c:
            for bundle in synthea_bundles(synthea_spec):
                c.transaction(bundle)
        yield server
    finally:
        server.stop()
