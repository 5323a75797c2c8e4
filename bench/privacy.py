"""Secure aggregation against the plain path: bytes per device and coordinator seconds, in one run.

For each (model size, cohort) the same device updates go two ways, side by side:

- plain: what a device sends today, the signed wire frame of an 8-bit codec body with zstd
  (edge_runtime.codec + wire), and the coordinator's work: verify + decode + fold into FedAvg's sum;
- secure: the shared 8-bit grid (clip, rotate, stochastic rounding; ring of k bits for the cohort), the
  four SecAgg+ rounds in process with the real encoded messages (edge_runtime.secagg), 30% of the
  cohort dropping after sharing keys (so after they would have masked), and the coordinator's state
  machine (verify, route, sum, rebuild secrets, remove masks) plus decoding the sum.

Bytes per device are what one surviving device sends over the four rounds (median over devices);
`expansion` is secure / plain. `grid16` rows repeat the cohort of 100 with Bonawitz et al.'s setting
(16-bit values, no guard bit) for comparison with their 1.73x. Each (size, cohort) runs once (the
protocol itself is the repetition: medians are over its devices); the coordinator time is one run's.

    .venv/bin/python bench/privacy.py              # writes docs/benchmarks/privacy.{json,md}
    .venv/bin/python bench/privacy.py --quick      # small smoke run, no files
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.aggregation.accumulators import MeanAccumulator  # noqa: E402
from coordinator.privacy.secure_aggregate import decode_secure_sum  # noqa: E402
from coordinator.privacy.simulation import run_secure_sum  # noqa: E402
from edge_runtime import codec, wire  # noqa: E402
from edge_runtime.secagg import graph, grid  # noqa: E402
from edge_runtime.secagg.grid import GridSpec  # noqa: E402
from edge_runtime.secagg.update import secure_update  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks"
DROPOUT = 0.3
CASES = [  # (n_params, cohort, grid bits, guard bits)
    (1 << 16, 10, 8, 1),
    (1 << 16, 100, 8, 1),
    (1 << 16, 1000, 8, 1),
    (1 << 20, 10, 8, 1),
    (1 << 20, 100, 8, 1),
    (1 << 16, 100, 16, 0),
]


def device_deltas(n_params: int, cohort: int, seed: int) -> np.ndarray:
    """Heavy-tailed float32 updates sharing a direction (Student t, 4 d.o.f.), each device its own scale."""
    rng = np.random.default_rng(seed)
    base = rng.standard_t(4, n_params) * 2e-3
    scale = rng.uniform(0.5, 1.5, (cohort, 1))
    return (base * scale + rng.standard_t(4, (cohort, n_params)) * 2e-3).astype(np.float32)


def plain_path(deltas: np.ndarray) -> dict[str, Any]:
    """Today's path: 8-bit zstd codec body in a signed update frame; coordinator verifies, decodes, folds."""
    keys = [Ed25519PrivateKey.generate() for _ in range(len(deltas))]
    frames = []
    for i, (delta, key) in enumerate(zip(deltas, keys, strict=True)):
        body = codec.encode(delta, 8, np.random.default_rng(i), 256, compress=True)
        header = {"task": "bench", "round": 1, "model_version": "v", "n_samples": 100, "train_loss": 0.5}
        frames.append(wire.encode_frame("update", f"site-{i:04d}", header, body, key))
    public = {f"site-{i:04d}": k.public_key() for i, k in enumerate(keys)}
    acc = MeanAccumulator(deltas.shape[1], "uniform")
    t0 = time.perf_counter()
    for frame in frames:
        decoded = wire.decode_frame(frame, public.get)
        acc.add(codec.decode(decoded.body, expected_n=deltas.shape[1]), 1.0)
    mean = acc.result()
    seconds = time.perf_counter() - t0
    true_mean = deltas.astype(np.float64).mean(axis=0)
    return {
        "bytes_per_device": statistics.median(len(f) for f in frames),
        "coordinator_s": seconds,
        "mean_rel_error": float(np.linalg.norm(mean - true_mean) / np.linalg.norm(true_mean)),
    }


