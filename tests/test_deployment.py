"""Global models shipped back to the devices: exported after each round, swapped live, used by `predict`."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coordinator.broker import LocalBroker
from edge_runtime.inference import IncompatibleModelError, ModelCard
from fhir_adapters.features import build_feature_table
from fhir_adapters.sources import NdjsonDirSource
from tests.harness import Federation, wait_for

pytestmark = pytest.mark.timeout(300)


def test_devices_swap_in_each_export_rebuilt_from_their_parameters_and_predict_with_it(
    tmp_path: Path, broker: LocalBroker, three_sites: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    fed = Federation(
        tmp_path / "deploy",
        broker,
        three_sites,
        "deploy",
        rounds=2,
        export={"formats": ["onnx", "tflite", "tflite_int8"], "every": 1, "on_improvement": False},
    )
    fed.enroll_all()
    caplog.set_level(logging.INFO, logger="fhai.edge")
    try:
        fed.start_devices()
        fed.start_coordinator_thread()
        fed.wait_done()
        # Exports are of the model the devices hold: round r's is what round r + 1 trains from.
        rows = {r.round: r for r in fed.store.rounds(fed.task.task)}
        versions = {rows[r + 1].model_version for r in (1, 2)}
        assert fed.service is not None and fed.service.manager.device_model is not None
        final = fed.service.manager.device_model
        site = "site-a"
        agent = fed.agents[site]
        wait_for(
            lambda: (
                agent.deployment.predictor is not None
                and agent.deployment.predictor.card.model_version == final.version()
            ),
            30,
            "the final model on the device",
        )
        # Both rounds' models reached the device; the pointer names the last one. Every device rebuilt its
        # float TFLite model from the parameters it holds (what it received was a skeleton of a few hundred
        # bytes): none fetched a whole artifact.
        installed = {p.name.removesuffix(".tflite") for p in agent.deployment.folder.glob("*.tflite")}
        assert installed == versions
        rebuilt = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rebuilt the round-")]
        assert sorted(rebuilt) == sorted(
            f"rebuilt the round-{r} tflite export from the held parameters" for r in (1, 2) for _ in three_sites
        )
        assert not any("FHAI-L81" in r.getMessage() for r in caplog.records)
        card = agent.deployment.predictor.card
        assert card.columns and card.feature_spec_hash == fed.task.spec().spec_hash()
        # The coordinator kept every export on disk as well.
        exports = sorted(p.name for p in (fed.work / "exports" / "round-2").iterdir())
        assert exports == sorted(
            f"{fed.task.task}{s}" for s in (".onnx", ".tflite", ".card.json", ".int8.tflite", ".int8.card.json")
        )
    finally:
        fed.stop()

    # `fhai-edge predict` scores the site's patients with the deployed LiteRT model.
    out = tmp_path / "scores.csv"
    cmd = [
        sys.executable, "-m", "edge_runtime.cli", "predict", "--task", fed.task.task,
        "--source", str(three_sites[site]), "--out", str(out), "--state-dir", str(fed.device_key_path(site).parent),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    table = build_feature_table(NdjsonDirSource(three_sites[site]), fed.task.spec())
    assert [r["patient_id"] for r in rows] == table.patient_ids
    expected = final.predict_proba(table.X)[:, 1]
    np.testing.assert_allclose([float(r["risk"]) for r in rows], expected, atol=1e-5)

    # A model built for another feature spec is refused, and the deployed one stays.
    foreign = dataclasses.replace(card, feature_spec_hash="0" * 16, model_version="foreign")
    with pytest.raises(IncompatibleModelError, match="FHAI-I010"):
        agent.deployment.install(b"", foreign, fed.task.spec().spec_hash(), card.columns)
    current = json.loads((agent.deployment.folder / "current.json").read_text())
    assert current["model_version"] == final.version()
    assert ModelCard.from_json((agent.deployment.folder / f"{final.version()}.card.json").read_text()) == card
