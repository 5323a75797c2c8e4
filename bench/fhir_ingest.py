"""Benchmark: Observations per second from Bulk ndjson to a feature table, fast and strict paths, against
parsing alone with the same JSON library (orjson) and against fhiry (ndjson to a pandas DataFrame), side by
side in one run; and the edge mirror's first sync and unchanged resync against a real SEKMET server.

    .venv/bin/python bench/fhir_ingest.py [--patients-per-site 3500] [--repeats 5] [--strict-repeats 3]
        [--fhiry-python /tmp/fhai-fhiry-venv/bin/python] [--fhiry-patients 60] [--sync-observations 60000]

fhiry 5.2.2 pulls google-cloud-bigquery, grpcio and pandas, which the project's venv does not carry, so it
lives in a venv of its own (see docs/benchmarks/fhir_ingest.md for the two commands) and runs in a child
process on the same files in the same run; its time is taken inside the child, around its own call.
fhiry needs about 0.1 s a resource, so it reads a smaller dataset (--fhiry-patients, one site); the fast
path is timed again on exactly those files for the ratio `fast_over_fhiry`.

Writes docs/benchmarks/fhir_ingest.json and docs/benchmarks/fhir_ingest.md. Figures are medians; ratios
are what to compare across machines. CPU time (this process and the strict mode's workers) is recorded too:
on a shared machine it moves less than wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fhir_adapters.auth import BearerAuth  # noqa: E402
from fhir_adapters.client import FhirClient  # noqa: E402
from fhir_adapters.features import build_feature_table  # noqa: E402
from fhir_adapters.featurespec import FeatureSpec, load_spec  # noqa: E402
from fhir_adapters.mirror import MirrorSource, MirrorStore  # noqa: E402
from fhir_adapters.mirror_sync import MirrorSync, SyncOptions, SyncReport  # noqa: E402
from fhir_adapters.needs import needs_for  # noqa: E402
from fhir_adapters.sources import FhirSearchSource, NdjsonDirSource  # noqa: E402
from fhir_adapters.synthetic import generate_hospitals  # noqa: E402
from tests.fixtures.sekmet import start_sekmet  # noqa: E402

SPEC = ROOT / "firmware_configs" / "tasks" / "synthetic_diabetes.yaml"
OUT = ROOT / "docs" / "benchmarks"
FHIRY_PYTHON = Path("/tmp/fhai-fhiry-venv/bin/python")
# Observations no feature of the spec reads (LOINC: hemoglobin, cholesterol, HbA1c, sodium): the filler that
# makes the spec's codes a fifth of what the server holds
FILLER_CODES = ("718-7", "2093-3", "4548-4", "2951-2")
FHIRY_CHILD = """
import json, sys, time
import fhiry.parallel
folder, repeats = sys.argv[1], int(sys.argv[2])
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    df = fhiry.parallel.ndjson(folder)
    times.append(time.perf_counter() - t0)
