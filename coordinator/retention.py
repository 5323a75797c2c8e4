"""Bounded disk: what a task keeps once a round's checkpoint is committed (the task YAML's `retention`).

Update bodies are needed only until their round commits (a resumed round re-folds the open round's bodies,
never a committed one's), so by default they are dropped at the commit; their SHA-256, size and metadata
stay in the store for audit. Old checkpoints and exported model files are pruned by count.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from coordinator.store import Store

log = logging.getLogger("fhai.coordinator")

_EXPORT_DIR = re.compile(r"round-(\d+)")


class Retention(BaseModel):
    """How much of each committed round the coordinator keeps. None: keep everything."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Committed rounds whose update bodies are kept (0: drop them at the commit; None: keep all, to re-aggregate).
    update_bodies_rounds: int | None = Field(0, ge=0)
    # Checkpoints kept, the newest always among them (None: all; round 0's is kept while any training remains).
    checkpoints: int | None = Field(None, ge=1)
    # Export folders (exports/round-N) kept, newest first (None: all).
    exports: int | None = Field(None, ge=1)


def apply_retention(store: Store, task_id: str, committed_round: int, retention: Retention, exports: Path) -> None:
    """Prune after `committed_round` committed. A failure here is logged, never stops the task."""
    try:
        if retention.update_bodies_rounds is not None:
            n, freed = store.prune_update_bodies(task_id, committed_round - retention.update_bodies_rounds)
            if n:
                log.info("retention: dropped %d update bodies (%.1f MB; hashes kept)", n, freed / 2**20)
        if retention.checkpoints is not None:
            dropped = store.prune_checkpoints(task_id, retention.checkpoints)
            if dropped:
                log.info("retention: dropped the checkpoints of rounds %s", dropped)
        if retention.exports is not None:
            prune_exports(exports, retention.exports)
        store.reclaim_space()
    except Exception:  # disk housekeeping must not fail a committed round
        log.exception("retention after round %d failed; the round stays committed", committed_round)


def prune_exports(folder: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` exports/round-N folders; returns what was deleted."""
    if not folder.is_dir():
        return []
    rounds = sorted(
        (int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _EXPORT_DIR.fullmatch(p.name))
    )
    doomed = [p for _, p in rounds[:-keep]] if keep else [p for _, p in rounds]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed
