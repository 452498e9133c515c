"""The sync topic's bookkeeping (stream_fm/cluster/ledger.py), without a broker: which delta
counts, when a round is complete, where a restart reads again from."""

from __future__ import annotations

import numpy as np
import pytest

from stream_fm import ConfigError, SparseFM
from stream_fm.cluster.delta import Delta, encode
from stream_fm.cluster.ledger import Boundary, Ledger
from stream_fm.cluster.member import ROUND_RECORDS
from stream_fm.cluster.sync import GENESIS_FORMAT, decode_genesis, encode_genesis
from stream_fm.errors import DeltaError
from stream_fm.ops.settings import SETTINGS

MODEL = SparseFM().get_config()
GENESIS = {
    "format": GENESIS_FORMAT,
    "partitions": [["events", 0, 0], ["events", 1, 10]],
    "round_records": 100,
    "model": MODEL,
}


def delta(partition: int, round_: int, by: str = "a", samples: int = 5) -> Delta:
    start = round_ * 100 + 10 * partition
    meta = {"end": start + 100, "low": start + 90, "max_ts": 7.0 + round_, "by": by, "samples": samples}
    return Delta(partition, round_, {"x": np.arange(3.0) + round_ + len(by)}, meta)


def feed(ledger: Ledger, deltas: list[Delta], first_offset: int = 1) -> list[tuple[int, int, str]]:
    """Each delta as two chunks at consecutive offsets; what the ledger took (partition, round, by)."""
    taken, offset = [], first_offset
    for d in deltas:
        for message in encode(d, 900):
            got = ledger.read(offset, message)
            offset += 1
            if got is not None:
                taken.append((got.partition, got.round, got.meta["by"]))
    return taken


def test_a_round_completes_once_every_partition_is_in_and_comes_in_partition_order():
    ledger = Ledger(GENESIS)
    assert ledger.read(0, encode_genesis(GENESIS)) is None  # the genesis is not a delta
    feed(ledger, [delta(1, 0)])
    assert ledger.complete() is None  # partition 0's round 0 is missing
    feed(ledger, [delta(1, 1), delta(0, 0)])
    done = ledger.complete()
    assert [d.partition for d in done] == [0, 1] and ledger.merged == 1
    assert ledger.complete() is None  # round 1 of partition 0 is missing
    assert ledger.folded[1] == Boundary(1, 110, 100, 7.0)
    assert ledger.seen[1] == Boundary(2, 210, 200, 8.0)  # read, not folded yet


def test_the_first_complete_copy_of_a_round_counts_and_a_later_one_is_ignored():
    ledger = Ledger(GENESIS)
    taken = feed(ledger, [delta(0, 0, by="old-owner"), delta(0, 0, by="new-owner"), delta(1, 0)])
    assert taken == [(0, 0, "old-owner"), (1, 0, "a")]
    (first, _) = ledger.complete()
    assert first.meta["by"] == "old-owner"
    assert feed(ledger, [delta(0, 0, by="late")]) == []  # a round already folded: ignored


def test_a_restart_reads_again_from_the_first_message_of_a_round_not_folded():
    ledger = Ledger(GENESIS)
    feed(ledger, [delta(0, 0), delta(1, 0)], first_offset=1)  # offsets 1-4
    ledger.complete()
    feed(ledger, [delta(1, 1)], first_offset=5)  # offsets 5-6: round 1 waits for partition 0
    assert ledger.replay_from(position=7) == 5
    state = ledger.state(position=7)
    again = Ledger.from_state(state)
    assert (again.merged, again.folded, again.seen) == (1, ledger.folded, ledger.folded)
    assert state["sync_offset"] == 5
    feed(again, [delta(1, 1), delta(0, 1)], first_offset=5)  # the replay
    assert [d.partition for d in again.complete()] == [0, 1]
    assert again.replay_from(position=9) == 9


def test_a_member_with_other_settings_is_refused_naming_the_key():
    ledger = Ledger(GENESIS)
    ledger.check("sync", 100, MODEL)
    with pytest.raises(ConfigError, match=r"cluster\.round_records.*2000.*100"):
        ledger.check("sync", 2000, MODEL)
    with pytest.raises(ConfigError, match=r"^model\.n_factors='4' is not allowed: .*began: 8 "):
        ledger.check("sync", 100, {**MODEL, "n_factors": 4})


def test_a_member_without_a_round_length_of_its_own_takes_the_clusters():
    """``cluster.round_records`` unset (the default): the round length the cluster began with,
    whatever a release's default for a new cluster is (members of an older cluster upgrade)."""
    ledger = Ledger(GENESIS)
    ledger.check("sync", None, MODEL)
    assert ledger.round_records == 100
    with pytest.raises(ConfigError, match=r"^model\.n_factors='4' is not allowed"):
        ledger.check("sync", None, {**MODEL, "n_factors": 4})


def test_the_settings_reference_names_a_new_clusters_round_length():
    """The help of ``cluster.round_records`` (README, ``--help``) says what a new cluster takes."""
    (setting,) = [s for s in SETTINGS if s.key == "cluster.round_records"]
    assert f"{ROUND_RECORDS} for a new one" in setting.help


def test_a_cluster_begun_before_a_setting_existed_has_it_as_that_release_learned():
    """A genesis written before ``nonnegative_gains`` and ``dense_factors`` existed: the cluster
    learns without them, so a member with today's defaults is refused naming them, and one
    configured as the cluster is not."""
    later = {"nonnegative_gains": False, "dense_factors": False}
    earlier = {k: v for k, v in MODEL.items() if k not in later}
    ledger = Ledger({**GENESIS, "model": earlier})
    assert ledger.genesis["model"] == {**MODEL, **later}
    said = r"^model\.dense_factors, model\.nonnegative_gains='true, true' is not allowed: .*: false, false "
    with pytest.raises(ConfigError, match=said):
        ledger.check("sync", 100, MODEL)
    with pytest.raises(ConfigError, match=r"^model\.dense_factors='true' is not allowed"):
        ledger.check("sync", 100, {**MODEL, "nonnegative_gains": False})
    ledger.check("sync", 100, {**MODEL, **later})


def test_a_cluster_of_the_earlier_format_is_refused_naming_both_formats():
    """Format 1 rounds carried changes of the model; a member of this release cannot follow them."""
    with pytest.raises(ConfigError, match=r"cluster\.sync_topic.*format 1.*format 2"):
        Ledger({**GENESIS, "format": 1}).check("sync", 100, MODEL)  # (a snapshot's genesis)
    old = encode_genesis(GENESIS).replace(b'"format":2', b'"format":1')
    with pytest.raises(DeltaError, match=r"format 1.*format 2"):
        decode_genesis(old)  # (the topic's)


def test_a_snapshot_of_another_cluster_or_a_single_worker_is_refused_naming_the_key():
    from pathlib import Path
    from types import SimpleNamespace

    from stream_fm.cluster.ledger import cluster_state

    ours = {"sync_topic": "sync", "sync_offset": 7}
    snap = SimpleNamespace(path=Path("snap-1"), extra={"cluster": ours})
    assert cluster_state(snap, "sync", "cluster.sync_topic", "this member's cluster") is ours
    with pytest.raises(ConfigError, match=r"--sync-topic='other'.*snap-1 is of sync topic 'sync'"):
        cluster_state(snap, "other", "--sync-topic", "the members")
    with pytest.raises(ConfigError, match=r"cluster\.sync_topic='sync'.*snap-1 is a single worker's"):
        cluster_state(SimpleNamespace(path=Path("snap-1"), extra={}), "sync", "cluster.sync_topic", "it")
