"""What both CLIs share: logging to a file, and errors shown as one clear line (the detail goes to the log)."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler

from edge_runtime.errors import EdgeError
from edge_runtime.mqtt import BrokerSettings
from fhir_adapters.errors import FhirAdapterError

console = Console(stderr=True)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
P = ParamSpec("P")
R = TypeVar("R")


def setup_logging(log_file: Path | None, verbose: bool = False, progress: tuple[str, ...] = ()) -> None:
    """Everything to the log file (if any); warnings and up (or everything with -v) to stderr.

    Loggers named in `progress` also show their INFO lines on the console: what a long-running command is
    doing, one line per step. On a terminal rich formats them; otherwise (a service's journal, a pipe, a
    file) they are plain timestamped lines, written as they happen.
    """
    root = logging.getLogger()
    # A second call (several commands in one process, as in tests) replaces the first one's handlers, whose
    # streams may be closed by now, instead of stacking up.
    for old in [h for h in root.handlers if getattr(h, "fhai_cli", False)]:
        root.removeHandler(old)
        old.close()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    fmt = logging.Formatter(LOG_FORMAT)
    added: list[logging.Handler] = []
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        added.append(fh)
    plain_progress = bool(progress) and not verbose and not console.is_terminal
    sh = logging.StreamHandler(sys.stderr)
    sh.setLevel(logging.DEBUG if verbose else logging.INFO if plain_progress else logging.WARNING)
    sh.setFormatter(fmt if verbose else _OneLine(LOG_FORMAT))
    sh.addFilter(lambda record: getattr(record, "console", True))
    if plain_progress:
        sh.addFilter(lambda record: record.levelno >= logging.WARNING or record.name.startswith(progress))
    added.append(sh)
    if progress and not verbose and console.is_terminal:
        shown = RichHandler(console=console, show_path=False, show_level=False, markup=False)
        shown.setLevel(logging.INFO)
        shown.addFilter(lambda record: record.levelno < logging.WARNING and record.name.startswith(progress))
        added.append(shown)
    for handler in added:
        handler.fhai_cli = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    for noisy in ("httpx", "httpcore", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _OneLine(logging.Formatter):
    """The console's log lines: one line each; a traceback goes to the log file only (-v shows it here too)."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return super().format(record) + (f" (detail in {log_file_hint()})" if saved[0] else "")
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def log_file_hint() -> str:
    """Where the detail of an error went: the log file, or how to see it when there is none."""
    files = [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    return files[0] if files else "no log file: run again with -v"


def _detail_to_log_file(message: str) -> None:
    """The current exception's traceback, to the log file only; without a log file it is dropped (-v shows it).

    Never to the console: with no handler at all, Python's last-resort handler would print it there.
    """
    if any(isinstance(h, logging.FileHandler) for h in logging.getLogger().handlers):
        logging.getLogger("fhai").error(message, exc_info=True, extra={"console": False})


def friendly_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn our errors (and a missing file) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (EdgeError, FhirAdapterError, FileNotFoundError, PermissionError) as exc:
            _detail_to_log_file(f"command failed: {exc}")
            console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
            raise typer.Exit(2) from None
        except (typer.Exit, typer.Abort, typer.BadParameter, KeyboardInterrupt):
            raise
        except Exception as exc:  # a bug or an unforeseen failure: still one line, the trace in the log
            _detail_to_log_file("unexpected error")
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            console.print(
                f"[bold red]unexpected error:[/] {type(exc).__name__}: {first} (traceback in {log_file_hint()})",
                soft_wrap=True,
            )
            raise typer.Exit(3) from None

    return wrapper


def broker_settings(
    broker: str, username: str | None = None, password_file: Path | None = None, tls_ca: Path | None = None
) -> BrokerSettings:
    """The MQTT connection the CLI flags describe (the password is read from a file, never a flag)."""
    host, port = parse_broker(broker)
    return BrokerSettings(
        host,
        port,
        username=username,
        password=password_file.read_text().strip() if password_file else None,
        ca_file=str(tls_ca) if tls_ca else None,
    )


def parse_broker(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise typer.BadParameter(f"expected HOST:PORT, got {text!r}")
    return host, int(port)
