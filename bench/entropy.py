"""Entropy coding of quantized levels: rANS (constriction) and zstd with a trained dictionary, against zstd alone.

Real updates: the demo's five synthetic hospitals (seed 7), each training one local round (the task's
settings, 1 epoch for the 1M model) from the initial global model, for the demo's logistic regression and
for a (n_features -> 1000 -> 1000 -> 1) MLP of about 1M parameters; plus the downlink patch those updates
make (their sample-weighted mean). Each vector is quantized by the project's codec (block 256, 8 and 4
bits), and its payload (scales + packed levels) is coded five ways:

- `zstd`: zstd level 1 of the payload, what the codec does today;
- `zstd+dict`: the same with a 16 KiB dictionary trained on the other sites' payloads (shared once, not counted);
- `rans`: scales raw, levels with constriction's rANS under the body's own level histogram (sent as
  u32 counts, counted);
- `entropy`: the order-0 entropy of the levels plus the raw scales, the bound any order-0 coder meets.

    .venv/bin/python bench/entropy.py        # writes docs/benchmarks/entropy.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.demo import demo_task  # noqa: E402
from edge_runtime import codec  # noqa: E402
from edge_runtime.model import Model, ModelSpec, Standardizer  # noqa: E402
from edge_runtime.trainer import TrainConfig, train  # noqa: E402
from fhir_adapters.features import build_feature_table  # noqa: E402
from fhir_adapters.sources import NdjsonDirSource  # noqa: E402
from fhir_adapters.synthetic import generate_hospitals  # noqa: E402

MATTERS = 0.10  # an entropy coder stays only if it saves at least this fraction of zstd's bytes


def real_updates(hidden: tuple[int, ...], epochs: int | None) -> tuple[list[np.ndarray], np.ndarray]:
    """Each site's delta after one local round from the same initial model, and their weighted mean."""
    task = demo_task(1, 8, "entropy")
    spec_f = task.spec()
    with tempfile.TemporaryDirectory() as tmp:
        tables = []
        for h in generate_hospitals(5, seed=7):
            h.write_ndjson(Path(tmp) / h.site_id)
            tables.append(build_feature_table(NdjsonDirSource(Path(tmp) / h.site_id), spec_f))
    X_all = np.vstack([t.X for t in tables])
    spec = ModelSpec(X_all.shape[1], hidden, 2)
    start = Model.create(spec, 0, Standardizer.fit(X_all))
    config = TrainConfig(**{**task.train, **({"epochs": epochs} if epochs else {})})
    deltas, weights = [], []
    for t in tables:
        result = train(start, t.X, t.y.astype(np.int64), config)
        deltas.append((result.model.params - start.params).astype(np.float32))
        weights.append(len(t.y))
    mean = (np.average(np.stack(deltas), axis=0, weights=weights)).astype(np.float32)
    return deltas, mean


def payload_parts(vector: np.ndarray, bits: int) -> tuple[bytes, np.ndarray, bytes]:
    """(payload, levels as int, scales bytes) of the codec's uncompressed body."""
    body = codec.encode(vector, bits, np.random.default_rng(0), codec.DEFAULT_BLOCK_SIZE, compress=False)
    payload = body[codec.HEADER_SIZE :]
    nb = codec.n_blocks_for(vector.size, codec.DEFAULT_BLOCK_SIZE)
    if bits == 8:
        levels = np.frombuffer(payload, np.int8, offset=4 * nb).astype(np.int32)
    else:
        packed = np.frombuffer(payload, np.uint8, offset=4 * nb).astype(np.int32)
        lo, hi = ((packed & 0xF) ^ 8) - 8, ((packed >> 4) ^ 8) - 8
        levels = np.stack([lo, hi], axis=1).reshape(-1)[: vector.size]
    return payload, levels, payload[: 4 * nb]


def rans_bytes(levels: np.ndarray, bits: int) -> tuple[int, float]:
    """rANS-coded size of the levels under their own histogram (+ the histogram as u32 counts), and ms taken."""
    import constriction

    top = 2 ** (bits - 1)
    symbols = (levels + top).astype(np.int32)
    started = time.perf_counter()
    counts = np.bincount(symbols, minlength=2 * top).astype(np.float64)
    model = constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(symbols, model)
    compressed = coder.get_compressed()
    ms = (time.perf_counter() - started) * 1e3
    decoded = constriction.stream.stack.AnsCoder(compressed).decode(model, symbols.size)
    assert np.array_equal(decoded, symbols)  # lossless, or the figure means nothing
    return compressed.nbytes + 4 * 2 * top, ms


