"""Coordinator aggregation: throughput and peak memory for 100 and 1,000 updates of a 1M-parameter model.

Each update is a real 8-bit body from `edge_runtime.codec`, read from disk, decoded and folded, as the
round manager does it; decoding is included in every figure. Bodies are generated once, up front,
into one file of fixed-size records, so neither this harness nor a measured process ever holds more
than one of them. Every case runs in a fresh subprocess (peak RSS = its ru_maxrss), the cases are
interleaved repeat by repeat so machine noise hits them alike, and figures are medians over repeats.

The `hold_all` case is a server that collects every decoded update before averaging them (as Flower's
strategies receive all fit results of a round at once), here with np.stack and np.average; it runs at
100 updates only unless --hold-all-1000, since at 1,000 it needs about 16 GB.

    .venv/bin/python bench/aggregation.py            # full run, writes docs/benchmarks/aggregation.*
    .venv/bin/python bench/aggregation.py --quick    # 20 and 200 updates of 100k parameters, no files
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
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"

STRATEGIES: dict[str, dict[str, Any]] = {
    "fedavg": {"name": "fedavg"},
    "fedadam": {"name": "fedadam", "server_lr": 0.01},
    "clipped_fedavg": {"name": "clipped", "max_norm": 10.0, "inner": {"name": "fedavg"}},
    "trimmed_mean": {"name": "trimmed_mean", "beta": 0.1},
    "coordinate_median": {"name": "coordinate_median"},
}
HOLD_ALL = "hold_all"


# ----------------------------------------------------------------------------------------- the bodies


def write_bodies(path: Path, n_params: int, count: int, bits: int, seed: int) -> dict[str, int]:
    """`count` distinct encoded updates as fixed-size records in one file; returns the layout."""
    from edge_runtime import codec

    rng = np.random.default_rng(seed)
    body_len = None
    with open(path, "wb") as out:
        for _ in range(count):
            # A delta of local training: mostly small, a few larger coordinates.
            delta = (rng.standard_normal(n_params, dtype=np.float32) * np.float32(0.01)).astype(np.float32)
            body = codec.encode(delta, bits, rng)
            if body_len is None:
                body_len = len(body)
            assert len(body) == body_len, "uncompressed bodies of one model all have the same size"
            out.write(body)
    assert body_len is not None
    return {"n_params": n_params, "count": count, "bits": bits, "body_len": body_len}


# ------------------------------------------------------------------------------- one measured process


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child(strategy_key: str, k: int, bodies: Path, layout: dict[str, int], spill_dir: Path) -> dict[str, Any]:
    """Read, decode and fold k updates, then aggregate; returns the timings and this process's peak RSS."""
    from coordinator.aggregation import build_strategy
    from edge_runtime import codec

    n = layout["n_params"]
    params = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    buffer = bytearray(layout["body_len"])
    view = memoryview(buffer)

    # Warm-up on a tiny model: loads the Numba kernels of the codec and the strategy from cache.
    tiny = codec.encode(np.ones(512, np.float32), layout["bits"], np.random.default_rng(0))
    if strategy_key != HOLD_ALL:
        warm = build_strategy(STRATEGIES[strategy_key])
        with warm.new_accumulator(512, spill_dir) as acc:
            acc.add(codec.decode(tiny, 512), 1.0)
            warm.aggregate(np.zeros(512, np.float32), acc)
    rss_before = rss_mb()

    decode_s = fold_s = 0.0
    start = time.perf_counter()
    with open(bodies, "rb", buffering=0) as source:
        if strategy_key == HOLD_ALL:
            held, weights = [], []
            for i in range(k):
                source.readinto(buffer)
                t0 = time.perf_counter()
                delta = codec.decode(view, n)
                t1 = time.perf_counter()
                held.append(delta)
                weights.append(float(100 + i % 50))
                decode_s += t1 - t0
            t_agg = time.perf_counter()
            new = (params + np.average(np.stack(held), axis=0, weights=weights)).astype(np.float32)
            spill_mb = 0.0
        else:
            strategy = build_strategy(STRATEGIES[strategy_key])
            acc = strategy.new_accumulator(n, spill_dir)
            for i in range(k):
                source.readinto(buffer)
                t0 = time.perf_counter()
                delta = codec.decode(view, n)
                t1 = time.perf_counter()
                acc.add(delta, float(100 + i % 50))
                t2 = time.perf_counter()
                decode_s += t1 - t0
                fold_s += t2 - t1
            t_agg = time.perf_counter()
            new = strategy.aggregate(params, acc)
            path = getattr(acc, "path", None) or getattr(getattr(acc, "inner", None), "path", None)
            spill_mb = path.stat().st_size / 2**20 if path is not None else 0.0
            acc.close()
    end = time.perf_counter()
    assert new.shape == (n,) and np.isfinite(new).all()
    return {
        "strategy": strategy_key,
        "updates": k,
        "updates_per_s": k / (end - start),
        "total_s": end - start,
        "aggregate_s": end - t_agg,
        "decode_ms_per_update": 1e3 * decode_s / k,
        "fold_ms_per_update": 1e3 * fold_s / k,
        "spill_mb": spill_mb,
        "rss_before_mb": rss_before,
        "peak_rss_mb": rss_mb(),
    }


