"""The click join alone: window edges, watermark, duplicates, overflow, state round trip."""

from __future__ import annotations

import heapq
import itertools
import json
import random
from collections import Counter

import pytest

from stream_fm.stream.join import Joiner, Joins


def labels(samples) -> list[tuple[bool, str]]:
    return [(label, features["ad"]) for label, features, _ in samples]


def test_a_click_inside_the_window_is_a_positive_at_once():
    j = Joiner(attribution_window=60, allowed_lateness=0)
    assert j.impression("i1", 100.0, {"ad": "a"}) == []
    assert labels(j.click("i1", 160.0)) == [(True, "a")]  # exactly at the window's end: still inside
    assert j.pending == 0


def test_a_click_after_the_window_is_late_and_the_impression_closes_negative():
    j = Joiner(attribution_window=60, allowed_lateness=100)  # lateness keeps it pending past 160
    j.impression("i1", 100.0, {"ad": "a"})
    assert j.click("i1", 160.5) == []
    assert j.late_clicks == 1 and j.pending == 1
    assert labels(j.advance(261.0)) == [(False, "a")]  # watermark 161 > deadline 160


def test_negatives_close_on_the_watermark_not_on_arrival_time():
    j = Joiner(attribution_window=60, allowed_lateness=30)
    j.impression("i1", 100.0, {"ad": "a"})
    assert j.advance(190.0) == []  # watermark 160: the deadline 160 is not yet passed
    assert labels(j.advance(190.5)) == [(False, "a")]
    # a click arriving after its impression closed is late, not a second sample
    assert j.click("i1", 120.0) == [] and j.late_clicks == 1


def test_event_time_never_goes_back():
    j = Joiner(attribution_window=10, allowed_lateness=0)
    j.impression("i1", 100.0, {"ad": "a"})
    j.impression("old", 50.0, {"ad": "b"})  # out of order: the watermark stays at 100
    assert j.watermark == 100.0
    assert labels(j.advance(111.0)) == [(False, "a")] and j.pending == 0
    assert j.late_impressions == 1  # "old" closed on arrival (its window ended at 60)


def test_duplicates_are_counted_not_trained():
    j = Joiner(attribution_window=60, allowed_lateness=0)
    j.impression("i1", 100.0, {"ad": "a"})
    assert j.impression("i1", 101.0, {"ad": "a"}) == [] and j.duplicates == 1
    assert labels(j.click("i1", 110.0)) == [(True, "a")]
    assert j.click("i1", 111.0) == [] and j.duplicates == 2  # a repeated click
    assert j.impression("i1", 112.0, {"ad": "a"}) == [] and j.duplicates == 3  # after it closed
    assert j.click("nobody", 113.0) == [] and j.orphan_clicks == 1


def test_closed_ids_are_forgotten_one_window_later():
    j = Joiner(attribution_window=10, allowed_lateness=0)
    j.impression("i1", 100.0, {"ad": "a"})
    j.advance(111.0)  # closes i1 (deadline 110)
    j.advance(120.5)  # 120.5 - 10 > 110: forgotten
    assert j.click("i1", 121.0) == [] and j.orphan_clicks == 1 and j.late_clicks == 0


def test_overflow_closes_the_oldest_as_negatives():
    j = Joiner(attribution_window=1000, allowed_lateness=0, max_pending=2)
    j.impression("i1", 100.0, {"ad": "a"})
    j.impression("i2", 101.0, {"ad": "b"})
    assert labels(j.impression("i3", 102.0, {"ad": "c"})) == [(False, "a")]
    assert j.overflow == 1 and j.pending == 2


def random_events(n: int, seed: int) -> list[tuple]:
    rng = random.Random(seed)
    events, ts = [], 1000.0
    for i in range(n):
        ts += rng.expovariate(1.0)
        events.append(("imp", f"i{i}", ts, {"ad": f"a{rng.randrange(9)}"}))
        if rng.random() < 0.2:
            events.append(("imp", f"i{i - rng.randrange(min(i + 1, 10))}", ts, {"ad": "dup"}))  # recent
        if rng.random() < 0.5:
            events.append(("click", f"i{max(0, i - rng.randrange(80))}", ts + rng.random()))
    return events


def feed(j: Joiner, events) -> list:
    out = []
    for e in events:
        out += j.impression(e[1], e[2], e[3]) if e[0] == "imp" else j.click(e[1], e[2])
    return out


@pytest.mark.parametrize("split", [0, 1, 500, 1700])
def test_state_round_trip_continues_identically(split):
    events = random_events(1500, seed=4)
    whole = Joiner(attribution_window=30, allowed_lateness=5, max_pending=50)
    expected = feed(whole, events)
    first = Joiner(attribution_window=30, allowed_lateness=5, max_pending=50)
    got = feed(first, events[:split])
    state = json.loads(json.dumps(first.export_state()))  # through JSON, as in a snapshot
    resumed = Joiner.from_state(state)
    got += feed(resumed, events[split:])
    assert got == expected
    assert resumed.export_state() == whole.export_state()