def entropy_bytes(levels: np.ndarray) -> float:
    _, counts = np.unique(levels, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum() * levels.size / 8)


def measure(name: str, vectors: list[np.ndarray], bits: int) -> dict[str, Any]:
    """Bytes of each coding for vectors[0] (the first site, or the downlink patch), the others train the dictionary."""
    payload, levels, scales = payload_parts(vectors[0], bits)
    zstandard.ZstdCompressor(level=codec.ZSTD_LEVEL).compress(payload)  # warm up: time the steady state
    started = time.perf_counter()
    zstd = len(zstandard.ZstdCompressor(level=codec.ZSTD_LEVEL).compress(payload))
    zstd_ms = (time.perf_counter() - started) * 1e3
    samples = [payload_parts(v, bits)[0] for v in vectors[1:]] or [payload]
    chunks = [s[i : i + 4096] for s in samples for i in range(0, len(s), 4096)]
    try:
        dictionary = zstandard.train_dictionary(16 * 1024, chunks)
        zstd_dict = len(zstandard.ZstdCompressor(level=codec.ZSTD_LEVEL, dict_data=dictionary).compress(payload))
    except zstandard.ZstdError:  # too few samples to train on (tiny models)
        zstd_dict = zstd
    rans, rans_ms = rans_bytes(levels, bits)
    out = {
        "case": name,
        "bits": bits,
        "params": int(vectors[0].size),
        "payload": len(payload),
        "zstd": zstd,
        "zstd_dict": zstd_dict,
        "rans": rans + len(scales),
        "entropy": round(entropy_bytes(levels) + len(scales)),
        "zstd_ms": round(zstd_ms, 2),
        "rans_ms": round(rans_ms, 2),
    }
    out["rans_saves_vs_zstd"] = round(1 - out["rans"] / zstd, 4)
    out["dict_saves_vs_zstd"] = round(1 - zstd_dict / zstd, 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args()
    rows = []
    for label, hidden, epochs in (("demo_logreg", (), None), ("mlp_1m", (1000, 1000), 1)):
        deltas, patch = real_updates(hidden, epochs)
        for bits in (8, 4):
            rows.append(measure(f"{label} update", deltas, bits))
            rows.append(measure(f"{label} downlink patch", [patch, *deltas], bits))
    big = [r for r in rows if r["params"] > 100_000]
    best_rans = statistics.median(r["rans_saves_vs_zstd"] for r in big)
    best_dict = statistics.median(r["dict_saves_vs_zstd"] for r in big)
    figures = {
        "median_rans_saves_vs_zstd_1m": best_rans,
        "median_dict_saves_vs_zstd_1m": best_dict,
        "keep_rans": best_rans >= MATTERS,
        "keep_dictionary": best_dict >= MATTERS,
        "margin_that_matters": MATTERS,
        "command": ".venv/bin/python bench/entropy.py",
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
    }
    print(json.dumps(figures, indent=2))
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "entropy.json").write_text(json.dumps({**figures, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Entropy coding of quantized levels",
        "",
        f"`{figures['command']}`: bytes of one update (the first site's) and of the downlink patch (the sites' "
        "weighted mean), quantized by the codec (block 256), coded five ways. `rans` counts its histogram; the "
        "dictionary (trained on the other sites' payloads) is not counted. `entropy` is the order-0 bound.",
        "",
        "| vector | bits | params | packed | zstd | zstd+dict | rANS | entropy | rANS vs zstd | dict vs zstd | zstd ms | rANS ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['bits']} | {r['params']:,} | {r['payload']:,} | {r['zstd']:,} | {r['zstd_dict']:,} | "
            f"{r['rans']:,} | {r['entropy']:,} | {-r['rans_saves_vs_zstd']:+.1%} | {-r['dict_saves_vs_zstd']:+.1%} | "
            f"{r['zstd_ms']} | {r['rans_ms']} |"
        )
    lines += [
        "",
        f"Median saving over zstd at 1M parameters: rANS {best_rans:.1%}, trained dictionary {best_dict:.1%}; "
        f"kept only at {MATTERS:.0%} or more (decision 0015). Machine: {figures['machine']}.",
        "",
    ]
    (args.docs / "entropy.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
