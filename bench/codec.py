"""Update codec: bytes per update against Flower's float32 `np.save` arrays, and encode/decode times.

The deltas are real: one local round of the project's trainer (TrainConfig defaults: Adam, 5 epochs)
on synthetic rows, for a (64 -> 256 -> 64 -> 1) MLP (33k parameters) and a (512 -> 1024 -> 512 -> 1)
MLP (1.05M). Flower sends each layer array as `np.save(BytesIO, a)` (its `ndarray_to_bytes`): that
is the 1.0 of every ratio. Sections are separate functions over the same deltas, so a section that
needs the federated demo task (AUROC at each width) can be added beside them.

    .venv/bin/python bench/codec.py                 # writes docs/benchmarks/codec.{json,md}
    .venv/bin/python bench/codec.py --quick         # fewer repeats, no files

Timings interleave every case repeat by repeat (the machine is shared) and quote medians; the
throughput figure is decode + the coordinator's own fold into its float64 running sum (FedAvg).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.aggregation.math import fold_weighted  # noqa: E402
from edge_runtime import codec  # noqa: E402
from edge_runtime.model import Model, ModelSpec  # noqa: E402
from edge_runtime.trainer import TrainConfig, train  # noqa: E402

MODELS = {
    "mlp_33k": (ModelSpec(64, (256, 64)), 2000),  # (spec, training rows)
    "mlp_1m": (ModelSpec(512, (1024, 512)), 1024),
}
WIDTHS = [(8, False), (8, True), (4, False), (4, True)]  # (bits, zstd)
BLOCK_SIZES = [64, 128, 256, 512, 1024]
TARGETS = {8: 0.25, 4: 0.135}
FLARE = {8: 0.2503, 4: 0.1406}


def label(bits: int, zstd: bool) -> str:
    return f"{bits}bit{'+zstd' if zstd else ''}"


# ------------------------------------------------------------------------------------------------ deltas


def trained_delta(spec: ModelSpec, rows: int, seed: int = 0) -> np.ndarray:
    """local_params - global_params after one round of local training on a synthetic logistic task."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, spec.n_features)).astype(np.float32)
    y = (X @ rng.normal(size=spec.n_features) + rng.logistic(size=rows) > 0).astype(np.int64)
    start = Model.create(spec, seed=seed)
    result = train(start, X, y, TrainConfig(seed=seed))
    return (result.model.params - start.params).astype(np.float32)


def flower_arrays(spec: ModelSpec, flat: np.ndarray) -> list[np.ndarray]:
    """The per-layer arrays a Flower client would hold for this model (W0, b0, W1, b1, ...)."""
    return [v.copy() for v in spec.layout().views(flat).values()]


def flower_body(arrays: list[np.ndarray]) -> list[bytes]:
    """Flower's ndarray_to_bytes on each array: np.save into a BytesIO."""
    out = []
    for a in arrays:
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        out.append(buf.getvalue())
    return out


# ----------------------------------------------------------------------------------------------- sections


def bytes_section(deltas: dict[str, np.ndarray]) -> dict[str, Any]:
    """Body bytes per model and width, as a fraction of Flower's float32 bytes."""
    out: dict[str, Any] = {}
    for name, delta in deltas.items():
        spec = MODELS[name][0]
        flower = sum(len(b) for b in flower_body(flower_arrays(spec, delta)))
        row: dict[str, Any] = {"n_params": int(delta.size), "flower_bytes": flower}
        for bits, zstd in [(32, False), *WIDTHS]:
            body = codec.encode(delta, bits, np.random.default_rng(1), compress=zstd)
            row[label(bits, zstd)] = {"bytes": len(body), "ratio": len(body) / flower}
        out[name] = row
    return out


def block_size_section(delta: np.ndarray, flower_bytes: int, seeds: int = 5) -> dict[str, Any]:
    """Bytes and relative RMS error ||decoded - delta|| / ||delta|| per block size: the block-size trade-off."""
    out: dict[str, Any] = {}
    norm = float(np.linalg.norm(delta))
    for block in BLOCK_SIZES:
        row: dict[str, Any] = {}
        for bits, zstd in WIDTHS:
            errors, sizes = [], []
            for seed in range(seeds):
                body = codec.encode(delta, bits, np.random.default_rng(seed), block_size=block, compress=zstd)
                sizes.append(len(body))
                errors.append(float(np.linalg.norm(codec.decode(body) - delta)) / norm)
            row[label(bits, zstd)] = {
                "ratio": statistics.median(sizes) / flower_bytes,
                "rel_rms_error": statistics.median(errors),
            }
        out[str(block)] = row
    return out


