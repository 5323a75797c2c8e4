"""TensorFlow's own logging kept off the operator's console.

TensorFlow writes from C++ straight to file descriptor 2: absl log lines on import and for every TFLite
conversion (`W0000 ...`, `I0000 ...`), and the int8 converter prints its settings (`fully_quantize: 0 ...`)
with no log level at all. TF_CPP_MIN_LOG_LEVEL must be set before the import to count, and only a
redirect of descriptor 2 catches the converter's print. What is caught goes to the log file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from types import ModuleType

log = logging.getLogger("fhai.tensorflow")  # to the log file only, never a console progress line


def import_tensorflow() -> ModuleType:
    """`import tensorflow` with its C++ and Python logs at errors only (an operator's TF_CPP_MIN_LOG_LEVEL wins)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with native_stderr_to_log():
        import tensorflow as tf
    tf.get_logger().setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    return tf


@contextlib.contextmanager
def native_stderr_to_log() -> Iterator[None]:
    """What native code writes to descriptor 2 inside the block goes to the log file, not the console.

    Python's own writes to sys.stderr (rich's progress display) keep reaching the terminal through a
    duplicate of the original descriptor.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no descriptor 2 (embedded, closed): nothing to redirect
        yield
        return
    python_stderr = sys.stderr
    terminal = os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8", errors="replace")
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        sys.stderr = terminal
        try:
            yield
        finally:
            sys.stderr = python_stderr
            terminal.close()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode("utf-8", "replace").splitlines():
                if line.strip():
                    log.info("%s", line)