print(json.dumps({"seconds": times, "rows": int(df.shape[0]), "columns": int(df.shape[1])}))
"""


def write_dataset(directory: Path, patients_per_site: int, seed: int) -> dict[str, int]:
    """5 synthetic sites (mixed units) into one Bulk ndjson directory."""
    counts = {"Patient": 0, "Observation": 0, "Condition": 0}
    files = {t: (directory / f"{t}.ndjson").open("wb") for t in counts}
    try:
        for h in generate_hospitals(5, seed=seed, sizes=[patients_per_site] * 5):
            for t, items in (("Patient", h.patients), ("Observation", h.observations), ("Condition", h.conditions)):
                files[t].write(b"".join(orjson.dumps(r) + b"\n" for r in items))
                counts[t] += len(items)
    finally:
        for f in files.values():
            f.close()
    return counts


def parse_only(directory: Path) -> int:
    """The floor: read every line of every file and orjson.loads it, nothing else."""
    n = 0
    loads = orjson.loads
    for path in sorted(directory.glob("*.ndjson")):
        with path.open("rb") as f:
            for line in f:
                loads(line)
                n += 1
    return n


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the strict mode's pool)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn: object) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one call."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t0, cpu_seconds() - c0


def fhiry_comparison(spec: FeatureSpec, python: Path, patients: int, repeats: int, seed: int) -> dict[str, object]:
    """fhiry.parallel.ndjson (its fastest way in, one process per CPU) and our fast path, same files."""
    if not python.exists():
        return {"skipped": f"no fhiry interpreter at {python}"}
    with tempfile.TemporaryDirectory(prefix="fhiry-") as tmp:
        d = Path(tmp)
        h = generate_hospitals(1, seed=seed, sizes=[patients])[0]
        h.write_ndjson(d)
        n_resources = h.n_patients + len(h.observations) + len(h.conditions)
        fast = []
        for _ in range(5):
            t0 = time.perf_counter()
            build_feature_table(NdjsonDirSource(d), spec)
            fast.append(time.perf_counter() - t0)
        child = subprocess.run(
            [str(python), "-c", FHIRY_CHILD, str(d), str(repeats)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "TQDM_DISABLE": "1"},
        )
        out = json.loads(child.stdout.strip().splitlines()[-1])
        version = subprocess.run(
            [str(python), "-c", "import importlib.metadata as m; print(m.version('fhiry'), m.version('pandas'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    fhiry_s, fast_s = statistics.median(out["seconds"]), statistics.median(fast)
    return {
        "resources": n_resources,
        "observations": len(h.observations),
        "fhiry_version": version[0],
        "pandas_version": version[1],
        "fhiry_seconds": round(fhiry_s, 3),
        "fhiry_dataframe_shape": [out["rows"], out["columns"]],
        "fhiry_repeats": repeats,
        "fast_seconds": round(fast_s, 4),
        "fast_over_fhiry": round(fhiry_s / fast_s, 1),
    }


def load_sync_server(client: FhirClient, observations: int, seed: int) -> dict[str, int]:
    """A hospital whose spec Observations are a fifth of `observations`, the rest other codes."""
    per_patient = 12.7  # spec Observations per synthetic patient
    h = generate_hospitals(1, seed=seed, sizes=[max(1, round(observations / 5 / per_patient))])[0]
    spec_obs = h.observations
    filler = []
    for k, code in enumerate(FILLER_CODES):
        for o in spec_obs:
            if len(spec_obs) + len(filler) >= observations:
                break
            filler.append(
                {**o, "id": f"{o['id']}-f{k}", "code": {"coding": [{"system": "http://loinc.org", "code": code}]}}
            )
    resources = [*h.patients, *spec_obs, *filler, *h.conditions]
    for i in range(0, len(resources), 1000):
        entries = [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
            for r in resources[i : i + 1000]
        ]
        client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    return {"patients": h.n_patients, "observations": len(spec_obs) + len(filler), "spec_observations": len(spec_obs)}


def sync_benchmark(spec: FeatureSpec, observations: int, seed: int, with_bulk: bool) -> dict[str, object]:
    """The edge's first sync (as SiteData runs it: bulk "auto") and an unchanged resync, on SEKMET; with
    `with_bulk`, a first sync by Bulk $export with _typeFilter too. The mirror's table is checked against
    the server's."""
    server = start_sekmet(validation="off", extra_settings={"log_inbound": False})
    try:
        with (
            tempfile.TemporaryDirectory(prefix="mirror-") as tmp,
            FhirClient(server.base_url, auth=BearerAuth(server.token or ""), timeout=300) as client,
        ):
            t0 = time.perf_counter()
            loaded = load_sync_server(client, observations, seed)
            load_s = time.perf_counter() - t0
            print(f"SEKMET loaded in {load_s:.0f}s: {loaded}")
            needs = needs_for(spec)

            def run(path: Path, options: SyncOptions) -> tuple[float, SyncReport]:
                with MirrorStore(path) as store:
                    t = time.perf_counter()
                    report = MirrorSync(client, store, needs, options).run()
                    return time.perf_counter() - t, report

            first_s, first = run(Path(tmp) / "edge.sqlite3", SyncOptions())  # what the edge runs (bulk: auto)
            bulk = run(Path(tmp) / "bulk.sqlite3", SyncOptions(bulk="always")) if with_bulk else None
            resync = [run(Path(tmp) / "edge.sqlite3", SyncOptions()) for _ in range(5)]
            mirror_table = build_feature_table(MirrorSource(Path(tmp) / "edge.sqlite3"), spec)
            server_table = build_feature_table(FhirSearchSource(client, needs=needs, count=1000), spec)
            assert mirror_table.equals(server_table), "the mirror's table differs from the server's"
            assert all(r.changed() == {t: 0 for t in needs} for _, r in resync), "an unchanged resync changed rows"
    finally:
        server.stop()
    obs = first.types["Observation"]
    return {
        "server": loaded,
        "load_seconds": round(load_s, 1),
        "first_sync_s_60k_obs": round(first_s, 2),
        "first_sync_via": "bulk $export" if first.bulk else "search",
        "first_sync_requests": first.requests,
        "first_sync_observations_mirrored": obs.rows,
        "first_sync_observation_bodies_read": obs.bodies,
        "first_sync_bulk_typefilter_s": round(bulk[0], 2) if bulk else None,
        "first_sync_bulk_typefilter_requests": bulk[1].requests if bulk else None,
        "resync_unchanged_s": round(statistics.median(t for t, _ in resync), 3),
        "resync_unchanged_requests": resync[0][1].requests,
        "resync_unchanged_observation_bodies_read": max(r.types["Observation"].bodies for _, r in resync),
        "resync_repeats": len(resync),
    }