def timing_section(spec: ModelSpec, delta: np.ndarray, repeats: int) -> dict[str, Any]:
    """Medians (ms) of encode, decode and decode + fold for a 1M delta, beside Flower's np.save / np.load."""
    rng = np.random.default_rng(2)
    arrays = flower_arrays(spec, delta)
    flower = flower_body(arrays)
    acc = np.zeros(delta.size, np.float64)
    cases: dict[str, Callable[[], object]] = {
        "flower_save": lambda: flower_body(arrays),
        "flower_load": lambda: [np.load(io.BytesIO(b), allow_pickle=False) for b in flower],
    }
    for bits, zstd in WIDTHS:
        body = codec.encode(delta, bits, rng, compress=zstd)
        cases[f"encode_{label(bits, zstd)}"] = lambda b=bits, z=zstd: codec.encode(delta, b, rng, compress=z)
        cases[f"decode_{label(bits, zstd)}"] = lambda body=body: codec.decode(body, expected_n=delta.size)
        cases[f"decode_fold_{label(bits, zstd)}"] = lambda body=body: fold_weighted(
            acc, codec.decode(body, expected_n=delta.size), 1.0
        )
    for f in cases.values():  # compile the kernels, warm the caches
        f()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for k, f in cases.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {
        "n_params": int(delta.size),
        "repeats": repeats,
        "median_ms": ms,
        "decode_fold_updates_per_s": {label(b, z): 1e3 / ms[f"decode_fold_{label(b, z)}"] for b, z in WIDTHS},
        # Side by side with Flower's own serialization in the same run: steadier than ms on a shared machine.
        "over_flower_save": {k: v / ms["flower_save"] for k, v in ms.items() if k.startswith("encode")},
        "over_flower_load": {k: v / ms["flower_load"] for k, v in ms.items() if k.startswith("decode")},
    }


# --------------------------------------------------------------------------------------------------- report


