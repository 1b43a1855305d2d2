"""The store's contract: every store (in memory, on Redis) keeps queues and cursors alike.

Each test runs against a MemoryStore and against a RedisStore on a real
redis-server; channel ids carry the test's own prefix (``cid``), so the
Redis store's tests share one server without meeting.
"""
from __future__ import annotations

import time
from decimal import Decimal

import pytest

from realplexor.store import MemoryStore, Settings


@pytest.fixture(params=["memory", "redis"])
def make_store(request):
    """``make_store(**settings)``: a fresh store of the kind under test."""
    if request.param == "memory":
        return lambda **settings: MemoryStore(Settings(**settings), counts=lambda channel_id: 0)
    pytest.importorskip("redis")
    redis_server = request.getfixturevalue("redis_server")
    from realplexor.redis_store import RedisStore, connect

    def make(**settings):
        store = RedisStore(connect(redis_server.url), Settings(**settings), "contract")
        store.check()
        return store
    return make


def publish(store, ids: str, data: str = "1", limiters=()) -> dict[str, str]:
    """Publish to ``[CURSOR:]ID,...``; each id's cursor text."""
    targets = []
    for item in ids.split(","):
        cursor, _, channel = item.rpartition(":")
        targets.append((channel, Decimal(cursor) if cursor else None, cursor or None))
    return {channel: text for channel, _, text in store.publish(targets, data.encode(), frozenset(limiters))}


def replay(store, **cursors) -> list[tuple[dict[str, str], str]]:
    """What a listener of these cursors (None: from now) gets: [(ids with cursors, data), ...]."""
    parts, _ = store.history({channel: None if cursor is None else Decimal(cursor)
                              for channel, cursor in cursors.items()})
    return [(dict(ids), data.decode()) for ids, data in parts or []]


def test_fresh_cursors_strictly_increase_and_one_publish_shares_one(make_store, cid):
    store = make_store()
    first = publish(store, f"{cid}a,{cid}b")
    assert first[f"{cid}a"] == first[f"{cid}b"]
    later = [Decimal(publish(store, f"{cid}a")[f"{cid}a"]) for _ in range(5)]
    assert later == sorted(set(later)) and later[0] > Decimal(first[f"{cid}a"])
    assert all(len(str(cursor).split(".")[1]) == 14 for cursor in later)


def test_replay_is_strictly_after_the_listeners_cursor(make_store, cid):
    store = make_store()
    cursors = [publish(store, f"{cid}a", f'"{n}"')[f"{cid}a"] for n in range(3)]
    assert [data for _, data in replay(store, **{f"{cid}a": cursors[0]})] == ['"1"', '"2"']
    assert replay(store, **{f"{cid}a": cursors[2]}) == []
    assert [data for _, data in replay(store, **{f"{cid}a": "0"})] == ['"0"', '"1"', '"2"']


def test_a_listener_from_now_is_replayed_nothing_but_learns_the_newest_cursor(make_store, cid):
    store = make_store()
    cursor = publish(store, f"{cid}a")[f"{cid}a"]
    parts, newest = store.history({f"{cid}a": None, f"{cid}b": None})
    assert parts is None
    assert newest == {f"{cid}a": Decimal(cursor), f"{cid}b": Decimal(0)}


def test_publishers_cursors_are_kept_exactly(make_store, cid):
    store = make_store()
    assert publish(store, f"1732486800.12345678901234:{cid}a,5:{cid}b") == {
        f"{cid}a": "1732486800.12345678901234", f"{cid}b": "5"}
    assert replay(store, **{f"{cid}a": "1732486800.12345678901233"}) == [
        ({f"{cid}a": "1732486800.12345678901234"}, "1")]
    assert replay(store, **{f"{cid}a": "1732486800.12345678901234"}) == []


def test_one_publish_to_several_listened_channels_is_one_part(make_store, cid):
    store = make_store()
    placed = publish(store, f"{cid}a,{cid}b,{cid}z", '"all"')
    assert replay(store, **{f"{cid}a": "0", f"{cid}b": "0"}) == [
        ({f"{cid}a": placed[f"{cid}a"], f"{cid}b": placed[f"{cid}b"]}, '"all"')]


