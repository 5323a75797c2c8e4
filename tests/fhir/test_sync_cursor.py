"""The _lastUpdated cursor's boundary logic (pure)."""

from __future__ import annotations

from fhir_adapters.sync import CursorTracker, SyncCursor


def r(rid: str, lu: str | None) -> dict:
    return {"resourceType": "Observation", "id": rid, **({"meta": {"lastUpdated": lu}} if lu else {})}


def test_first_pass_takes_everything_and_remembers_the_boundary() -> None:
    t = CursorTracker(SyncCursor("Observation"))
    got = [
        x["id"]
        for x in [
            r("a", "2024-01-01T00:00:00.001Z"),
            r("b", "2024-01-01T00:00:00.002Z"),
            r("c", "2024-01-01T00:00:00.002Z"),
        ]
        if t.accept(x)
    ]
    assert got == ["a", "b", "c"]
    cur = t.next_cursor()
    assert cur.since == "2024-01-01T00:00:00.002Z" and cur.seen_at_since == ("b", "c")
    assert cur.query_params() == [("_sort", "_lastUpdated"), ("_lastUpdated", "ge2024-01-01T00:00:00.002Z")]


def test_second_pass_skips_boundary_ids_but_keeps_new_records_of_the_same_instant() -> None:
    cur = SyncCursor("Observation", "2024-01-01T00:00:00.002Z", ("b", "c"))
    t = CursorTracker(cur)
    batch = [
        r("a", "2024-01-01T00:00:00.001Z"),  # older (a server rounding ge down): already seen
        r("b", "2024-01-01T00:00:00.002Z"),  # boundary, seen
        r("d", "2024-01-01T00:00:00.002Z"),  # same instant, new: must not be lost
        r("e", "2024-01-01T01:00:00.002+01:00"),  # same instant as the boundary in another offset, new
    ]
    assert [x["id"] for x in batch if t.accept(x)] == ["d", "e"]
    nxt = t.next_cursor()
    assert nxt.since == "2024-01-01T00:00:00.002Z" and nxt.seen_at_since == ("b", "c", "d", "e")


def test_updated_record_comes_back_once() -> None:
    t = CursorTracker(SyncCursor("Observation", "2024-01-01T00:00:00Z", ("b",)))
    assert t.accept(r("b", "2024-01-02T00:00:00Z"))  # b changed later: a new version is yielded
    assert t.next_cursor().seen_at_since == ("b",) and t.next_cursor().since == "2024-01-02T00:00:00Z"


def test_empty_pass_keeps_the_cursor_and_untimed_records_pass() -> None:
    cur = SyncCursor("Patient", "2024-01-01T00:00:00Z", ("x",))
    t = CursorTracker(cur)
    assert t.accept(r("y", None))
    assert t.next_cursor() == cur


def test_cursor_round_trips_through_json() -> None:
    cur = SyncCursor("Observation", "2024-01-01T00:00:00.002Z", ("b", "c"))
    assert SyncCursor.from_json(cur.to_json()) == cur
    assert SyncCursor.from_json(SyncCursor("Patient").to_json()) == SyncCursor("Patient")
