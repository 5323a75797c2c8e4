"""fhai-fhir against a real SEKMET: check, preview, export-csv; errors are one line with a stable code."""

from __future__ import annotations

import csv
from pathlib import Path

import orjson
from typer.testing import CliRunner

from fhir_adapters.cli import app
from fhir_adapters.features import build_feature_table
from fhir_adapters.featurespec import FeatureSpec
from fhir_adapters.synthetic import Hospital
from tests.fixtures.sekmet import SekmetServer

from .conftest import TASKS

runner = CliRunner()
SPEC = str(TASKS / "synthetic_diabetes.yaml")


def test_check_ok(synth_server: SekmetServer, tmp_path: Path) -> None:
    r = runner.invoke(
        app,
        [
            "check",
            "--url",
            synth_server.base_url,
            "--token",
            synth_server.token or "",
            "--log-file",
            str(tmp_path / "l"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "FHIR 4.0.1" in r.output and "Patient total = 150" in r.output


def test_check_bad_token_is_one_clear_line(synth_server: SekmetServer, tmp_path: Path) -> None:
    log = tmp_path / "fhir.log"
    r = runner.invoke(app, ["check", "--url", synth_server.base_url, "--token", "nope", "--log-file", str(log)])
    assert r.exit_code == 1
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "[FHIR-003]" in lines[0] and "401" in lines[0]
    assert "GET" in log.read_text()  # the detail (request, body) went to the log


def test_preview_from_server(synth_server: SekmetServer, tmp_path: Path) -> None:
    r = runner.invoke(
        app,
        [
            "preview",
            SPEC,
            "--url",
            synth_server.base_url,
            "--token",
            synth_server.token or "",
            "--rows",
            "3",
            "--log-file",
            str(tmp_path / "l"),
        ],
        env={"COLUMNS": "200"},
    )
    assert r.exit_code == 0, r.output
    assert "site-a-p000000" in r.output and "rows 150" in r.output


def test_export_csv_from_files(tmp_path: Path, hospitals: list[Hospital], synth_spec: FeatureSpec) -> None:
    h = hospitals[1]
    h.write_ndjson(tmp_path / "nd")
    out = tmp_path / "table.csv"
    r = runner.invoke(
        app, ["export-csv", SPEC, str(out), "--ndjson", str(tmp_path / "nd"), "--log-file", str(tmp_path / "l")]
    )
    assert r.exit_code == 0, r.output
    rows = list(csv.reader(out.open()))
    table = build_feature_table(h, synth_spec)
    assert rows[0] == ["patient_id", *table.columns, "t2dm"]
    assert len(rows) == table.n_rows + 1
    assert [int(x[-1]) for x in rows[1:]] == table.y.tolist()


def test_source_errors_are_clear(tmp_path: Path) -> None:
    r = runner.invoke(app, ["preview", SPEC, "--log-file", str(tmp_path / "l")])
    assert r.exit_code == 1 and "[FHIR-007]" in r.output and "exactly one of" in r.output
    r = runner.invoke(
        app, ["preview", str(tmp_path / "none.yaml"), "--ndjson", str(tmp_path), "--log-file", str(tmp_path / "l")]
    )
    assert r.exit_code == 1 and "[FHIR-006]" in r.output


def test_sync_then_preview_from_the_mirror(synth_server: SekmetServer, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror.sqlite3"
    args = ["sync", SPEC, "--url", synth_server.base_url, "--token", synth_server.token or ""]
    args += ["--mirror", str(mirror), "--page-size", "200", "--bulk", "always", "--log-file", str(tmp_path / "l")]
    r = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "first sync by Bulk $export" in r.output and "Observation" in r.output
    r = runner.invoke(app, args, env={"COLUMNS": "200"})  # again: nothing written
    assert r.exit_code == 0, r.output
    obs_row = next(line for line in r.output.splitlines() if line.strip("│ ").startswith("Observation"))
    cells = [c.strip() for c in obs_row.strip("│ ").split("│")]
    assert cells[1] == "search" and cells[3:6] == ["0", "0", "0"]  # bodies, written, deleted
    r = runner.invoke(app, ["preview", SPEC, "--mirror", str(mirror), "--rows", "2", "--log-file", str(tmp_path / "l")])
    assert r.exit_code == 0, r.output
    assert "rows 150" in r.output
    r = runner.invoke(app, ["preview", SPEC, "--mirror", str(tmp_path / "none"), "--log-file", str(tmp_path / "l")])
    assert r.exit_code == 1 and "fhai-fhir sync" in r.output


def test_preview_lists_rejected_resources(tmp_path: Path, hospitals: list[Hospital]) -> None:
    h = hospitals[3]
    h.write_ndjson(tmp_path / "nd")
    glucose = next(o for o in h.observations if o["code"]["coding"][0]["code"] == "2339-0")
    bad_unit = {**glucose, "id": "bad-unit", "valueQuantity": {**glucose["valueQuantity"], "code": "furlong"}}
    no_time = {k: v for k, v in glucose.items() if k != "effectiveDateTime"} | {"id": "no-time"}
    with (tmp_path / "nd" / "Observation.ndjson").open("ab") as f:
        f.write(orjson.dumps(bad_unit) + b"\n" + orjson.dumps(no_time) + b"\n")
    r = runner.invoke(
        app,
        ["preview", SPEC, "--ndjson", str(tmp_path / "nd"), "--rejections", "--log-file", str(tmp_path / "l")],
        env={"COLUMNS": "200"},
    )
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    unit = next(line for line in lines if "Observation/bad-unit" in line)
    assert "unconvertible_unit" in unit and "valueQuantity.code" in unit
    time = next(line for line in lines if "Observation/no-time" in line)
    assert "no_effective_time" in time and "effective[x]" in time