def test_limited_messages_are_replayed_only_to_listeners_of_a_limiter(make_store, cid):
    store = make_store()
    publish(store, f"{cid}a,{cid}b", '"secret"', limiters=[f"{cid}friends"])
    assert replay(store, **{f"{cid}a": "0", f"{cid}b": "0"}) == []
    got = replay(store, **{f"{cid}a": "0", f"{cid}b": "0", f"{cid}friends": "0"})
    assert [data for _, data in got] == ['"secret"'] and sorted(got[0][0]) == [f"{cid}a", f"{cid}b"]


def test_queues_keep_the_newest_max_data_for_id_in_publish_order(make_store, cid):
    store = make_store(max_data_for_id=3)
    publish(store, f"9999999999999:{cid}a", '"far ahead"')
    for n in range(3):
        publish(store, f"{cid}a", f'"{n}"')
    assert [data for _, data in replay(store, **{f"{cid}a": "0"})] == ['"0"', '"1"', '"2"']


def test_a_repeated_id_in_one_publish_counts_once(make_store, cid):
    store = make_store()
    assert list(publish(store, f"{cid}d,{cid}d,{cid}d")) == [f"{cid}d"]
    assert len(replay(store, **{f"{cid}d": "0"})) == 1


def test_an_answer_is_capped_at_max_answer_oldest_first(make_store, cid):
    store = make_store(max_answer=100)
    for n in range(10):
        publish(store, f"{cid}a", f'"{n:02d}{"x" * 36}"')      # 40 bytes each
    assert [data[1:3] for _, data in replay(store, **{f"{cid}a": "0"})] == ["00", "01"]


def test_a_fresh_stores_positions_start_at_10(make_store):
    assert make_store().position() >= 10


def dropped(store, **cursors) -> dict[str, str]:
    """The channels on which a listener of these cursors missed messages, with the newest dropped cursor."""
    return dict(store.dropped_after({channel: None if cursor is None else Decimal(cursor)
                                     for channel, cursor in cursors.items()}))


def test_nothing_dropped_means_no_cut_whatever_the_cursor(make_store, cid):
    store = make_store(max_data_for_id=3)
    publish(store, f"{cid}a")
    assert dropped(store, **{f"{cid}a": "0", f"{cid}never": "0"}) == {}


def test_messages_cut_by_max_data_for_id_are_told_to_a_listener_behind_them(make_store, cid):
    store = make_store(max_data_for_id=2)
    cursors = [publish(store, f"{cid}a", f'"{n}"')[f"{cid}a"] for n in range(4)]
    # 0 and 1 were dropped: a listener before 1 missed some, one at 1 or later missed none.
    assert dropped(store, **{f"{cid}a": "0"}) == {f"{cid}a": cursors[1]}
    assert dropped(store, **{f"{cid}a": cursors[0]}) == {f"{cid}a": cursors[1]}
    assert dropped(store, **{f"{cid}a": cursors[1]}) == {}
    assert dropped(store, **{f"{cid}a": None}) == {}
    assert [data for _, data in replay(store, **{f"{cid}a": cursors[1]})] == ['"2"', '"3"']


def test_publishers_small_cursors_are_compared_exactly_when_dropped(make_store, cid):
    store = make_store(max_data_for_id=1)
    publish(store, f"9:{cid}a")
    publish(store, f"10:{cid}a")
    assert dropped(store, **{f"{cid}a": "8.5"}) == {f"{cid}a": "9"}
    assert dropped(store, **{f"{cid}a": "9"}) == {}


def test_a_queue_emptied_after_clean_id_after_counts_as_dropped(make_store, cid):
    store = make_store(clean_id_after=0.2)
    first = publish(store, f"{cid}a")[f"{cid}a"]
    deadline = time.monotonic() + 5
    while replay(store, **{f"{cid}a": "0"}):
        assert time.monotonic() < deadline, "the queue was never emptied"
        time.sleep(0.05)
    store.expire()
    assert dropped(store, **{f"{cid}a": "0"}) == {f"{cid}a": first}
    # A publish after the emptying keeps the mark for listeners behind it.
    later = publish(store, f"{cid}a")[f"{cid}a"]
    assert dropped(store, **{f"{cid}a": "0"}) == {f"{cid}a": first}
    assert dropped(store, **{f"{cid}a": first}) == {}
    assert [ids[f"{cid}a"] for ids, _ in replay(store, **{f"{cid}a": first})] == [later]
