"""Store faults: transient ones retried with backoff, the rest turned into one coded line that says what to do.

Every `Store` method is one transaction, so retrying a whole method after a dropped connection is safe for
reads and for writes that did not land. A write whose COMMIT was cut may have landed: the methods that
can see their own earlier write on a retry (a unique constraint firing) treat it as done, see store.py.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError

from coordinator.errors import CoordinatorError

if TYPE_CHECKING:
    from coordinator.store import Store

log = logging.getLogger("fhai.store")

P = ParamSpec("P")
R = TypeVar("R")
MAX_DELAY_S = 5.0


def where(url: URL) -> str:
    """The store's address for messages, without its password."""
    return url.render_as_string(hide_password=True)


def is_transient(exc: DBAPIError, dialect: str) -> bool:
    """A fault a wait can clear: a dropped or refused PostgreSQL connection, a busy SQLite file."""
    if isinstance(exc, IntegrityError):
        return False
    if dialect == "sqlite":
        text = str(exc.orig).lower()
        return "database is locked" in text or "database is busy" in text
    return bool(exc.connection_invalidated) or isinstance(exc, OperationalError | InterfaceError)


def first_line(exc: DBAPIError) -> str:
    """The driver's message, first line only (psycopg adds hints on further lines)."""
    text = str(exc.orig).strip()
    return text.splitlines()[0] if text else type(exc.orig).__name__


def store_error(exc: DBAPIError, url: URL) -> CoordinatorError:
    """One coded line for a store fault that retrying cannot clear."""
    first = first_line(exc)
    text = first.lower()
    if "readonly" in text or "read-only" in text:
        return CoordinatorError(
            "FHAI-S711",
            f"the store {where(url)} is read-only ({first}): give the coordinator's user write access to the "
            "database file and its folder, then run the command again",
        )
    if "unable to open" in text:
        return CoordinatorError(
            "FHAI-S712", f"cannot open the store {where(url)} ({first}): check the path in --store and its folder"
        )
    if "disk" in text and ("full" in text or "i/o" in text):
        return CoordinatorError(
            "FHAI-S713", f"the store {where(url)} cannot write ({first}): free disk space or check the disk"
        )
    return CoordinatorError(
        "FHAI-S714",
        f"the store {where(url)} failed ({type(exc.orig).__name__}: {first}): see the log for the detail; "
        "check the database server's log too",
    )


def unreachable(exc: DBAPIError, url: URL, waited_s: float) -> CoordinatorError:
    first = first_line(exc)
    return CoordinatorError(
        "FHAI-S710",
        f"the store {where(url)} was unreachable for {waited_s:.0f}s ({first}): start the database server or "
        "fix --store, then run the command again (nothing accepted so far is lost; --store-retry-s waits longer)",
    )


def retried(fn: Callable[P, R]) -> Callable[P, R]:
    """Run a Store method, retrying transient faults with backoff for up to `store.retry_s` seconds."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        store: Store = args[0]  # type: ignore[assignment]
        delay, started = 0.25, None
        while True:
            try:
                result = fn(*args, **kwargs)
            except IntegrityError:
                raise
            except DBAPIError as exc:
                url = store.engine.url
                if not is_transient(exc, store.engine.dialect.name):
                    raise store_error(exc, url) from exc
                now = time.monotonic()
                if started is None:
                    started = now
                    log.warning(
                        "store %s unreachable (%s); retrying for up to %.0fs",
                        where(url),
                        first_line(exc),
                        store.retry_s,
                    )
                if now - started >= store.retry_s:
                    raise unreachable(exc, url, now - started) from exc
                time.sleep(min(delay, store.retry_s - (now - started)))
                delay = min(2 * delay, MAX_DELAY_S)
                store.retried_calls += 1
                continue
            if started is not None:
                log.info("store %s reachable again after %.1fs", where(store.engine.url), time.monotonic() - started)
            return result

    return wrapper
