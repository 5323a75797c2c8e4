"""Coordinator aggregation, measured on the path users run, and decode+fold alone.

`coordinator`: signed, zstd-compressed 8-bit update frames of a 1M-parameter model go through
`RoundManager.handle_update` (signature, checks, decode, fold, the store with its group commit as the
service batches it) and the round close (aggregate, checkpoint, retention), with SQLite, at 100, 1,000 and
10,000 updates. Frames are made once, up front, into one file and read one at a time (reading is not timed).
`decode_fold` (second figure): the same bodies decoded and folded per strategy, without frames or store.
`flower_inplace`: Flower's default in-place FedAvg (`aggregate_inplace`, as its FedAvg strategy calls it) over
the same number of float32 updates, run where flwr is installed (`--flower-python`: an interpreter that has
it, e.g. a separate venv, since flwr pins its own numpy/protobuf); skipped with a note otherwise.

Every case runs in a fresh subprocess (peak RSS = its ru_maxrss), cases are interleaved repeat by repeat so
machine noise hits them alike, and figures are medians over repeats.

    .venv/bin/python bench/aggregation.py --flower-python /tmp/flwr-venv/bin/python
    .venv/bin/python bench/aggregation.py --quick    # small counts and model, no files
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"
sys.path.insert(0, str(ROOT))

STRATEGIES: dict[str, dict[str, Any]] = {
    "fedavg": {"name": "fedavg"},
    "fedadam": {"name": "fedadam", "server_lr": 0.01},
    "clipped_fedavg": {"name": "clipped", "max_norm": 10.0, "inner": {"name": "fedavg"}},
    "trimmed_mean": {"name": "trimmed_mean", "beta": 0.1},
    "coordinate_median": {"name": "coordinate_median"},
}
TASK = "bench"
DISTINCT_BODIES = 100  # frames reuse bodies cyclically; each frame is signed by its own device
_LEN = struct.Struct("<I")


def width_for(n_params: int) -> int:
    """A binary MLP width w -> w -> 1 has w*w + 2w + 1 parameters: the w that gives about n_params."""
    return max(2, int(n_params**0.5))


def global_model(width: int) -> Any:
    """The round's global model, as the coordinator reads it back from its checkpoint."""
    from edge_runtime.messages import model_body, model_from_body
    from edge_runtime.model import Model, ModelSpec

    model = Model.create(ModelSpec(width, (width,), 2), seed=1)
    return model_from_body(model.spec.to_dict(), model_body(model))


def device_ids(count: int) -> list[str]:
    return [f"d{i:05d}" for i in range(count)]


# ----------------------------------------------------------------------------------------- the frames


def write_frames(folder: Path, n_params: int, count: int, seed: int) -> dict[str, Any]:
    """`count` signed update frames (one per device) in frames.bin, and the zstd bodies alone in bodies.bin."""
    from edge_runtime import codec, wire
    from edge_runtime.simulate import device_key

    model = global_model(width_for(n_params))
    n = model.params.size
    rng = np.random.default_rng(seed)
    bodies = []
    for _ in range(min(DISTINCT_BODIES, count)):
        delta = (rng.standard_normal(n, dtype=np.float32) * np.float32(0.01)).astype(np.float32)
        bodies.append(codec.encode(delta, 8, rng, compress=True))
    with open(folder / "bodies.bin", "wb") as out:
        for body in bodies:
            out.write(_LEN.pack(len(body)) + body)
    with open(folder / "frames.bin", "wb") as out:
        for i, device in enumerate(device_ids(count)):
            header = {"task": TASK, "round": 1, "model_version": model.version(), "n_samples": 100 + i % 50,
                      "train_loss": 0.5}  # fmt: skip
            frame = wire.encode_frame("update", device, header, bodies[i % len(bodies)], device_key(seed, device))
            out.write(_LEN.pack(len(frame)) + frame)
    return {
        "n_params": n,
        "width": width_for(n_params),
        "count": count,
        "seed": seed,
        "body_bytes": int(np.median([len(b) for b in bodies])),
    }


def read_records(path: Path) -> Any:
    with open(path, "rb") as source:
        while head := source.read(_LEN.size):
            yield source.read(_LEN.unpack(head)[0])


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def dir_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


# ------------------------------------------------------------------------------ measured processes


