"""On-device inference: latency per patient, batch throughput, file size and memory, per backend, side by side.

Backends: the numpy model (`Model.predict_proba`), onnxruntime, LiteRT float32 and LiteRT int8. The model is an
MLP (16, 8) trained with the project's trainer on scikit-learn's breast cancer table (70/30 split), exported
with coordinator.export. Everything that runs on a device is measured in subprocesses that never import
tensorflow (as on a gateway); this parent process trains and exports (coordinator side).

    .venv/bin/python bench/inference.py            # writes docs/benchmarks/inference.{json,md}

Timings interleave the backends call by call (the machine is shared), quote medians, and pin every backend to
one thread (a small gateway's share of a core). Memory is measured in one fresh process per backend.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("numpy", "onnxruntime", "litert_float", "litert_int8")
ARTIFACT = {"onnxruntime": "model.onnx", "litert_float": "model.tflite", "litert_int8": "model.int8.tflite"}


# ---- edge side (subprocesses; no tensorflow, no coordinator) ---------------------------------------------------


def _load_backend(work: Path, backend: str, threads: int) -> object:
    from edge_runtime.inference import load_predictor
    from edge_runtime.model import Model, ModelSpec, Standardizer

    if backend == "numpy":
        spec = ModelSpec.from_dict(json.loads((work / "spec.json").read_text()))
        with np.load(work / "model.npz", allow_pickle=False) as z:
            return Model(spec, z["params"], Standardizer(z["mean"], z["scale"]))
    return load_predictor(work / ARTIFACT[backend], num_threads=threads)


def _worker_timing(work: Path, threads: int, latency_calls: int, repeats: int) -> dict[str, object]:
    with np.load(work / "data.npz", allow_pickle=False) as z:
        X_table, X_batch = z["X_table"], z["X_batch"]
    predictors = {b: _load_backend(work, b, threads) for b in BACKENDS}
    outputs = {b: p.predict_proba(X_table) for b, p in predictors.items()}  # type: ignore[attr-defined]

    rows = [X_table[i : i + 1] for i in range(len(X_table))]
    for p in predictors.values():  # warm up at batch size 1 (LiteRT resizes its input once)
        for r in rows[:50]:
            p.predict_proba(r)  # type: ignore[attr-defined]
    latency: dict[str, list[int]] = {b: [] for b in BACKENDS}
    for i in range(latency_calls):
        r = rows[i % len(rows)]
        for b, p in predictors.items():
            t0 = time.perf_counter_ns()
            p.predict_proba(r)  # type: ignore[attr-defined]
            latency[b].append(time.perf_counter_ns() - t0)

    batch: dict[str, list[float]] = {b: [] for b in BACKENDS}
    for p in predictors.values():
        p.predict_proba(X_batch)  # type: ignore[attr-defined]
    for _ in range(repeats):
        for b, p in predictors.items():
            start = time.perf_counter()
            p.predict_proba(X_batch)  # type: ignore[attr-defined]
            batch[b].append(time.perf_counter() - start)

    np.savez(work / "outputs.npz", **outputs)
    return {
        "latency_us_median": {b: float(np.median(v)) / 1e3 for b, v in latency.items()},
        "latency_us_p90": {b: float(np.percentile(v, 90)) / 1e3 for b, v in latency.items()},
        "batch_s_median": {b: float(np.median(v)) for b, v in batch.items()},
        "tensorflow_imported": "tensorflow" in sys.modules,
    }


def _worker_memory(work: Path, backend: str, threads: int) -> dict[str, object]:
    import resource

    import psutil

    import edge_runtime.inference
    import edge_runtime.model  # noqa: F401

    proc = psutil.Process()
    with np.load(work / "data.npz", allow_pickle=False) as z:
        X_batch = z["X_batch"]
    baseline = proc.memory_info().rss
    predictor = _load_backend(work, backend, threads)
    predictor.predict_proba(X_batch[:1])  # type: ignore[attr-defined]
    loaded = proc.memory_info().rss
    predictor.predict_proba(X_batch)  # type: ignore[attr-defined]
    after = proc.memory_info().rss
    return {
        "rss_baseline_mib": baseline / 2**20,
        "rss_loaded_mib": loaded / 2**20,
        "rss_after_batch_mib": after / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tensorflow_imported": "tensorflow" in sys.modules,
    }


def _run_worker(args: list[str], threads: int) -> dict[str, object]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    env["MKL_NUM_THREADS"] = str(threads)
    done = subprocess.run(
        [sys.executable, __file__, "--worker", *args], env=env, check=True, capture_output=True, text=True
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# ---- coordinator side (this process) ---------------------------------------------------------------------------


def _auroc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score))


def _raw_input_int8_agreement(model: object, X_train: np.ndarray, X: np.ndarray, expected: np.ndarray) -> float:
    """Ablation: int8 with standardization folded in and raw features quantized per tensor (what we do not ship)."""
    from ai_edge_litert.interpreter import Interpreter

    from coordinator.export import _tflite_bytes, folded_layers

    data = _tflite_bytes(folded_layers(model), True, X_train.astype(np.float32))  # type: ignore[arg-type]
    it = Interpreter(model_content=data, num_threads=1)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    it.resize_tensor_input(inp["index"], list(X.shape))
    it.allocate_tensors()
    scale, zp = inp["quantization"]
    it.set_tensor(inp["index"], np.clip(np.round(X / scale) + zp, -128, 127).astype(np.int8))
    it.invoke()
    out_scale, out_zp = out["quantization"]
    got = (it.get_tensor(out["index"]).astype(np.float64) - out_zp) * out_scale
    return float((got.argmax(1) == expected.argmax(1)).mean())


def run(out_dir: Path, rows: int, latency_calls: int, repeats: int, threads: int) -> dict[str, object]:
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    from coordinator.export import export_all, make_card
    from edge_runtime.model import Model, ModelSpec, Standardizer
    from edge_runtime.trainer import TrainConfig, train

    data = load_breast_cancer()
    X, y = data.data.astype(np.float32), data.target
    train_idx, test_idx = train_test_split(np.arange(len(X)), test_size=0.3, stratify=y, random_state=0)
    X_train, y_train, y_test = X[train_idx], y[train_idx], y[test_idx]
    spec = ModelSpec(X.shape[1], (16, 8), 2)
    model = Model.create(spec, seed=1, standardizer=Standardizer.fit(X_train))
    model = train(model, X_train, y_train, TrainConfig(epochs=40, learning_rate=0.01, l2=1e-3)).model
    columns = [str(c).replace(" ", "_") for c in data.feature_names]
    card = make_card(
        model, name="model", feature_spec_hash="bench", columns=columns, units=[None] * len(columns), rounds=1
    )
    X_batch = X[np.random.default_rng(0).integers(0, len(X), rows)]  # real rows, resampled to batch size

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        paths = export_all(model, card, work, representative=X_train)
        export_s = time.perf_counter() - t0
        np.savez(work / "model.npz", params=model.params, mean=model.standardizer.mean, scale=model.standardizer.scale)
        (work / "spec.json").write_text(json.dumps(spec.to_dict()))
        np.savez(work / "data.npz", X_table=X, X_batch=X_batch)

        timing = _run_worker(["timing", str(work), str(threads), str(latency_calls), str(repeats)], threads)
        memory = {b: _run_worker(["memory", str(work), b, str(threads)], threads) for b in BACKENDS}
        with np.load(work / "outputs.npz", allow_pickle=False) as z:
            outputs = {b: z[b] for b in BACKENDS}
        sizes = {
            "numpy": int(model.params.nbytes + model.standardizer.mean.nbytes + model.standardizer.scale.nbytes),
            "onnxruntime": paths["onnx"].stat().st_size,
            "litert_float": paths["tflite"].stat().st_size,
            "litert_int8": paths["tflite_int8"].stat().st_size,
        }

    expected = model.predict_proba(X)
    int8 = outputs["litert_int8"]
    batch_s = timing["batch_s_median"]
    latency = timing["latency_us_median"]
    assert isinstance(batch_s, dict) and isinstance(latency, dict)
    figures: dict[str, object] = {
        "model": {"spec": spec.to_dict(), "data": "sklearn breast_cancer, 70/30 stratified split, seed 0"},
        "threads": threads,
        "batch_rows": rows,
        "latency_calls": latency_calls,
        "batch_repeats": repeats,
        "onnx_max_abs_diff": float(np.abs(outputs["onnxruntime"] - expected).max()),
        "litert_float_max_abs_diff": float(np.abs(outputs["litert_float"] - expected).max()),
        "numpy_max_abs_diff": float(np.abs(outputs["numpy"] - expected).max()),
        "int8_max_abs_diff": float(np.abs(int8 - expected).max()),
        "int8_class_agreement": float((int8.argmax(1) == expected.argmax(1)).mean()),
        "auroc_test": _auroc(y_test, expected[test_idx, 1]),
        "int8_auroc_delta": _auroc(y_test, int8[test_idx, 1]) - _auroc(y_test, expected[test_idx, 1]),
        # How much of the int8 AUROC loss the 1/256 output grid alone explains (ties among confident rows).
        "auroc_delta_from_output_grid_alone": _auroc(y_test, np.round(expected[test_idx, 1] * 256) / 256)
        - _auroc(y_test, expected[test_idx, 1]),
        "int8_raw_input_class_agreement": _raw_input_int8_agreement(model, X_train, X, expected),
        "latency_us_median": latency,
        "latency_us_p90": timing["latency_us_p90"],
        "latency_speedup_vs_numpy": {b: latency["numpy"] / latency[b] for b in BACKENDS},
        "batch_s_median": batch_s,
        "throughput_rows_per_s": {b: rows / batch_s[b] for b in BACKENDS},
        "throughput_speedup_vs_numpy": {b: batch_s["numpy"] / batch_s[b] for b in BACKENDS},
        "file_bytes": sizes,
        "memory": memory,
        "tensorflow_imported_on_edge": bool(timing["tensorflow_imported"])
        or any(bool(m["tensorflow_imported"]) for m in memory.values()),
        "export_all_s": export_s,
        "environment": _environment(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "inference.json").write_text(json.dumps(figures, indent=2) + "\n")
    (out_dir / "inference.md").write_text(_markdown(figures))
    return figures


def _environment() -> dict[str, str]:
    from importlib.metadata import version

    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": str(os.cpu_count())}
    for pkg in ("numpy", "onnxruntime", "ai-edge-litert", "tensorflow-cpu", "onnx"):
        env[pkg] = version(pkg)
    env["date"] = time.strftime("%Y-%m-%d")
    return env


def _markdown(f: dict[str, object]) -> str:
    lat, p90 = f["latency_us_median"], f["latency_us_p90"]
    tput, tratio, lratio = f["throughput_rows_per_s"], f["throughput_speedup_vs_numpy"], f["latency_speedup_vs_numpy"]
    sizes, mem = f["file_bytes"], f["memory"]
    assert isinstance(lat, dict) and isinstance(p90, dict) and isinstance(tput, dict) and isinstance(tratio, dict)
    assert isinstance(lratio, dict) and isinstance(sizes, dict) and isinstance(mem, dict)
    names = {
        "numpy": "numpy (`Model.predict_proba`)",
        "onnxruntime": "onnxruntime (`.onnx`)",
        "litert_float": "LiteRT float32 (`.tflite`)",
        "litert_int8": "LiteRT int8 (`.int8.tflite`)",
    }
    lines = [
        "# Inference benchmark",
        "",
        "`.venv/bin/python bench/inference.py` (figures in `inference.json`). MLP (16, 8) trained with the project's",
        "trainer on scikit-learn's breast cancer table; one thread per backend; edge side measured in processes that",
        f"never import tensorflow (tensorflow imported on the edge side: {f['tensorflow_imported_on_edge']}).",
        f"Latency: median over {f['latency_calls']} single-row calls per backend, interleaved call by call. "
        f"Throughput: median of {f['batch_repeats']} calls on {f['batch_rows']} rows.",
        "",
        "| backend | latency/patient median (µs) | p90 (µs) | speed-up vs numpy | rows/s (batch) | speed-up vs numpy | file (bytes) "
        "| RSS after batch (MiB) | RSS added by model+batch (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in BACKENDS:
        m = mem[b]
        added = m["rss_after_batch_mib"] - m["rss_baseline_mib"]
        lines.append(
            f"| {names[b]} | {lat[b]:.1f} | {p90[b]:.1f} | {lratio[b]:.2f}x | {tput[b]:,.0f} | {tratio[b]:.2f}x "
            f"| {sizes[b]:,} | {m['rss_after_batch_mib']:.1f} | {added:.1f} |"
        )
    lines += [
        "",
        "numpy's file size is its parameters and standardization in memory (it ships inside the MQTT model message).",
        f"RSS baseline (python + numpy + edge_runtime.inference) is {mem['numpy']['rss_baseline_mib']:.1f} MiB.",
        "",
        "| agreement with `Model.predict_proba` (all 569 rows) | value |",
        "|---|---:|",
        f"| onnx_max_abs_diff | {f['onnx_max_abs_diff']:.2e} |",
        f"| litert_float_max_abs_diff | {f['litert_float_max_abs_diff']:.2e} |",
        f"| int8_max_abs_diff | {f['int8_max_abs_diff']:.3f} |",
        f"| int8_class_agreement | {f['int8_class_agreement']:.4f} |",
        f"| int8_auroc_delta (held-out 30%, AUROC {f['auroc_test']:.4f}) | {f['int8_auroc_delta']:+.4f} |",
        f"| of which the 1/256 output grid alone (model probabilities rounded) | "
        f"{f['auroc_delta_from_output_grid_alone']:+.4f} |",
        f"| int8_raw_input_class_agreement (ablation: raw features quantized per tensor) | "
        f"{f['int8_raw_input_class_agreement']:.4f} |",
        "",
        f"Export of all three artifacts (coordinator, TF converter, including the tensorflow import): {f['export_all_s']:.1f} s. "
        f"Environment: {json.dumps(f['environment'])}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--latency-calls", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, work = args.worker[0], Path(args.worker[1])
        if mode == "timing":
            result = _worker_timing(work, int(args.worker[2]), int(args.worker[3]), int(args.worker[4]))
        else:
            result = _worker_memory(work, args.worker[2], int(args.worker[3]))
        print(json.dumps(result))
        return
    run(args.out_dir, args.rows, args.latency_calls, args.repeats, args.threads)
    print((args.out_dir / "inference.md").read_text())


if __name__ == "__main__":
    main()