def fhiry_md(f: dict[str, object]) -> str:
    if "skipped" in f:
        return f"## fhiry\n\nNot measured: {f['skipped']}.\n"
    return f"""## Against fhiry

fhiry {f["fhiry_version"]} (pandas {f["pandas_version"]}), `fhiry.parallel.ndjson(folder)` — its fastest
way in, one process per CPU — turns the same ndjson files ({f["resources"]:,} resources, one synthetic site of
{f["observations"]:,} Observations) into a DataFrame of shape {f["fhiry_dataframe_shape"]}: median
{f["fhiry_seconds"]:.2f} s over {f["fhiry_repeats"]} runs. Our fast path turns them into the finished feature
table in {f["fast_seconds"] * 1000:.1f} ms (median of 5), in one process: **fast_over_fhiry =
{f["fast_over_fhiry"]:,}** (target >= 5). fhiry runs in its own venv (it pulls google-cloud-bigquery, grpcio
and pandas, none of which the project carries):

    python -m venv /tmp/fhai-fhiry-venv && /tmp/fhai-fhiry-venv/bin/pip install fhiry==5.2.2
    # or point --fhiry-python / FHAI_FHIRY_PYTHON at another interpreter that has it
"""


def sync_md(m: dict[str, object]) -> str:
    if "skipped" in m:
        return "## Edge mirror sync\n\nNot measured (--sync-observations 0).\n"
    srv = m["server"]
    assert isinstance(srv, dict)
    return f"""## Edge mirror sync (SEKMET)

A SEKMET server (validation off for loading, loaded in {m["load_seconds"]} s) holds {srv["observations"]:,}
Observations of {srv["patients"]:,} patients; {srv["spec_observations"]:,} of them (a fifth) carry the spec's
codes, the rest other LOINC codes. The edge's mirror (`MirrorSync`, what `SiteData` and `fhai-fhir sync` run):

| pass | seconds | requests | Observations read / kept |
|---|---:|---:|---:|
| first sync (`bulk="auto"`: by {m["first_sync_via"]}) | {m["first_sync_s_60k_obs"]} | {m["first_sync_requests"]} | {m["first_sync_observation_bodies_read"]:,} / {m["first_sync_observations_mirrored"]:,} |
| first sync by Bulk $export with `_typeFilter` (`bulk="always"`) | {m["first_sync_bulk_typefilter_s"]} | \
{m["first_sync_bulk_typefilter_requests"]} | |
| unchanged resync (median of {m["resync_repeats"]}) | {m["resync_unchanged_s"]} | {m["resync_unchanged_requests"]} | {m["resync_unchanged_observation_bodies_read"]} / 0 written |

The first sync asks only for the spec's codes (`_typeFilter` on the export, `code=` on searches); an
unchanged resync lists ids and versions (`_elements=id,meta`), reads `_history` since the last pass and
compares counts, and reads no Observation body. The script checks that the mirror's feature table equals the
one built from a fresh search of the server.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients-per-site", type=int, default=3500)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--strict-repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--fhiry-python", type=Path, default=Path(os.environ.get("FHAI_FHIRY_PYTHON", FHIRY_PYTHON)))
    ap.add_argument("--fhiry-patients", type=int, default=60)
    ap.add_argument("--fhiry-repeats", type=int, default=3)
    ap.add_argument("--sync-observations", type=int, default=60000, help="0: skip the mirror benchmark")
    ap.add_argument("--sync-bulk", action="store_true", help="also time a first sync by $export + _typeFilter")
    args = ap.parse_args()
    spec = load_spec(SPEC)

    with tempfile.TemporaryDirectory(prefix="fhir-ingest-") as tmp:
        d = Path(tmp)
        t0 = time.perf_counter()
        counts = write_dataset(d, args.patients_per_site, args.seed)
        gen_s = time.perf_counter() - t0
        n_obs = counts["Observation"]
        size_mb = sum(p.stat().st_size for p in d.iterdir()) / 1e6
        print(f"dataset: {counts} ({size_mb:.0f} MB ndjson, generated and written in {gen_s:.1f}s)")

        tables = {}

        def fast() -> None:
            tables["fast"] = build_feature_table(NdjsonDirSource(d), spec)

        def strict() -> None:
            tables["strict"] = build_feature_table(NdjsonDirSource(d), spec, strict=True)

        load_before = os.getloadavg()
        times: dict[str, list[float]] = {"parse": [], "fast": [], "strict": []}
        cpu: dict[str, list[float]] = {"parse": [], "fast": [], "strict": []}
        for r in range(max(args.repeats, args.strict_repeats)):  # interleaved, so noise hits all alike
            runs = [("parse", lambda: parse_only(d)), ("fast", fast)] if r < args.repeats else []
            runs += [("strict", strict)] if r < args.strict_repeats else []
            for name, fn in runs:
                wall, cpu_s = timed(fn)
                times[name].append(wall)
                cpu[name].append(cpu_s)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items() if len(v) > r))
        load_after = os.getloadavg()

    print("fhiry on the same files as our fast path ...")
    fhiry = fhiry_comparison(spec, args.fhiry_python, args.fhiry_patients, args.fhiry_repeats, args.seed)
    print(fhiry)
    sync = (
        sync_benchmark(spec, args.sync_observations, args.seed, args.sync_bulk)
        if args.sync_observations
        else {"skipped": True}
    )
    print(sync)
    # same input, same output: the strict path only adds validation (every resource here is valid)
    assert tables["fast"].equals(tables["strict"]), "fast and strict paths disagree"
    assert tables["fast"].report.as_dict() == tables["strict"].report.as_dict(), "fast and strict reports differ"
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    res = {
        "observations": n_obs,
        "resources": sum(counts.values()),
        "patients": counts["Patient"],
        "rows": tables["fast"].n_rows,
        "columns": len(tables["fast"].columns),
        "parse_obs_per_s": round(n_obs / med["parse"]),
        "fast_obs_per_s": round(n_obs / med["fast"]),
        "strict_obs_per_s": round(n_obs / med["strict"]),
        "fast_over_parse": round(med["parse"] / med["fast"], 3),
        "strict_over_fast": round(med["fast"] / med["strict"], 3),
        "median_seconds": {k: round(v, 3) for k, v in med.items()},
        "median_cpu_us_per_obs": {k: round(v / n_obs * 1e6, 1) for k, v in med_cpu.items()},
        "fast_over_fhiry": fhiry.get("fast_over_fhiry"),
        "fhiry": fhiry,
        "first_sync_s_60k_obs": sync.get("first_sync_s_60k_obs"),
        "resync_unchanged_s": sync.get("resync_unchanged_s"),
        "mirror_sync": sync,
        "strict_workers": os.cpu_count(),
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(load_after[0], 2)},
        "repeats": {k: len(v) for k, v in times.items()},
        "targets": {"fast_over_parse": 0.5, "strict_obs_per_s": 5000, "fast_over_fhiry": 5},
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "command": "python bench/fhir_ingest.py " + " ".join(sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fhir_ingest.json").write_text(json.dumps(res, indent=2) + "\n")
    ok = lambda b: "yes" if b else "NO"  # noqa: E731
    cpu_us = res["median_cpu_us_per_obs"]
    md = f"""# FHIR ingest benchmark