def coordinator_child(k: int, folder: Path, layout: dict[str, Any], work: Path) -> dict[str, Any]:
    """k frames through RoundManager.handle_update in the service's group-commit batches, then the close."""
    import json as _json

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from coordinator.aggregation import build_strategy, encode_state
    from coordinator.demo import TASK_FILE
    from coordinator.rounds import RoundManager
    from coordinator.service import MAX_BATCH
    from coordinator.store import Round, Store
    from coordinator.task import TaskDefinition, load_task
    from edge_runtime import codec, wire
    from edge_runtime.keys import public_hex
    from edge_runtime.messages import model_body
    from edge_runtime.simulate import device_key

    data = load_task(TASK_FILE).model_dump()
    data.update(task=TASK, rounds=1, cohort_size=k, min_updates=k, round_deadline_s=1e6, cohort_wait_s=0,
                codec={"bits": 8, "compress": True}, export={"formats": []})  # fmt: skip
    task = TaskDefinition.model_validate(data)
    store = Store(f"sqlite:///{work / 'fhai.db'}")
    ids = device_ids(k)
    store.add_devices([(d, public_hex(device_key(layout["seed"], d))) for d in ids])
    # Round 0 (the stats round) committed with the global model the frames were trained from.
    model = global_model(layout["width"])
    store.add_task(TASK, task.model_dump_json())
    store.open_round(Round(task_id=TASK, round=0, phase="stats", status="collecting", model_version="none",
                           cohort="[]", deadline=0.0))  # fmt: skip
    state = encode_state({"strategy": np.asarray("fedavg")})
    store.commit_round(TASK, 0, model.version(), _json.dumps(model.spec.to_dict()), model_body(model), state,
                       time.time())  # fmt: skip
    manager = RoundManager(store, task, Ed25519PrivateKey.generate(), lambda *_: None, work / "spill")
    manager.start()
    for d in ids:
        manager.handle_status(wire.status_topic(d), b'{"state": "online"}')
    round_open = True
    try:
        manager.tick()  # opens round 1: publishes the model and the announcement listing the cohort
    except wire.WireError as exc:  # the announcement cannot list this many devices (issue 12's follow-up)
        round_open = False
        manager._announce = lambda: None  # type: ignore[method-assign]  # measure the update path regardless
        manager.tick()
        print(f"round could not be announced: {exc}", file=sys.stderr)
    assert manager.state is not None and manager.state.row.round == 1
    # Warm-up on a tiny vector: loads the codec's and the fold's compiled kernels, as a running coordinator has.
    with build_strategy("fedavg").new_accumulator(512) as acc:
        acc.add(
            codec.decode(codec.encode(np.ones(512, np.float32), 8, np.random.default_rng(0), compress=True), 512), 1.0
        )
    rss_before = rss_mb()
    handle_s = 0.0
    batch: list[tuple[str, bytes]] = []
    accepted = 0

    def flush() -> float:
        nonlocal accepted
        t0 = time.perf_counter()
        with store.group_commit():
            for topic, payload in batch:
                accepted += manager.handle_update(topic, payload)
        batch.clear()
        return time.perf_counter() - t0

    for i, frame in enumerate(read_records(folder / "frames.bin")):
        if i == k:
            break
        batch.append((wire.update_topic(TASK, ids[i]), frame))
        if len(batch) == MAX_BATCH:
            handle_s += flush()
    handle_s += flush() if batch else 0.0
    db_mb_before_close = dir_mb(work)
    t0 = time.perf_counter()
    manager.tick()  # closes the round: aggregate, checkpoint, drop the bodies, give the pages back
    close_s = time.perf_counter() - t0
    assert accepted == k, (accepted, [(r.code, r.reason) for r in store.rejections(TASK)[:3]])
    assert store.current_round(TASK).status == "committed"  # type: ignore[union-attr]
    total = handle_s + close_s
    return {
        "updates": k,
        "updates_per_s": k / total,
        "total_s": total,
        "handle_ms_per_update": 1e3 * handle_s / k,
        "close_s": close_s,
        "disk_mb_before_close": db_mb_before_close,
        "disk_mb_after_commit": dir_mb(work),
        "round_open": round_open,
        "rss_before_mb": rss_before,
        "peak_rss_mb": rss_mb(),
    }