def run_case(strategy_key: str, k: int, bodies: Path, layout: dict[str, int], work: Path) -> dict[str, Any]:
    spill = work / f"spill-{strategy_key}-{k}"
    cmd = [sys.executable, __file__, "--child", strategy_key, str(k), str(bodies), json.dumps(layout), str(spill)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- the run


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ["updates_per_s", "total_s", "aggregate_s", "decode_ms_per_update", "fold_ms_per_update", "peak_rss_mb"]
    out: dict[str, Any] = {key: round(statistics.median(r[key] for r in runs), 3) for key in keys}
    out["rss_before_mb"] = round(statistics.median(r["rss_before_mb"] for r in runs), 1)
    out["spill_mb"] = round(runs[0]["spill_mb"], 1)
    out["runs"] = len(runs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n-params", type=int, default=1_000_000)
    parser.add_argument("--counts", type=int, nargs=2, default=[100, 1000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--hold-all-1000", action="store_true", help="also run hold_all at the large count")
    parser.add_argument("--quick", action="store_true", help="a small smoke run; writes no docs")
    parser.add_argument("--work-dir", type=Path, default=None, help="where bodies and spill files go")
    args = parser.parse_args()
    if args.quick:
        args.n_params, args.counts, args.repeats = 100_000, [20, 200], 1
    small, large = args.counts

    work_root = tempfile.TemporaryDirectory(prefix="fhai-bench-agg-", dir=args.work_dir)
    work = Path(work_root.name)
    bodies = work / "bodies.bin"
    t0 = time.perf_counter()
    layout = write_bodies(bodies, args.n_params, large, bits=8, seed=42)
    print(f"wrote {large} bodies of {layout['body_len']} bytes in {time.perf_counter() - t0:.1f}s", flush=True)

    cases = [(s, k) for s in args.strategies for k in (small, large)] + [(HOLD_ALL, small)]
    if args.hold_all_1000:
        cases.append((HOLD_ALL, large))
    results: dict[tuple[str, int], list[dict[str, Any]]] = {case: [] for case in cases}
    for repeat in range(args.repeats):
        for strategy_key, k in cases:
            r = run_case(strategy_key, k, bodies, layout, work)
            results[(strategy_key, k)].append(r)
            print(
                f"[{repeat + 1}/{args.repeats}] {strategy_key:18s} {k:5d} updates: {r['updates_per_s']:8.1f}/s "
                f"peak {r['peak_rss_mb']:7.1f} MB (aggregate {r['aggregate_s']:.2f}s)",
                flush=True,
            )
    work_root.cleanup()

    per_strategy: dict[str, dict[str, Any]] = {}
    for (strategy_key, k), runs in results.items():
        per_strategy.setdefault(strategy_key, {})[str(k)] = summarize(runs)
    fedavg = per_strategy.get("fedavg", {})
    report: dict[str, Any] = {
        "benchmark": "aggregation",
        "command": " ".join(["python bench/aggregation.py", *sys.argv[1:]]),
        "n_params": args.n_params,
        "bits": 8,
        "block_size": 256,
        "counts": [small, large],
        "repeats": args.repeats,
        "statistic": "median over repeats; each run a fresh subprocess",
        "updates_per_s": fedavg.get(str(large), {}).get("updates_per_s"),
        f"peak_rss_mb_{small}": fedavg.get(str(small), {}).get("peak_rss_mb"),
        f"peak_rss_mb_{large}": fedavg.get(str(large), {}).get("peak_rss_mb"),
        "strategies": per_strategy,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "platform": platform.platform(),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
    }
    if fedavg:
        report["rss_ratio_large_over_small"] = round(
            fedavg[str(large)]["peak_rss_mb"] / fedavg[str(small)]["peak_rss_mb"], 3
        )
        hold = per_strategy[HOLD_ALL][str(small)]
        report["vs_hold_all_at_small"] = {
            "speedup": round(fedavg[str(small)]["updates_per_s"] / hold["updates_per_s"], 2),
            "peak_rss_ratio": round(hold["peak_rss_mb"] / fedavg[str(small)]["peak_rss_mb"], 2),
        }
    print(json.dumps({k: v for k, v in report.items() if k != "strategies"}, indent=2))
    if not args.quick:
        DOCS.mkdir(parents=True, exist_ok=True)
        (DOCS / "aggregation.json").write_text(json.dumps(report, indent=2) + "\n")
        (DOCS / "aggregation.md").write_text(markdown(report))
        print(f"wrote {DOCS / 'aggregation.json'} and {DOCS / 'aggregation.md'}")


def markdown(report: dict[str, Any]) -> str:
    small, large = report["counts"]
    lines = [
        "# Aggregation benchmark",
        "",
        f"{report['n_params']:,} float32 parameters, updates encoded at {report['bits']} bits (blocks of "
        f"{report['block_size']}) by `edge_runtime.codec`, read from disk, decoded and folded: decoding is "
        f"included. Medians of {report['repeats']} runs, each case in a fresh process, cases interleaved; "
        f"{report['machine']['cpus']} shared cores. Command: `{report['command']}`.",
        "",
        f"| strategy | updates/s ({small}) | updates/s ({large}) | decode ms | fold ms | aggregate s ({large}) "
        f"| peak RSS MB ({small}) | peak RSS MB ({large}) | spill MB ({large}) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, by_k in report["strategies"].items():
        a, b = by_k.get(str(small), {}), by_k.get(str(large), {})

        def cell(d: dict[str, Any], key: str, fmt: str) -> str:
            return format(d[key], fmt) if key in d else "not run"

        lines.append(
            f"| {name} | {cell(a, 'updates_per_s', '.0f')} | {cell(b, 'updates_per_s', '.0f')} "
            f"| {cell(b or a, 'decode_ms_per_update', '.2f')} | {cell(b or a, 'fold_ms_per_update', '.2f')} "
            f"| {cell(b, 'aggregate_s', '.2f')} | {cell(a, 'peak_rss_mb', '.0f')} | {cell(b, 'peak_rss_mb', '.0f')} "
            f"| {cell(b, 'spill_mb', '.0f')} |"
        )
    lines += [
        "",
        f"FedAvg: **{report['updates_per_s']:.0f} updates/s** at {large} updates (target >= 200); peak RSS "
        f"{report[f'peak_rss_mb_{small}']:.0f} MB at {small} and {report[f'peak_rss_mb_{large}']:.0f} MB at {large} "
        f"updates (ratio {report.get('rss_ratio_large_over_small')}, target <= 1.10).",
    ]
    if "vs_hold_all_at_small" in report:
        vs = report["vs_hold_all_at_small"]
        base = report["strategies"]["fedavg"][str(small)]["rss_before_mb"]
        hold = report["strategies"][HOLD_ALL][str(small)]["peak_rss_mb"]
        lines.append(
            f"Against holding every decoded update and averaging at the end (`hold_all`, {small} updates): "
            f"{vs['speedup']}x the throughput and {vs['peak_rss_ratio']}x less peak memory. Above the "
            f"{base:.0f} MB the process holds after imports and warm-up, FedAvg adds "
            f"{report[f'peak_rss_mb_{large}'] - base:.0f} MB at {large} updates, `hold_all` "
            f"{hold - base:.0f} MB at {small}."
        )
    lines += [
        "",
        "Peak RSS includes the interpreter, numpy, numba and the codec. Robust strategies spill one float32 row per update to disk and "
        "read it back in 32 MB chunks of parameters, so their memory does not grow with the number of updates "
        "either; their cost is the disk file and the sort in `aggregate`.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, key, k, bodies, layout, spill = sys.argv
        print(json.dumps(child(key, int(k), Path(bodies), json.loads(layout), Path(spill))))
    else:
        main()