def secure_path(deltas: np.ndarray, bits: int, guard_bits: int, seed: int) -> dict[str, Any]:
    n, n_params = deltas.shape
    norms = np.linalg.norm(deltas.astype(np.float64), axis=1)
    clip = float(np.median(norms))  # where adaptive clipping settles at its default target quantile
    spec = GridSpec(n_params, clip, bits, n, os.urandom(32), guard_bits=guard_bits)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    updates = {f"site-{i:04d}": secure_update(d, spec, rng) for i, d in enumerate(deltas)}
    quantize_s = (time.perf_counter() - t0) / n
    names = sorted(updates)
    dropped = names[::3][: int(DROPOUT * n)]
    plan = graph.choose_graph(n, dropout_fraction=DROPOUT)
    run = run_secure_sum({k: u.ring for k, u in updates.items()}, spec.ring_bits, plan=plan, drop_after_shares=dropped)
    t0 = time.perf_counter()
    total, _ = decode_secure_sum(run.result.residues, spec, len(run.result.survivors))
    decode_s = time.perf_counter() - t0
    survivors = run.result.survivors
    expected = sum(updates[s].ring.astype(np.uint64) for s in survivors) % spec.modulus
    exact = bool((run.result.residues == expected).all()) and set(run.result.dropped) == set(dropped)
    idx = [int(s.split("-")[1]) for s in survivors]
    clipped = deltas[idx].astype(np.float64) * np.minimum(1.0, clip / norms[idx])[:, None]
    mean = total / len(survivors)
    true_mean = clipped.mean(axis=0)
    return {
        "ring_bits": spec.ring_bits,
        "graph": {"degree": plan.degree, "threshold": plan.threshold, "complete": plan.complete},
        "dropped": len(dropped),
        "dropout_recovered": exact,
        "bytes_per_device": statistics.median(run.sent_bytes[s] for s in survivors),
        "masked_vector_bytes": (spec.padded * spec.ring_bits + 7) // 8,
        "clear_grid_bytes": (spec.padded * bits + 7) // 8,
        "coordinator_s": run.coordinator_seconds + decode_s,
        "device_s_median": statistics.median(run.device_seconds[s] for s in survivors) + quantize_s,
        "mean_rel_error": float(np.linalg.norm(mean - true_mean) / np.linalg.norm(true_mean)),
        "mean_rel_error_bound": float(
            np.sqrt(grid.quantization_variance_bound(spec, len(survivors))) / len(survivors) / np.linalg.norm(true_mean)
        ),
    }


