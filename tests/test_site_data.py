"""A device's data from a real FHIR server: the local mirror syncs incrementally and builds the same table."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.broker import LocalBroker
from edge_runtime.site_data import SiteData, SourceConfig
from fhir_adapters.auth import BearerAuth
from fhir_adapters.client import FhirClient
from fhir_adapters.errors import FhirAuthError
from fhir_adapters.features import build_feature_table
from fhir_adapters.featurespec import FeatureSpec, load_spec
from fhir_adapters.mirror import MirrorStore
from fhir_adapters.needs import needs_for
from fhir_adapters.synthetic import generate_hospitals
from tests.fixtures.sekmet import SekmetServer, start_sekmet
from tests.harness import Federation, wait_for

TASK = Path(__file__).resolve().parents[1] / "firmware_configs" / "tasks" / "synthetic_diabetes.yaml"


@pytest.fixture(scope="module")
def server() -> Iterator[SekmetServer]:
    s = start_sekmet()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return load_spec(TASK)


def test_mirror_pulls_only_what_changed_and_matches_the_files(
    tmp_path: Path, server: SekmetServer, spec: FeatureSpec
) -> None:
    first, second = generate_hospitals(2, seed=21, sizes=[40, 25])
    token = tmp_path / "token"
    token.write_text(server.token or "")
    with FhirClient(server.base_url, auth=BearerAuth(server.token or "")) as client:
        first.load_into(client, patients_per_bundle=20)
    data = SiteData(SourceConfig.parse(server.base_url, token_file=str(token)), tmp_path / "state")
    assert data.mirror is not None

    table = data.table(spec)
    assert table.equals(build_feature_table(first, spec))
    # SEKMET offers $export, but a first sync this small is quicker by search
    assert data.mirror.last_report is not None and not data.mirror.last_report.bulk
    assert data.mirror.refresh(spec) == {"Patient": 0, "Observation": 0, "Condition": 0}  # nothing new

    with FhirClient(server.base_url, auth=BearerAuth(server.token or "")) as client:
        second.load_into(client, patients_per_bundle=20)
    pulled = data.mirror.refresh(spec)
    needed = needs_for(spec)["Observation"]
    assert pulled["Patient"] == second.n_patients
    assert pulled["Observation"] == sum(1 for o in second.resources(["Observation"]) if needed.matches(o))
    both = build_feature_table(iter([*first.resources(), *second.resources()]), spec)
    assert build_feature_table(data.mirror.source(), spec).equals(both)


def test_mirror_refuses_a_wrong_token_and_keeps_its_cursor(
    tmp_path: Path, server: SekmetServer, spec: FeatureSpec
) -> None:
    token = tmp_path / "token"
    token.write_text("not-the-token")
    data = SiteData(SourceConfig.parse(server.base_url, token_file=str(token)), tmp_path / "state")
    with pytest.raises(FhirAuthError):
        data.table(spec)
    assert data.mirror is not None
    with MirrorStore(data.mirror.path) as store:
        assert store.counts() == {} and store.state("Observation") is None


def test_a_device_whose_fhir_server_refuses_it_retries_and_joins_the_round(
    tmp_path: Path, server: SekmetServer, broker: LocalBroker, three_sites: dict[str, Path]
) -> None:
    """One site reads its FHIR server with an expired token; once the token is renewed the round completes."""
    hospital = generate_hospitals(1, seed=5, sizes=[60])[0]
    with FhirClient(server.base_url, auth=BearerAuth(server.token or "")) as client:
        hospital.load_into(client, patients_per_bundle=30)
    token = tmp_path / "token"
    token.write_text("expired-token")
    sites: dict[str, Path | SourceConfig] = dict(list(three_sites.items())[:2])
    sites["fhir-site"] = SourceConfig.parse(server.base_url, token_file=str(token))
    fed = Federation(tmp_path / "fed", broker, sites, "fhir-retry", rounds=1)
    fed.enroll_all()
    try:
        fed.start_devices()
        fed.start_coordinator_thread()
        wait_for(lambda: fed.store.current_round("fhir-retry") is not None, 60, "round 0 to open")
        time.sleep(2)  # the FHIR site has failed at least once by now
        assert "fhir-site" not in fed.store.accepted_devices("fhir-retry", 0)
        token.write_text(server.token or "")
        fed.wait_done()
        assert fed.store.accepted_devices("fhir-retry", 1) == set(sites)
    finally:
        fed.stop()
