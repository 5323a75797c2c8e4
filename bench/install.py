"""What a gateway install weighs: `pip install 'fhai[edge]'` from the wheel into a fresh virtual environment.

Builds the wheel from a copy of the checkout, installs `fhai[edge]` the way a hospital's IT team would (this
machine's pip index and cache), and reports the environment's size on disk, each distribution's share, the
install time, and that TensorFlow is absent. Also what an inference-only device would need: the same set
without the training stack (Numba, llvmlite, SciPy) and without the second inference backend (onnxruntime).

    .venv/bin/python bench/install.py        # writes docs/benchmarks/install.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.checkout, when run as a script

from tests.checkout import build_wheel, install  # noqa: E402

MB = 2**20
# Not needed to score patients with a delivered TFLite model (`fhai-edge predict`): training (Numba and what it
# pulls in) and the second inference backend.
TRAINING_ONLY = ("numba", "llvmlite", "scipy")
SECOND_BACKEND = ("onnxruntime",)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def measure(work: Path) -> dict[str, Any]:
    gateway = install(build_wheel(work), work / "venv")
    sizes = gateway.distributions()
    total = folder_bytes(gateway.venv)
    site = next((gateway.venv / "lib").glob("python3*/site-packages"))
    tooling = sum(sizes.get(name, 0) for name in ("pip", "setuptools"))
    inference_only = sum(v for k, v in sizes.items() if k not in (*TRAINING_ONLY, *SECOND_BACKEND))
    return {
        "edge_install_mb": round(total / MB, 1),
        "edge_site_packages_mb": round(folder_bytes(site) / MB, 1),
        "edge_has_tensorflow": any(k.startswith(("tensorflow", "keras")) for k in sizes),
        "install_seconds": round(gateway.seconds, 1),
        "distributions": len(sizes),
        "by_distribution_mb": {k: round(v / MB, 1) for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])},
        "pip_and_setuptools_mb": round(tooling / MB, 1),
        "inference_only_mb": round(inference_only / MB, 1),
        "training_stack_mb": round(sum(sizes.get(k, 0) for k in TRAINING_ONLY) / MB, 1),
        "onnxruntime_mb": round(sizes.get("onnxruntime", 0) / MB, 1),
    }


def render_md(res: dict[str, Any]) -> str:
    top = list(res["by_distribution_mb"].items())[:10]
    lines = [
        "# Gateway install size",
        "",
        f"Command: `{res['command']}`. A wheel of the checkout, installed as `pip install 'fhai[edge]'` into a fresh "
        f"virtual environment (Python {res['python']}, {res['platform']}); pip took {res['install_seconds']:.0f} s "
        "with this machine's package cache.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| `fhai[edge]` environment on disk | {res['edge_install_mb']:.0f} MB |",
        f"| of which site-packages | {res['edge_site_packages_mb']:.0f} MB |",
        f"| TensorFlow installed | {'yes' if res['edge_has_tensorflow'] else 'no'} |",
        f"| distributions | {res['distributions']} |",
        "",
        "Largest distributions (MB, files as installed):",
        "",
        "| distribution | MB |",
        "|---|---|",
        *(f"| {name} | {mb:.1f} |" for name, mb in top),
        "",
        "What could shrink it:",
        "",
        f"- An inference-only device (`fhai-edge predict` with a delivered TFLite model) needs neither the training "
        f"stack (Numba, llvmlite, SciPy: {res['training_stack_mb']:.0f} MB) nor onnxruntime "
        f"({res['onnxruntime_mb']:.0f} MB, the second backend): about {res['inference_only_mb']:.0f} MB of "
        "packages. A `fhai[bedside]` extra with that set is cheap to declare, but the runtime first needs an "
        "inference-only mode that never joins a training cohort (the bedside devices of issue 14).",
        "- SciPy is there only because Numba's `np.dot` calls BLAS through `scipy.linalg.cython_blas`; kernels with "
        "their own loops for small layers would drop it.",
        "- onnxruntime and LiteRT are both installed; a device runs one of them (its profile's `inference_backend`), "
        "so an extra per backend would save the other.",
        f"- pip and setuptools of the venv itself: {res['pip_and_setuptools_mb']:.0f} MB.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args()
    import platform

    with tempfile.TemporaryDirectory(prefix="fhai-install-") as tmp:
        res = measure(Path(tmp))
    res.update(
        command=".venv/bin/python bench/install.py",
        python=platform.python_version(),
        platform=platform.platform(),
        loadavg=os.getloadavg(),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "install.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "install.md").write_text(render_md(res))
    print(render_md(res))


if __name__ == "__main__":
    main()