def decode_fold_child(strategy_key: str, k: int, folder: Path, layout: dict[str, Any], work: Path) -> dict[str, Any]:
    """Decode and fold k of the same bodies (no frames, no store), then aggregate."""
    from coordinator.aggregation import build_strategy
    from edge_runtime import codec

    n = layout["n_params"]
    params = global_model(layout["width"]).params
    bodies = list(read_records(folder / "bodies.bin"))
    warm = build_strategy(STRATEGIES[strategy_key])
    with warm.new_accumulator(n, work) as acc:
        acc.add(codec.decode(bodies[0], n), 1.0)
    rss_before = rss_mb()
    decode_s = fold_s = 0.0
    start = time.perf_counter()
    strategy = build_strategy(STRATEGIES[strategy_key])
    acc = strategy.new_accumulator(n, work)
    for i in range(k):
        t0 = time.perf_counter()
        delta = codec.decode(bodies[i % len(bodies)], n)
        t1 = time.perf_counter()
        acc.add(delta, float(100 + i % 50))
        decode_s += t1 - t0
        fold_s += time.perf_counter() - t1
    t_agg = time.perf_counter()
    new = strategy.aggregate(params, acc)
    acc.close()
    end = time.perf_counter()
    assert new.shape == (n,) and np.isfinite(new).all()
    return {
        "updates": k,
        "updates_per_s": k / (end - start),
        "total_s": end - start,
        "aggregate_s": end - t_agg,
        "decode_ms_per_update": 1e3 * decode_s / k,
        "fold_ms_per_update": 1e3 * fold_s / k,
        "rss_before_mb": rss_before,
        "peak_rss_mb": rss_mb(),
    }