def headline(by_model: dict[str, Any]) -> dict[str, float]:
    """The worst model's ratio, with zstd (how the targets are met) and without."""
    worst = {lab: max(row[lab]["ratio"] for row in by_model.values()) for lab in (label(b, z) for b, z in WIDTHS)}
    return {
        "bytes_ratio_8bit": worst["8bit+zstd"],
        "bytes_ratio_4bit": worst["4bit+zstd"],
        "bytes_ratio_8bit_no_zstd": worst["8bit"],
        "bytes_ratio_4bit_no_zstd": worst["4bit"],
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Update codec",
        "",
        "Bytes per update as a fraction of Flower's float32 arrays (`np.save` of each layer), for real deltas "
        f"(one local round, `TrainConfig()` defaults), block size {codec.DEFAULT_BLOCK_SIZE}, scales and "
        f"{codec.HEADER_SIZE}-byte header included. Targets: 8 bit <= {TARGETS[8]}, 4 bit <= {TARGETS[4]} "
        f"(NVIDIA FLARE's quantizers: {FLARE[8]:.2%}, {FLARE[4]:.2%}).",
        "",
        "| model | params | Flower bytes | 32 bit | 8 bit | 8 bit + zstd | 4 bit | 4 bit + zstd |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in results["bytes"].items():
        cells = [f"{row[label(b, z)]['ratio']:.4f}" for b, z in [(32, False), *WIDTHS]]
        lines.append(f"| {name} | {row['n_params']:,} | {row['flower_bytes']:,} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Headline (worst model, with zstd): `bytes_ratio_8bit` = {results['bytes_ratio_8bit']:.4f}, "
        f"`bytes_ratio_4bit` = {results['bytes_ratio_4bit']:.4f}; without zstd "
        f"{results['bytes_ratio_8bit_no_zstd']:.4f} and {results['bytes_ratio_4bit_no_zstd']:.4f}. "
        "Without zstd, 8 bits per value is already 0.25 of float32 before any scale, so the 8-bit target needs "
        "the entropy coding; 4 bits meets its target either way.",
        "",
        f"## Block size ({results['block_sizes']['model']}): bytes ratio / relative error",
        "",
        "Relative error is ||decoded - delta|| / ||delta|| of one update (median of 5 seeds); error feedback "
        "carries it over to the next round instead of losing it.",
        "",
        "| block | " + " | ".join(label(b, z) for b, z in WIDTHS) + " |",
        "|---:|" + "---:|" * len(WIDTHS),
    ]
    for block, row in results["block_sizes"]["by_block"].items():
        cells = [f"{row[label(b, z)]['ratio']:.4f} / {row[label(b, z)]['rel_rms_error']:.4f}" for b, z in WIDTHS]
        lines.append(f"| {block} | " + " | ".join(cells) + " |")
    t = results["timing"]
    ms = t["median_ms"]
    lines += [
        "",
        f"## Time for {t['n_params']:,} parameters (median ms of {t['repeats']}, interleaved)",
        "",
        f"Flower float32: save {ms['flower_save']:.2f} ms, load {ms['flower_load']:.2f} ms.",
        "",
        "| width | encode | decode | decode + fold | updates/s (decode + fold, one core) |",
        "|---|---:|---:|---:|---:|",
    ]
    for b, z in WIDTHS:
        lab = label(b, z)
        lines.append(
            f"| {lab} | {ms[f'encode_{lab}']:.2f} | {ms[f'decode_{lab}']:.2f} | {ms[f'decode_fold_{lab}']:.2f} | "
            f"{t['decode_fold_updates_per_s'][lab]:.0f} |"
        )
    if "auroc" in results:
        a = results["auroc"]
        lines += [
            "",
            f"## AUROC cost of quantization (the demo federation, {a['rounds']} rounds, same seed)",
            "",
            "| updates | pooled held-out AUROC | delta vs float32 |",
            "|---|---:|---:|",
            f"| float32 | {a['auroc_float32']:.4f} | |",
            *(
                f"| {b} bit | {a[f'auroc_{b}bit']:.4f} | {a[f'auroc_delta_{b}bit']:+.4f} |"
                for b in (8, 4)
                if f"auroc_{b}bit" in a
            ),
        ]
    m = results["machine"]
    lines += ["", f"Machine: {m['processor'] or m['machine']}, {m['cpus']} CPUs (shared), Python {m['python']}.", ""]
    return "\n".join(lines)


def auroc_section(bits_list: tuple[int, ...] = (32, 8, 4)) -> dict[str, Any]:
    """The demo federation (real Mosquitto, five edge processes) once per update width, same seed."""
    import tempfile

    from coordinator.demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            bits: run_demo(Path(tmp) / f"demo-{bits}", bits=bits, docs=Path(tmp) / f"docs-{bits}", exports=False)
            for bits in bits_list
        }
    base = runs[32].auroc_federated
    return {
        "auroc_float32": base,
        **{f"auroc_{b}bit": runs[b].auroc_federated for b in bits_list if b != 32},
        **{f"auroc_delta_{b}bit": runs[b].auroc_federated - base for b in bits_list if b != 32},
        "rounds": runs[32].rounds,
        "task": "firmware_configs/tasks/synthetic_diabetes.yaml (coordinator demo)",
    }


def run(repeats: int, write: bool, with_auroc: bool = True) -> dict[str, Any]:
    deltas = {name: trained_delta(spec, rows) for name, (spec, rows) in MODELS.items()}
    by_model = bytes_section(deltas)
    spec_1m = MODELS["mlp_1m"][0]
    results: dict[str, Any] = {
        **headline(by_model),
        "targets": {"bytes_ratio_8bit": TARGETS[8], "bytes_ratio_4bit": TARGETS[4]},
        "nvflare_reference": {"bytes_ratio_8bit": FLARE[8], "bytes_ratio_4bit": FLARE[4]},
        "block_size": codec.DEFAULT_BLOCK_SIZE,
        "zstd_level": codec.ZSTD_LEVEL,
        "bytes": by_model,
        "block_sizes": {
            "model": "mlp_1m",
            "by_block": block_size_section(deltas["mlp_1m"], by_model["mlp_1m"]["flower_bytes"]),
        },
        "timing": timing_section(spec_1m, deltas["mlp_1m"], repeats),
        "machine": {
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpus": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "command": "python bench/codec.py",
    }
    if with_auroc:
        auroc = auroc_section()
        results = {**{k: v for k, v in auroc.items() if k.startswith("auroc_delta")}, **results, "auroc": auroc}
    if write:
        out = ROOT / "docs" / "benchmarks"
        out.mkdir(parents=True, exist_ok=True)
        (out / "codec.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "codec.md").write_text(markdown(results))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="5 repeats, print only")
    args = parser.parse_args()
    results = run(5 if args.quick else args.repeats, write=not args.quick, with_auroc=not args.quick)
    print(markdown(results))


if __name__ == "__main__":
    main()