def test_every_impression_is_trained_exactly_once():
    events = random_events(3000, seed=7)
    j = Joiner(attribution_window=30, allowed_lateness=5, max_pending=100)
    out = feed(j, events) + j.advance(1e9)
    unique = {e[1] for e in events if e[0] == "imp"}
    assert len(out) == len(unique) and j.pending == 0
    assert all(features["ad"] != "dup" for _, features, _ in out)  # the first of duplicates is trained


def test_a_capture_is_the_state_at_capture_time_whatever_follows():
    """The worker captures on its thread and serialises on the writer's: later events must not leak in."""
    events = random_events(1200, seed=11)
    j = Joiner(attribution_window=30, allowed_lateness=5, max_pending=80)
    feed(j, events[:600])
    expected = json.loads(json.dumps(j.export_state()))
    captured = j.capture()
    feed(j, events[600:])
    assert json.loads(json.dumps(captured())) == expected


class _EveryTime(Joiner):
    """The join as it was before it kept the oldest closed id's deadline: every advance looks at
    the first remembered id."""

    def _advance(self, ts):
        if ts <= self.max_ts:
            return []
        self.max_ts = ts
        out = []
        while self._deadlines and self._deadlines[0][0] < self.watermark:
            if self._deadlines[0][2] in self._pending:
                out.append(self._close_next())
            else:
                heapq.heappop(self._deadlines)
        horizon = self.watermark - self.attribution_window
        while self._closed:
            first = next(iter(self._closed))
            if self._closed[first][0] >= horizon and len(self._closed) <= self.max_pending:
                break
            del self._closed[first]
        return out


@pytest.mark.parametrize("max_pending", [20, 1000])  # 20: ids forgotten for room too
def test_forgetting_closed_ids_is_what_looking_every_time_gives(max_pending):
    events = random_events(3000, seed=5)
    fast = Joiner(attribution_window=30, allowed_lateness=5, max_pending=max_pending)
    plain = _EveryTime(attribution_window=30, allowed_lateness=5, max_pending=max_pending)
    assert feed(fast, events) == feed(plain, events)
    assert fast.export_state() == plain.export_state()
    assert (fast.orphan_clicks, fast.late_clicks) == (plain.orphan_clicks, plain.late_clicks)


def test_the_oldest_offset_the_join_holds_is_tracked_in_amortised_constant_time():
    """A cluster member re-reads a moved partition from the oldest impression its join holds
    (stream_fm.stream.samples.Arrivals); checked here against every held id's offset, with ids
    repeated while held (duplicates) and after the join forgot them (taken in anew)."""
    from stream_fm.stream.samples import Arrivals, join_values

    rng = random.Random(3)
    events = random_events(4000, seed=9)
    for n in rng.sample(range(100, len(events)), 600):  # ids forgotten (or not yet), coming again
        if events[n][0] == "imp":
            events[n] = ("imp", events[n - rng.randrange(20, 100)][1], *events[n][2:])
    j = Joiner(attribution_window=30, allowed_lateness=5, max_pending=15)
    arrivals = Arrivals()
    taken_at: dict[str, int] = {}  # the offset at which the join last took each id in
    lows, anew = [], 0
    for offset, e in enumerate(events):
        if e[0] == "imp" and not j.holds(e[1]):
            anew += e[1] in taken_at
            taken_at[e[1]] = offset
        event = {"type": "impression", "id": e[1], "ts": e[2], "features": e[3]} if e[0] == "imp" else \
            {"type": "click", "impression_id": e[1], "ts": e[2]}  # fmt: skip
        join_values([json.dumps(event).encode()], j, 1 << 20, _no_bad, [], [], Counter(), [offset], arrivals)
        if offset % 7 == 0:
            held = [taken_at[i] for i in taken_at if j.holds(i)]
            lows.append(arrivals.oldest_held(j, offset + 1))
            assert lows[-1] == min(held, default=offset + 1), offset
            assert len(arrivals.ids) <= 2 * (offset + 1 - lows[-1]) + 1024  # void entries dropped
    assert len(set(lows)) > 10 and j.overflow > 0 and j.duplicates > 0  # (it moved; ids forgotten)
    assert anew > 20  # (ids the join forgot, taken in again)


def _no_bad(i: int, reason: str, detail: str) -> None:
    raise AssertionError(f"event {i}: {reason} {detail}")


# ---------------------------------------------------------------------- the single worker's joins


def partitioned(n: int, seed: int, partitions: int = 3) -> dict[int, list[tuple]]:
    """Each partition's events (``random_events``, ids made distinct per partition, as producers
    keying by impression id would place them)."""

    def moved(p: int, e: tuple) -> tuple:
        id = f"p{p}-{e[1]}"
        return ("imp", id, e[2], {**e[3], "id": id}) if e[0] == "imp" else ("click", id, e[2])

    return {p: [moved(p, e) for e in random_events(n, seed + p)] for p in range(partitions)}


def test_a_partition_read_behind_the_others_keeps_its_windows():
    """A backlog: all of partition 0, then all of partition 1. One join for both closes partition 1's
    windows as its impressions arrive (their clicks come late); its own join keeps them."""
    events = partitioned(400, seed=11, partitions=2)
    joins, one = Joins(30, 5, 10_000), Joiner(30, 5, 10_000)
    per_partition = feed(joins.of("t", 0), events[0]) + feed(joins.of("t", 1), events[1])
    shared = feed(one, events[0] + events[1])
    alone = [feed(Joiner(30, 5, 10_000), events[p]) for p in (0, 1)]
    assert per_partition == alone[0] + alone[1]  # each partition as if it were read alone
    first, second = (sum(label for label, *_ in samples) for samples in alone)
    assert first > 50 and second > 50
    assert sum(label for label, *_ in shared) - first < second / 2  # most of the second's clicks lost
    assert joins.view().late_impressions == 0 and one.late_impressions > 300


@pytest.mark.parametrize("split", [0, 1, 300, 2000])
def test_joins_state_round_trip_continues_identically(split):
    events = partitioned(700, seed=5)
    order = sorted(((p, e) for p, es in events.items() for e in es), key=lambda pe: pe[1][2])  # interleaved
    whole, first = Joins(30, 5, 50), Joins(30, 5, 50)
    expected = [s for p, e in order for s in feed(whole.of("t", p), [e])]
    got = [s for p, e in order[:split] for s in feed(first.of("t", p), [e])]
    state = json.loads(json.dumps(first.capture()()))  # through JSON, as in a snapshot
    resumed = Joins.from_state(state, 30, 5, 50)
    got += [s for p, e in order[split:] for s in feed(resumed.of("t", p), [e])]
    assert got == expected
    assert resumed.capture()() == whole.capture()() and resumed.view() == whole.view()


def test_a_join_state_of_the_previous_format_is_inherited_until_it_holds_nothing():
    """A snapshot of the previous version holds one join for every partition (format 1). Its
    pending impressions still get their clicks, from whichever partition; new impressions go to
    their partition's join; every impression is trained once; the counters only grow."""
    events = partitioned(600, seed=3)
    order = sorted(((p, e) for p, es in events.items() for e in es), key=lambda pe: pe[1][2])
    old = Joiner(30, 5, 10_000)  # the previous version's worker, up to the snapshot
    out = feed(old, [e for _, e in order[:900]])
    assert old.pending > 10
    joins = Joins.from_state(json.loads(json.dumps(old.export_state())), 30, 5, 10_000)
    assert joins.inherited is not None and joins.view().pending == old.pending
    views = [joins.view()]
    for p, e in order[900:]:
        out += feed(joins.of("t", p), [e])
        views.append(joins.view())
    out += [s for p in range(3) for s in joins.of("t", p).advance(1e9)]
    trained = sorted(f["ad"] for _, f, _ in out)
    assert len(out) == len({e[1] for _, e in order if e[0] == "imp"})  # each impression once
    assert "dup" not in trained
    assert joins.inherited.empty and joins.view().pending == 0
    for name in ("duplicates", "late_clicks", "orphan_clicks", "late_impressions"):
        assert all(getattr(a, name) <= getattr(b, name) for a, b in itertools.pairwise(views)), name
    # the impressions the old join held close as they would have there
    continued = Joiner.from_state(json.loads(json.dumps(old.export_state())))
    expected = feed(continued, [e for _, e in order[900:]]) + continued.advance(1e9)
    held = set(old._pending)

    def outcome(samples):
        return {f["id"]: label for label, f, _ in samples if f["id"] in held}

    assert outcome(out) == outcome(expected) and len(outcome(out)) == len(held)
    assert 0 < sum(outcome(out).values()) < len(held)
    state = json.loads(json.dumps(joins.capture()()))
    assert state["format"] == 2 and Joins.from_state(state, 30, 5, 10_000).view() == joins.view()


def test_a_join_state_of_an_unknown_format_is_refused_naming_both():
    with pytest.raises(ValueError, match="join state format 3: this version reads 1 and 2"):
        Joins.from_state({"format": 3, "partitions": [], "inherited": None}, 30, 5, 50)


def test_max_pending_bounds_the_impressions_of_all_partitions_together():
    joins = Joins(1000, 0, 2)
    joins.of("t", 0).impression("a", 100.0, {"ad": "a"})
    joins.of("t", 1).impression("b", 101.0, {"ad": "b"})
    joins.of("t", 0).impression("c", 102.0, {"ad": "c"})
    assert labels(joins.trim()) == [(False, "a")]  # the oldest, whichever partition holds it
    assert joins.view().pending == 2 and joins.view().overflow == 1
    events = partitioned(800, seed=8)
    order = sorted(((p, e) for p, es in events.items() for e in es), key=lambda pe: pe[1][2])
    joins, out = Joins(30, 5, 40), []
    for p, e in order:
        out += feed(joins.of("t", p), [e]) + joins.trim()
        assert joins.view().pending <= 40  # (each partition's join alone would hold up to 40)
    out += [s for p in range(3) for s in joins.of("t", p).advance(1e9)]
    assert joins.view().overflow > 100
    assert len(out) == len({e[1] for _, e in order if e[0] == "imp"})  # each impression once
