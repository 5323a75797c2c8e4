"""SciPy's BLAS bindings for Numba, without the rest of scipy.linalg.

Numba's `np.dot` calls BLAS through `scipy.linalg.cython_blas`, and Numba imports that module while it sets
itself up (numba.np.arraymath checks that BLAS is there), on every process start. A plain
`import scipy.linalg.cython_blas` first runs scipy.linalg's package `__init__`, which imports all of
scipy.linalg and, through SciPy's array-API layer, numpy.f2py: about 0.3 s of CPU of the edge runtime's warm
start here, for the few function pointers the kernels use. Loading the extension module itself under its
own name gives Numba the same module at a hundredth of the cost; the import system then finds it in
sys.modules and skips the package. Anything unexpected (another SciPy layout) falls back to the normal import.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import sys
from pathlib import Path

MODULE = "scipy.linalg.cython_blas"
log = logging.getLogger("fhai.edge")


def preload_cython_blas() -> bool:
    """Load scipy.linalg.cython_blas without scipy.linalg; True if it is loaded (by us or before)."""
    if MODULE in sys.modules:
        return True
    try:
        scipy = importlib.util.find_spec("scipy")
        if scipy is None or not scipy.submodule_search_locations:
            return False
        folder = Path(next(iter(scipy.submodule_search_locations))) / "linalg"
        path = next(
            folder / f"cython_blas{suffix}"
            for suffix in importlib.machinery.EXTENSION_SUFFIXES
            if (folder / f"cython_blas{suffix}").exists()
        )
        spec = importlib.util.spec_from_file_location(MODULE, path)
        if spec is None or spec.loader is None:
            return False
        module = importlib.util.module_from_spec(spec)
        sys.modules[MODULE] = module
        spec.loader.exec_module(module)
        return True
    except Exception:  # a SciPy that does not look like this: Numba's own import does the usual thing
        sys.modules.pop(MODULE, None)
        log.debug("could not preload %s; Numba imports scipy.linalg instead", MODULE, exc_info=True)
        return False