FLOWER_CHILD = r"""
import json, resource, sys, time
import numpy as np
import flwr
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.strategy.aggregate import aggregate_inplace
k, n, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(seed)
# Flower's FedAvg receives every client's FitRes (float32 arrays, serialized) before aggregating them.
results = [
    (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(
        [(rng.standard_normal(n, dtype=np.float32) * np.float32(0.01))]), 100 + i % 50, {}))
    for i in range(k)
]
t0 = time.perf_counter()
params = aggregate_inplace(results)
took = time.perf_counter() - t0
assert params[0].shape == (n,) and np.isfinite(params[0]).all()
print(json.dumps({"updates": k, "total_s": took, "updates_per_s": k / took, "flwr": flwr.__version__,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_child(args: list[str], python: str | None = None) -> dict[str, Any]:
    cmd = [python, "-c", FLOWER_CHILD, *args] if python is not None else [sys.executable, __file__, "--child", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- the run


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            out[key] = value
        else:
            out[key] = round(statistics.median(r[key] for r in runs), 3)
    out["runs"] = len(runs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-params", type=int, default=1_000_000)
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 1000, 10_000])
    parser.add_argument(
        "--large-repeats", type=int, default=1, help="repeats of the largest count (its frames: ~10 GB)"
    )
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--flower-python", default=None, help="a Python interpreter with flwr installed")
    parser.add_argument("--quick", action="store_true", help="a small smoke run; writes no docs")
    parser.add_argument("--work-dir", type=Path, default=None, help="where frames and stores go")
    parser.add_argument("--frames-dir", type=Path, default=None, help="keep the frames here and reuse them next time")
    args = parser.parse_args()
    if args.quick:
        args.n_params, args.counts, args.repeats, args.large_repeats = 40_000, [20, 200], 1, 1
    counts = sorted(args.counts)
    largest = counts[-1]

    root = tempfile.TemporaryDirectory(prefix="fhai-bench-agg-", dir=args.work_dir)
    folder = args.frames_dir or Path(root.name)
    folder.mkdir(parents=True, exist_ok=True)
    saved = folder / "layout.json"
    t0 = time.perf_counter()
    if (
        saved.exists()
        and json.loads(saved.read_text())["count"] >= largest
        and json.loads(saved.read_text())["n_params"] == global_model(width_for(args.n_params)).params.size
    ):
        layout = json.loads(saved.read_text())
        print(f"reusing {layout['count']} frames in {folder}", flush=True)
    else:
        layout = write_frames(folder, args.n_params, largest, seed=42)
        saved.write_text(json.dumps(layout))
        print(f"wrote {largest} frames (bodies of ~{layout['body_bytes']} bytes) in {time.perf_counter() - t0:.0f}s",
              flush=True)  # fmt: skip

    flower = args.flower_python
    if flower is not None and subprocess.run([flower, "-c", "import flwr"], capture_output=True).returncode != 0:
        print(f"{flower} cannot import flwr: Flower is skipped", flush=True)
        flower = None
    cases: list[tuple[str, str, int]] = [("coordinator", "", k) for k in counts]
    cases += [("decode_fold", s, k) for s in args.strategies for k in counts[:2]]
    if flower is not None:
        cases += [("flower_inplace", "", k) for k in counts[:2]]
    results: dict[tuple[str, str, int], list[dict[str, Any]]] = {c: [] for c in cases}
    for repeat in range(args.repeats):
        for case in cases:
            kind, strategy, k = case
            if k == largest and repeat >= args.large_repeats and kind == "coordinator":
                continue
            work = Path(tempfile.mkdtemp(prefix=f"{kind}-{k}-", dir=root.name))
            if kind == "coordinator":
                r = run_child(["coordinator", str(k), str(folder), json.dumps(layout), str(work)])
            elif kind == "decode_fold":
                r = run_child(["decode_fold", strategy, str(k), str(folder), json.dumps(layout), str(work)])
            else:
                r = run_child([str(k), str(layout["n_params"]), "7"], python=flower)
            results[case].append(r)
            print(f"[{repeat + 1}/{args.repeats}] {kind:15s} {strategy:18s} {k:6d}: {r['updates_per_s']:8.1f}/s "
                  f"total {r['total_s']:.2f}s peak {r['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
            subprocess.run(["rm", "-rf", str(work)], check=False)
    root.cleanup()

    coordinator = {str(k): median_of(results[("coordinator", "", k)]) for k in counts}
    decode_fold: dict[str, dict[str, Any]] = {}
    for (kind, strategy, k), runs in results.items():
        if kind == "decode_fold":
            decode_fold.setdefault(strategy, {})[str(k)] = median_of(runs)
    flower_runs = {str(k): median_of(results[("flower_inplace", "", k)]) for k in counts[:2]} if flower else {}
    mid = str(counts[1]) if len(counts) > 1 else str(counts[0])
    report: dict[str, Any] = {
        "benchmark": "aggregation",
        "command": " ".join(["python bench/aggregation.py", *sys.argv[1:]]),
        "n_params": layout["n_params"],
        "bits": 8,
        "compressed": True,
        "body_bytes": layout["body_bytes"],
        "counts": counts,
        "repeats": args.repeats,
        "statistic": "median over repeats (the largest count: --large-repeats); each run a fresh subprocess",
        f"coordinator_updates_per_s_{mid}": coordinator[mid]["updates_per_s"],
        f"coordinator_s_{mid}": coordinator[mid]["total_s"],
        f"decode_fold_updates_per_s_{mid}": decode_fold.get("fedavg", {}).get(mid, {}).get("updates_per_s"),
        f"disk_mb_after_commit_{mid}": coordinator[mid]["disk_mb_after_commit"],
        f"flower_inplace_s_{mid}": flower_runs.get(mid, {}).get("total_s"),
        "flower": flower_runs[mid]["flwr"] if flower_runs else "not installed: skipped",
        **{f"peak_rss_mb_{k}": coordinator[str(k)]["peak_rss_mb"] for k in counts},
        **{f"round_open_{k}": coordinator[str(k)]["round_open"] for k in counts},
        "coordinator": coordinator,
        "decode_fold": decode_fold,
        "flower_inplace": flower_runs,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "platform": platform.platform(),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
    }
    if decode_fold.get("fedavg", {}).get(mid):
        # The same run's decode+fold: on a shared machine the ratio says more than either figure alone.
        report[f"coordinator_over_decode_fold_{mid}"] = round(
            coordinator[mid]["updates_per_s"] / decode_fold["fedavg"][mid]["updates_per_s"], 3
        )
    report["rss_ratio_largest_over_smallest"] = round(
        coordinator[str(largest)]["peak_rss_mb"] / coordinator[str(counts[0])]["peak_rss_mb"], 3
    )
    print(json.dumps({k: v for k, v in report.items() if k not in ("coordinator", "decode_fold", "flower_inplace")},
                     indent=2))  # fmt: skip
    if not args.quick:
        DOCS.mkdir(parents=True, exist_ok=True)
        (DOCS / "aggregation.json").write_text(json.dumps(report, indent=2) + "\n")
        (DOCS / "aggregation.md").write_text(markdown(report))
        print(f"wrote {DOCS / 'aggregation.json'} and {DOCS / 'aggregation.md'}")


def markdown(report: dict[str, Any]) -> str:
    counts = report["counts"]
    lines = [
        "# Aggregation benchmark",
        "",
        f"{report['n_params']:,} float32 parameters, updates at {report['bits']} bits, zstd-compressed "
        f"(~{report['body_bytes']:,} bytes), each in a frame signed by its own device. Medians of "
        f"{report['repeats']} runs (largest count: see the JSON), each case in a fresh process, cases interleaved; "
        f"{report['machine']['cpus']} shared cores (load average at the end "
        f"{report['machine']['load_average_at_end']}). Command: `{report['command']}`.",
        "",
        "## The path users run: `RoundManager.handle_update` + the round close, store included (SQLite)",
        "",
        "| updates | updates/s | total s | handle ms/update | close s | disk MB before close | disk MB after commit "
        "| peak RSS MB | round announced |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for k in counts:
        c = report["coordinator"][str(k)]
        lines.append(
            f"| {k} | {c['updates_per_s']:.0f} | {c['total_s']:.2f} | {c['handle_ms_per_update']:.2f} "
            f"| {c['close_s']:.2f} | {c['disk_mb_before_close']:.0f} | {c['disk_mb_after_commit']:.1f} "
            f"| {c['peak_rss_mb']:.0f} | {'yes' if c['round_open'] else 'no (FHAI-W002)'} |"
        )
    mid = str(counts[1]) if len(counts) > 1 else str(counts[0])
    if f"coordinator_over_decode_fold_{mid}" in report:
        lines += ["", f"At {mid} updates the whole path runs at {report[f'coordinator_over_decode_fold_{mid}']:.2f}x "
                  "the speed of decode+fold alone measured in the same run (below)."]  # fmt: skip
    lines += ["", "## Decode + fold alone (no frames, no store)", "",
              "| strategy | " + " | ".join(f"updates/s ({k})" for k in counts[:2]) + " | decode ms | fold ms |",
              "|---|" + "---:|" * (len(counts[:2]) + 2)]  # fmt: skip
    for name, by_k in report["decode_fold"].items():
        last = by_k[str(counts[:2][-1])]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{by_k[str(k)]['updates_per_s']:.0f}" for k in counts[:2])
            + f" | {last['decode_ms_per_update']:.2f} | {last['fold_ms_per_update']:.2f} |"
        )
    lines += ["", "## Flower's default in-place FedAvg (`aggregate_inplace`), same run", ""]
    if report["flower_inplace"]:
        for k, f in report["flower_inplace"].items():
            c = report["coordinator"][k]
            lines.append(
                f"- {k} float32 updates already received and deserialized: {f['total_s']:.2f} s, peak RSS "
                f"{f['peak_rss_mb']:.0f} MB (flwr {f['flwr']}); FH-AI's whole path for {k}: {c['total_s']:.2f} s, "
                f"peak RSS {c['peak_rss_mb']:.0f} MB."
            )
    else:
        lines.append("flwr was not installed for this run (`--flower-python`): skipped.")
    lines += [
        "",
        "Flower's figure covers averaging only: its clients' updates arrive over gRPC, unsigned and float32, and are "
        "held in memory all at once. FH-AI's figure covers checking each signature, decoding, folding into a "
        "running sum (memory O(model)), writing each body to the store with one disk sync per batch of "
        "acknowledgements (group commit), aggregating, checkpointing, and dropping the bodies at the commit.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        which = sys.argv[2]
        if which == "coordinator":
            _, _, _, k, folder, layout, work = sys.argv
            out = coordinator_child(int(k), Path(folder), json.loads(layout), Path(work))
        else:
            _, _, _, strategy, k, folder, layout, work = sys.argv
            out = decode_fold_child(strategy, int(k), Path(folder), json.loads(layout), Path(work))
        print(json.dumps(out))
    else:
        main()
