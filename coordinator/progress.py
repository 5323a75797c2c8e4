"""What the operator sees while a task runs: on a terminal a live status line, otherwise plain log lines.

Both say the same things: which round (feature statistics, training round r of N, final evaluation),
how many of the cohort have answered, who is still missing (and whether they are online), and how long
the round has left before its deadline.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from rich.console import Console
from rich.live import Live
from rich.table import Table

from coordinator.rounds import RoundManager

log = logging.getLogger("fhai.coordinator")


@dataclass(frozen=True)
class RoundView:
    """The open round as an operator sees it (no numbers to interpret: labels and names)."""

    task: str
    rounds: int  # training rounds of the task
    round: int | None
    phase: str | None
    status: str
    cohort: tuple[str, ...]
    accepted: tuple[str, ...]
    online: tuple[str, ...]
    seconds_left: float | None
    model_version: str | None

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(d for d in self.cohort if d not in self.accepted)

    @property
    def label(self) -> str:
        if self.round is None:
            return "waiting for devices"
        if self.phase == "stats":
            return "feature statistics"
        if self.phase == "eval":
            return "final evaluation"
        return f"round {self.round}/{self.rounds}"

    def waiting_for(self) -> str:
        """'site-b (offline), site-c' : the cohort members that have not answered yet."""
        online = set(self.online)
        return ", ".join(d if d in online else f"{d} (offline)" for d in self.missing)

    def detail(self) -> str:
        """'round 3/10 (collecting): 2/3 answered; waiting for site-c (offline); 84s left'"""
        if self.round is None:
            return f"waiting for devices, {len(self.online)} online"
        text = f"{self.label} ({self.status}): {len(self.accepted)}/{len(self.cohort)} answered"
        if self.status == "collecting" and self.missing:
            text += f"; waiting for {self.waiting_for()}"
        if self.status == "collecting" and self.seconds_left is not None:
            text += f"; {max(0.0, self.seconds_left):.0f}s left"
        return text

    def summary(self) -> str:
        return f"{self.task}: {self.detail()}"


def round_view(m: RoundManager) -> RoundView:
    state = m.state
    row = state.row if state else None
    answered: set[str] = set(state.accepted) if state else set()
    if row is not None and row.phase == "eval" and m.device_model is not None:
        # The final round collects evaluations of the last model (as the devices hold it), not updates.
        version = m.device_model.version()
        answered = {e.device_id for e in m.store.evaluations(m.task.task) if e.model_version == version}
    return RoundView(
        task=m.task.task,
        rounds=m.task.rounds,
        round=row.round if row else None,
        phase=row.phase if row else None,
        status=row.status if row else "waiting",
        cohort=tuple(state.cohort) if state else (),
        accepted=tuple(sorted(answered)),
        online=tuple(sorted(m.online)),
        seconds_left=row.deadline - m.clock() if row else None,
        model_version=m.device_model.version() if m.device_model else None,
    )


def status_line(view: RoundView) -> Table:
    grid = Table.grid(padding=(0, 2))
    left = f"{max(0.0, view.seconds_left):.0f}s left" if view.seconds_left is not None else ""
    missing = f"waiting for {view.waiting_for()}" if view.status == "collecting" and view.missing else ""
    grid.add_row(
        f"[bold]{view.task}[/]",
        f"{view.label} ({view.status})",
        f"answered {len(view.accepted)}/{len(view.cohort)}",
        f"online {len(view.online)}",
        missing,
        left if view.status == "collecting" else "",
        f"model {view.model_version or '-'}",
    )
    return grid


class ProgressReporter:
    """The `on_tick` callback of CoordinatorService.run.

    On a terminal it keeps a live status line; otherwise it logs the round's state as a plain line when who
    has answered changes, and every `every_s` seconds while a round waits.
    """

    def __init__(self, console: Console, every_s: float = 30.0) -> None:
        self.console = console
        self.every_s = every_s
        self.live: Live | None = None
        self._last_key: tuple[object, ...] | None = None
        self._last_at = 0.0
        self._viewed_at = 0.0

    def __enter__(self) -> ProgressReporter:
        if self.console.is_terminal:
            self.live = Live(console=self.console, refresh_per_second=4, transient=True)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def __call__(self, m: RoundManager) -> None:
        now = time.monotonic()
        if self.live is not None:
            if now - self._viewed_at >= 0.25:  # the service ticks ~10 times a second; a person reads less often
                self._viewed_at = now
                self.live.update(status_line(round_view(m)))
            return
        # Plain lines: one whenever the round's state changes (however short the round), and every `every_s`
        # while it waits. The state is read from the manager, not the store, except in the final evaluation,
        # whose answers are in the store.
        state = m.state
        row = state.row if state else None
        if row is not None and row.phase == "eval":
            view = round_view(m)
            key: tuple[object, ...] = (view.round, view.phase, view.status, view.accepted, view.online)
        else:
            view = None
            key = (
                row.round if row else None,
                row.phase if row else None,
                row.status if row else None,
                len(state.accepted) if state else 0,
                len(m.online),
            )
        collecting = row is not None and row.status == "collecting"
        if key != self._last_key or (collecting and now - self._last_at >= self.every_s):
            log.info("%s", (view or round_view(m)).summary())
            self._last_key, self._last_at = key, now