Bulk ndjson (5 synthetic sites, {n_obs:,} Observations, {counts["Patient"]:,} Patients, mixed units) to a
feature table with `firmware_configs/tasks/synthetic_diabetes.yaml` ({res["columns"]} columns). Parse-only is
`orjson.loads` of every line, the floor any pipeline on the same JSON library pays. Medians of
{res["repeats"]["fast"]} (parse, fast) and {res["repeats"]["strict"]} (strict) interleaved runs in one benchmark process.

| path | median s | Observations/s | vs parse-only | CPU µs / Observation |
|---|---:|---:|---:|---:|
| parse only (orjson) | {med["parse"]:.2f} | {res["parse_obs_per_s"]:,} | 1.00 | {cpu_us["parse"]:.1f} |
| fast (dict access) | {med["fast"]:.2f} | {res["fast_obs_per_s"]:,} | {res["fast_over_parse"]:.2f} | {cpu_us["fast"]:.1f} |
| strict (R4B validation) | {med["strict"]:.2f} | {res["strict_obs_per_s"]:,} | {med["parse"] / med["strict"]:.2f} \
| {cpu_us["strict"]:.1f} |

Targets: fast_over_parse >= 0.5: {ok(res["fast_over_parse"] >= 0.5)}; strict_obs_per_s >= 5000:
{ok(res["strict_obs_per_s"] >= 5000)}. Python {res["python"]}, {res["machine"]}, {res["strict_workers"]} CPUs (strict
uses one worker process per CPU), 1-minute load average {res["load_average_1min"]["before"]} before and
{res["load_average_1min"]["after"]} after (other work on the machine counts in wall time, not in CPU time).

Both paths read the same files and give the same table and report (the script asserts it). The fast path
parses each line with orjson in the feature builder's own loop and takes the happy path (plain subscripts)
for regular Observations; the strict path sends raw lines to the workers, which parse them and validate
with `fhir.resources.R4B` every resource that feeds the table — every Patient, every Observation with a spec
code, every Condition with a label code — and nothing else (docs/fhir.md, "Fast and strict").

{fhiry_md(fhiry)}
{sync_md(sync)}
Command: `{res["command"]}`
"""
    (args.out / "fhir_ingest.md").write_text(md)
    print(json.dumps({k: res[k] for k in ("fast_obs_per_s", "strict_obs_per_s", "fast_over_parse")}))


if __name__ == "__main__":
    main()
