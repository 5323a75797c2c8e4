"""What a device has done in each round of a task, kept across restarts (STATE_DIR/progress-<task>.json).

A round is *handled* once the device's contribution reached the broker (PUBACK): the agent does not work
on it again. How it ended is kept beside it, so `fhai-edge status` counts as trained only the rounds whose
update was sent before the round's deadline; one acknowledged after it ("late") is dropped by the
coordinator unless the round was still open, and one whose deadline passed before the device could
start ("missed") was never sent.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Outcome = Literal["sent", "late", "missed"]


@dataclass(frozen=True)
class TaskProgress:
    """One task's rounds as `fhai-edge status` shows them."""

    trained: int  # training rounds whose update reached the broker before the deadline
    late: int  # training rounds whose update reached it after the deadline
    missed: int  # rounds whose deadline passed before this device could start
    other: int  # feature-statistics and evaluation rounds answered
    last_round: int | None


class RoundLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"done": [], "rounds": {}}
        data: dict[str, Any] = json.loads(self.path.read_text())
        data.setdefault("done", [])
        data.setdefault("rounds", {})
        return data

    def handled(self) -> set[int]:
        """Rounds this device answered (whatever the outcome): the agent leaves them alone."""
        return {int(r) for r in self._load()["done"]}

    def record(self, round_no: int, phase: str, outcome: Outcome) -> None:
        data = self._load()
        if outcome != "missed":  # a missed round may yet be extended and re-announced: stay ready for it
            data["done"] = sorted(set(data["done"]) | {round_no})
        data["rounds"][str(round_no)] = {"phase": phase, "outcome": outcome, "at": time.time()}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.path)

    def summary(self) -> TaskProgress:
        data = self._load()
        rounds = {int(r): v for r, v in data["rounds"].items()}
        train = [v["outcome"] for v in rounds.values() if v.get("phase") == "train"]
        answered = [r for r, v in rounds.items() if v.get("outcome") != "missed"]
        return TaskProgress(
            trained=train.count("sent"),
            late=train.count("late"),
            missed=sum(1 for v in rounds.values() if v.get("outcome") == "missed"),
            other=sum(1 for v in rounds.values() if v.get("phase") != "train" and v.get("outcome") != "missed"),
            last_round=max(answered) if answered else None,
        )
