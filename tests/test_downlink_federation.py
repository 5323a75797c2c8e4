"""The quantized downlink over a real Mosquitto: every device holds the coordinator's reference copy bit for bit,
every round, and a device that joins late catches up from the retained keyframe and chain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.broker import LocalBroker
from tests.harness import Federation, wait_for

pytestmark = pytest.mark.timeout(300)


def test_devices_hold_the_announced_model_every_round_and_a_late_device_catches_up(
    tmp_path: Path, broker: LocalBroker, three_sites: dict[str, Path]
) -> None:
    fed = Federation(
        tmp_path / "dl",
        broker,
        three_sites,
        "dl",
        rounds=4,
        cohort_size=2,
        min_updates=2,
        downlink={"bits": 8, "keyframe_every": 2},
        export={"formats": []},
    )
    fed.enroll_all()
    late = "site-c"
    try:
        fed.start_devices(only=[s for s in three_sites if s != late])
        fed.start_coordinator_thread(timeout_s=240)
        task = fed.task.task
        wait_for(lambda: (row := fed.store.current_round(task)) is not None and row.round >= 3, 180, "round 3")
        fed.start_devices(only=[late])
        fed.wait_done(240)
        manager = fed.service.manager  # type: ignore[union-attr]
        reference = manager.device_model
        assert reference is not None and manager.model is not None
        # The devices train from the reference copy; it is not the exact model (8-bit patches), but close.
        assert reference.version() != manager.model.version()
        assert np.abs(reference.params - manager.model.params).max() < 0.01 * np.abs(manager.model.params).max()
        rounds = {r.round: r for r in fed.store.rounds(task)}
        for site, agent in fed.agents.items():
            wait_for(lambda a=agent: a.model is not None and a.model.version() == reference.version(), 30, site)
            np.testing.assert_array_equal(agent.model.params, reference.params)  # type: ignore[union-attr]
            adopted = agent.adopted
            # Every model a device held is the one the coordinator announced for the round after it.
            for r, version in adopted:
                assert rounds[r + 1].model_version == version, (site, r)
            if site != late:
                assert [r for r, _ in adopted] == [0, 1, 2, 3, 4], site
        # The late device started from the keyframe of round 2 (or later), not from the first model.
        first_round = fed.agents[late].adopted[0][0]
        assert first_round >= 2
        assert fed.store.rejections(task) == []
    finally:
        fed.stop()