def run_case(n_params: int, cohort: int, bits: int, guard_bits: int, seed: int) -> dict[str, Any]:
    deltas = device_deltas(n_params, cohort, seed)
    plain = plain_path(deltas)
    secure = secure_path(deltas, bits, guard_bits, seed)
    return {
        "n_params": n_params,
        "cohort": cohort,
        "grid_bits": bits,
        "guard_bits": guard_bits,
        "plain": plain,
        "secure": secure,
        "expansion": secure["bytes_per_device"] / plain["bytes_per_device"],
        "expansion_vs_clear_grid": secure["bytes_per_device"] / secure["clear_grid_bytes"],
        "protocol_overhead": secure["bytes_per_device"] / secure["masked_vector_bytes"],
        "coordinator_time_ratio": secure["coordinator_s"] / plain["coordinator_s"],
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Privacy: secure aggregation vs the plain path",
        "",
        f"Command: `{report['command']}`. One in-process run per row; bytes are the median surviving device's "
        "sends over the four SecAgg+ rounds; plain is today's signed 8-bit zstd update frame. 30% of each cohort "
        "drops after sharing keys and is recovered.",
        "",
        "| params | cohort | grid bits | ring bits | graph degree / t | plain B/device | secure B/device | "
        "expansion | vs same grid in clear | protocol overhead | plain coord. s | secure coord. s | "
        "device s | exact with 30% dropped | secure mean rel. error (bound) | plain mean rel. error |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for c in report["cases"]:
        s, p = c["secure"], c["plain"]
        g = s["graph"]
        lines.append(
            f"| {c['n_params']:,} | {c['cohort']} | {c['grid_bits']} | {s['ring_bits']} | "
            f"{g['degree']} / {g['threshold']}{' (complete)' if g['complete'] else ''} | {p['bytes_per_device']:,.0f} | "
            f"{s['bytes_per_device']:,.0f} | {c['expansion']:.2f} | {c['expansion_vs_clear_grid']:.2f} | "
            f"{c['protocol_overhead']:.3f} | {p['coordinator_s']:.2f} | {s['coordinator_s']:.2f} | "
            f"{s['device_s_median']:.2f} | {s['dropout_recovered']} | {s['mean_rel_error']:.4f} "
            f"({s['mean_rel_error_bound']:.4f}) | {p['mean_rel_error']:.4f} |"
        )
    lines += [
        "",
        f"Headline: `secagg_bytes_expansion_100` = {report['secagg_bytes_expansion_100']:.2f} (2^16 parameters, "
        f"8-bit grid, against today's plain frame; target <= 1.5: "
        f"{'met' if report['secagg_bytes_expansion_100'] <= 1.5 else 'NOT met'}); with Bonawitz et al.'s 16-bit "
        f"values against the same values in the clear, {report['secagg_bytes_expansion_100_grid16']:.2f} "
        f"(they report 1.73x at 2^10 users, 2^20 values); `dropout_recovered_30pct` = "
        f"{report['dropout_recovered_30pct']}.",
        "",
        "Why the expansion is ~2x at 8 bits: the masked vector lives in a ring that must hold the cohort's sum, "
        "ceil(log2(n·L))+1 bits plus one guard bit (n=100, L=127: 16 bits) where a device's own value needs 8, and "
        "a uniformly masked vector does not compress (the plain frame's zstd saves ~10%). Keys, sealed shares and "
        "signatures (the protocol overhead column) grow with the graph degree. Mean errors are quantization only "
        "(secure: against the mean of the survivors' clipped updates; plain: against the mean of the updates).",
        "",
        f"Machine: {report['machine']}",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small cohorts and model; writes no docs")
    args = parser.parse_args()
    cases = [(1 << 12, 10, 8, 1), (1 << 12, 30, 8, 1)] if args.quick else CASES
    run_case(1024, 4, 8, 1, seed=99)  # warm-up: Numba compiles the codec and the fold on first use
    results = []
    for i, (n_params, cohort, bits, guard) in enumerate(cases):
        t0 = time.perf_counter()
        r = run_case(n_params, cohort, bits, guard, seed=i)
        results.append(r)
        print(
            f"[{i + 1}/{len(cases)}] {n_params:>9,} params x {cohort:>4} devices, {bits}-bit grid: "
            f"plain {r['plain']['bytes_per_device']:,.0f} B, secure {r['secure']['bytes_per_device']:,.0f} B "
            f"({r['expansion']:.2f}x), coordinator {r['plain']['coordinator_s']:.2f}s vs "
            f"{r['secure']['coordinator_s']:.2f}s, exact={r['secure']['dropout_recovered']} "
            f"({time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
    if args.quick:
        return

    def pick(n_params: int, cohort: int, bits: int) -> dict[str, Any]:
        return next(c for c in results if (c["n_params"], c["cohort"], c["grid_bits"]) == (n_params, cohort, bits))

    report: dict[str, Any] = {
        "benchmark": "privacy",
        "command": " ".join(["python bench/privacy.py", *sys.argv[1:]]),
        "secagg_bytes_expansion_100": pick(1 << 16, 100, 8)["expansion"],
        "secagg_bytes_expansion_100_1m": pick(1 << 20, 100, 8)["expansion"],
        "secagg_bytes_expansion_100_grid16": pick(1 << 16, 100, 16)["expansion_vs_clear_grid"],
        "dropout_recovered_30pct": all(c["secure"]["dropout_recovered"] for c in results),
        "not_measured_here": ["auroc_eps1", "auroc_eps3", "auroc_eps8", "auroc_no_dp", "individual_rows_visible"],
        "cases": results,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "platform": platform.platform(),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
    }
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "privacy.json").write_text(json.dumps(report, indent=2) + "\n")
    (DOCS / "privacy.md").write_text(markdown(report))
    print(f"wrote {DOCS / 'privacy.json'} and {DOCS / 'privacy.md'}")


if __name__ == "__main__":
    main()
