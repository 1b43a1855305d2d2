"""The channel state's contract, with fake clocks and no sockets.

Written against :class:`ChannelState`: a new implementation (a shared
store) joins by adding itself to the ``state`` fixture's params.
"""
from __future__ import annotations

import json
from decimal import Decimal

import pytest

from realplexor.channels import MemoryChannels, Settings
from realplexor.cursors import CursorClock


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeWallClock:
    """Nanoseconds since the epoch that move only when the test says so."""

    def __init__(self):
        self.ns = 1_732_486_800_000_000_000

    def __call__(self) -> int:
        return self.ns


class Recorder:
    """A listener that keeps what it was told."""

    def __init__(self, **cursors):
        self.cursors = {k: (Decimal(v) if v is not None else None) for k, v in cursors.items()}
        self.bodies: list[bytes] = []

    def deliver(self, body: bytes) -> None:
        self.bodies.append(body)

    def parts(self):
        assert len(self.bodies) == 1
        return json.loads(self.bodies[0])


def memory_state(settings, clock, wall):
    return MemoryChannels(settings, clock=clock, cursor_clock=CursorClock(wall))


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def wall():
    return FakeWallClock()


@pytest.fixture(params=[memory_state], ids=["memory"])
def make_state(request, clock, wall):
    def make(**settings):
        return request.param(Settings(**settings), clock, wall)
    return make


@pytest.fixture
def state(make_state):
    return make_state(offline_timeout=30, clean_id_after=3600, max_data_for_id=30)


def publish(state, ids, data="1", limiters=()):
    targets = []
    for item in ids.split(","):
        cursor, _, channel = item.rpartition(":")
        targets.append((channel, Decimal(cursor) if cursor else None, cursor or None))
    return state.publish(targets, data.encode(), frozenset(limiters))


def test_listener_is_woken_once_with_the_publish(state):
    listener = Recorder(a=None)
    assert state.listen(listener) is None
    placed = publish(state, "a", '"x"')
    assert listener.parts() == [{"ids": {"a": placed[0][1]}, "data": "x"}]
    publish(state, "a", '"y"')
    assert len(listener.bodies) == 1
    assert state.listener_count() == 0


def test_queued_message_answers_a_listener_with_an_older_cursor(state):
    publish(state, "a", '"x"')
    body = state.listen(Recorder(a="0"))
    assert json.loads(body)[0]["data"] == "x"
    assert state.listener_count() == 0


def test_listener_without_cursor_ignores_the_past(state, wall):
    publish(state, "a", '"x"')
    assert state.listen(Recorder(a=None)) is None


def test_listener_from_now_is_after_every_cursor_handed_out(state, wall):
    # Two publishes in the same nanosecond, then a listener in that nanosecond.
    publish(state, "a")
    publish(state, "a")
    assert state.listen(Recorder(a=None)) is None


def test_server_cursors_strictly_increase_within_one_nanosecond(state):
    cursors = [Decimal(publish(state, "a")[0][1]) for _ in range(5)]
    assert cursors == sorted(set(cursors))
    assert all(len(str(c).split(".")[1]) == 14 for c in cursors)


def test_one_publish_reaching_several_listened_channels_is_one_part(state):
    listener = Recorder(a=None, b=None, c=None)
    state.listen(listener)
    placed = dict(publish(state, "a,b,z"))
    assert listener.parts() == [{"ids": {"a": placed["a"], "b": placed["b"]}, "data": 1}]


def test_queued_parts_are_grouped_and_ordered_by_cursor(state):
    publish(state, "5:b", '"b5"')
    publish(state, "3:a,3:b", '"ab3"')
    publish(state, "4:a", '"a4"')
    parts = json.loads(state.listen(Recorder(a="0", b="0")))
    assert [(p["data"], p["ids"]) for p in parts] == [
        ("ab3", {"a": "3", "b": "3"}), ("a4", {"a": "4"}), ("b5", {"b": "5"})]


def test_limited_message_only_for_listeners_of_a_limiter(state):
    plain, friend = Recorder(a=None), Recorder(a=None, f=None)
    state.listen(plain)
    state.listen(friend)
    publish(state, "a", '"secret"', limiters={"f"})
    assert friend.parts()[0]["data"] == "secret"
    assert plain.bodies == []
    assert state.listen(Recorder(a="0")) is None
    assert json.loads(state.listen(Recorder(a="0", f="0")))[0]["data"] == "secret"


def test_no_wake_when_the_listened_cursor_is_newer(state):
    listener = Recorder(a="100")
    state.listen(listener)
    publish(state, "50:a")
    assert listener.bodies == []
    publish(state, "150:a", '"new"')
    assert listener.parts() == [{"ids": {"a": "150"}, "data": "new"}]


def test_body_is_rendered_once_for_listeners_with_the_same_channels(state):
    listeners = [Recorder(a=None) for _ in range(3)] + [Recorder(a=None, b=None)]
    for listener in listeners:
        state.listen(listener)
    publish(state, "a")
    assert listeners[0].bodies[0] is listeners[1].bodies[0] is listeners[2].bodies[0]
    assert listeners[3].bodies[0] == listeners[0].bodies[0]


def test_queue_keeps_the_newest_max_data_for_id(make_state):
    state = make_state(max_data_for_id=3)
    for n in range(5):
        publish(state, f"{n + 1}:a", str(n))
    assert [p["data"] for p in json.loads(state.listen(Recorder(a="0")))] == [2, 3, 4]


def test_out_of_order_cursors_are_queued_in_order(state):
    publish(state, "10:a", '"ten"')
    publish(state, "5:a", '"five"')
    assert [p["data"] for p in json.loads(state.listen(Recorder(a="0")))] == ["five", "ten"]


def test_queue_is_emptied_after_clean_id_after(make_state, clock):
    state = make_state(clean_id_after=60)
    publish(state, "a")
    clock.now += 59
    assert state.listen(Recorder(a="0")) is not None
    clock.now += 2
    assert state.listen(Recorder(a="0")) is None
    publish(state, "b")
    clock.now += 61
    state.expire()
    assert "[b]" not in state.stats()


def test_online_counts_listeners_and_offline_waits_for_the_last(state, clock):
    first, second = Recorder(a=None), Recorder(a=None)
    state.listen(first)
    state.listen(second)
    assert state.online() == [("a", 2)]
    state.unlisten(first)
    clock.now += 100
    state.expire()
    assert state.online() == [("a", 1)]
    state.unlisten(second)
    assert state.online() == [("a", 0)]
    clock.now += 29
    state.expire()
    assert state.online() == [("a", 0)]
    clock.now += 1
    state.expire()
    assert state.online() == []
    assert [e[0] for e in state.watch(0)] == ["offline"]


def test_returning_listener_cancels_the_offline_countdown(state, clock):
    listener = Recorder(a=None)
    state.listen(listener)
    state.unlisten(listener)
    clock.now += 20
    state.listen(Recorder(a=None))
    clock.now += 20
    state.expire()
    assert state.online() == [("a", 1)]
    assert [(e, c) for e, _, c in state.watch(0)] == [("online", "a")]


def test_unlisten_is_idempotent(state):
    listener = Recorder(a=None, b=None)
    state.listen(listener)
    state.unlisten(listener)
    state.unlisten(listener)
    assert state.listener_count() == 0
    assert state.online() == [("a", 0), ("b", 0)]


def test_online_filters_by_prefix_and_sorts(state):
    state.listen(Recorder(x_b=None, x_a=None, y_c=None))
    assert state.online(["x_"]) == [("x_a", 1), ("x_b", 1)]
    assert state.online(["y_", "x_a"]) == [("x_a", 1), ("y_c", 1)]


def test_watch_dedups_and_keeps_latest_in_order(state, clock):
    start = state.position()
    one = Recorder(a=None)
    state.listen(one)
    state.listen(Recorder(b=None))
    state.unlisten(one)
    clock.now += 30
    state.expire()
    events = state.watch(start)
    assert [(e, c) for e, _, c in events] == [("online", "b"), ("offline", "a")]
    assert [p for _, p, _ in events] == sorted(p for _, p, _ in events)
    assert state.watch(state.position()) == []
    assert [(e, c) for e, _, c in state.watch(start, ["a"])] == [("offline", "a")]


def test_event_log_is_bounded(make_state, clock):
    state = make_state(event_log_len=4, offline_timeout=0)
    for n in range(10):
        listener = Recorder(**{f"c{n}": None})
        state.listen(listener)
        state.unlisten(listener)
        state.expire()
    # Only the last four transitions are kept: c8 and c9 going on and off.
    assert [(e, p, c) for e, p, c in state.watch(0)] == [("offline", 28, "c8"), ("offline", 30, "c9")]
    assert state.position() == 30


def test_positions_start_at_10_and_grow_by_one_per_event(state, clock):
    assert state.position() == 10
    state.listen(Recorder(a=None, b=None))
    assert state.watch(1) == [("online", 11, "a"), ("online", 12, "b")]
    assert state.position() == 12


def test_event_log_keeps_three_chains_of_event_chain_len_plus_one():
    from realplexor.channels import event_log_len

    assert event_log_len(3) == 12
    assert event_log_len(1000) == 3003


def test_many_listeners_of_one_channel_all_woken(state):
    listeners = [Recorder(a=None) for _ in range(2000)]
    for listener in listeners:
        state.listen(listener)
    for listener in listeners[::2]:
        state.unlisten(listener)
    publish(state, "a")
    assert [len(l.bodies) for l in listeners] == [0, 1] * 1000
    assert state.listener_count() == 0


def test_stats_names_channels(state):
    state.listen(Recorder(a=None))
    publish(state, "b")
    text = state.stats()
    assert "listeners: 1" in text and "[a]" in text and "[b]" in text


# -- the answer cap -----------------------------------------------------------

def fetch_all(state, cursors: dict[str, str], limit: int = 100) -> list[tuple[str, ...]]:
    """Poll again and again with the cursors each answer gave, as a client does; every part seen."""
    seen = []
    for _ in range(limit):
        body = state.listen(Recorder(**cursors))
        if body is None:
            return seen
        for part in json.loads(body):
            seen.append((part["data"], *sorted(part["ids"].items())))
            for channel, cursor in part["ids"].items():
                if Decimal(cursor) > Decimal(cursors[channel]):
                    cursors[channel] = cursor
    raise AssertionError("the polls never caught up")


def test_an_answer_carries_at_most_max_answer_bytes_of_data_oldest_first(make_state):
    state = make_state(max_answer=100, max_data_for_id=30)
    for n in range(30):
        for channel in ("a", "b"):
            publish(state, channel, f'"{channel}{n:02d}{"x" * 17}"')   # 24 bytes of JSON each
    first = json.loads(state.listen(Recorder(a="0", b="0")))
    assert [part["data"][:3] for part in first] == ["a00", "b00", "a01", "b01"]
    seen = fetch_all(state, {"a": "0", "b": "0"})
    assert sorted(data[:3] for data, *_ in seen) == sorted(f"{c}{n:02d}" for n in range(30) for c in "ab")
    assert len(seen) == len(set(seen)) == 60


def test_a_message_larger_than_the_cap_still_goes_alone(make_state):
    state = make_state(max_answer=10)
    publish(state, "a", '"' + "x" * 50 + '"')
    publish(state, "a", '"second"')
    first = json.loads(state.listen(Recorder(a="0")))
    assert [len(part["data"]) for part in first] == [50]


def test_the_cap_never_skips_a_message_behind_a_publishers_cursor(make_state):
    # One message at cursor 9 on a but 1 on b: sending it first alone would
    # hand out a's cursor 9, and the poll after would miss a's message at 5.
    state = make_state(max_answer=8)
    publish(state, "9:a,1:b", '"ab9...."')
    publish(state, "5:a", '"a5....."')
    publish(state, "3:b", '"b3....."')
    seen = fetch_all(state, {"a": "0", "b": "0"})
    assert sorted(data for data, *_ in seen) == ["a5.....", "ab9....", "b3....."]
    assert len(seen) == 3


def test_duplicate_ids_in_one_publish_count_once(state):
    listener = Recorder(d=None)
    state.listen(listener)
    placed = publish(state, "d,d,d", '"x"')
    assert [channel for channel, _ in placed] == ["d"]
    assert listener.bodies[0].count(b'"d"') == 1
    assert len(json.loads(state.listen(Recorder(d="0")))) == 1


def test_a_publish_to_many_ids_costs_in_proportion_to_them(make_state):
    """A publish to N listened channels: 4 times the ids must cost about 4 times, not 16."""
    import time

    def cost(n: int) -> float:
        best = float("inf")
        for _ in range(3):
            state = make_state()
            for i in range(n):
                state.listen(Recorder(**{f"c{i}": None}))
            ids = ",".join(f"c{i}" for i in range(n))
            started = time.perf_counter()
            publish(state, ids)
            best = min(best, time.perf_counter() - started)
        return best

    assert cost(4000) / cost(1000) < 8


def test_identical_polls_at_the_same_moment_share_one_body(state):
    publish(state, "a", '"x"')
    first, second = state.listen(Recorder(a="0")), state.listen(Recorder(a="0"))
    assert first is second
    publish(state, "a", '"y"')
    third = state.listen(Recorder(a="0"))
    assert [part["data"] for part in json.loads(third)] == ["x", "y"]


# -- memory bounds ------------------------------------------------------------

def queued_bytes(state) -> int:
    line = next(line for line in state.stats().splitlines() if line.startswith("queued bytes:"))
    return int(line.split()[2])


def test_queues_least_recently_published_to_are_dropped_past_max_queue_bytes(make_state, caplog):
    state = make_state(max_queue_bytes=1000)
    data = '"' + "x" * 98 + '"'          # 100 bytes
    for n in range(8):
        publish(state, f"c{n}", data)
    publish(state, "c0", data)            # c0 is now the most recently published to
    with caplog.at_level("WARNING", "realplexor.channels"):
        for n in range(8, 14):
            publish(state, f"c{n}", data)
    assert queued_bytes(state) <= 1000
    still = [n for n in range(14) if state.listen(Recorder(**{f"c{n}": "0"})) is not None]
    assert still == [0, 6, 7, 8, 9, 10, 11, 12, 13]   # c0 holds two messages
    assert "queues dropped over MAX_QUEUE_MB: 5" in state.stats()
    assert len([r for r in caplog.records if "MAX_QUEUE_MB" in r.getMessage()]) == 1


def test_a_message_in_several_queues_counts_once(make_state):
    state = make_state()
    publish(state, "a,b,c", '"' + "x" * 98 + '"')
    assert queued_bytes(state) == 100


def test_queues_drop_in_publish_order_not_cursor_order(make_state, caplog):
    state = make_state(max_data_for_id=3)
    with caplog.at_level("WARNING", "realplexor.channels"):
        publish(state, "9999999999999:a", '"far ahead"')
    assert "more than a day ahead" in caplog.text
    for n in range(3):
        publish(state, "a", f'"{n}"')
    assert [part["data"] for part in json.loads(state.listen(Recorder(a="0")))] == ["0", "1", "2"]


def test_stats_is_a_bounded_summary(state):
    for n in range(100):
        state.listen(Recorder(**{f"c{n:03d}": None}))
    state.listen(Recorder(c050=None))
    lines = state.stats().splitlines()
    channel_lines = [line for line in lines if line.startswith("[")]
    assert len(channel_lines) == 20
    assert channel_lines[0].startswith("[c050] ") and "listeners=2" in channel_lines[0]
    assert "channels: 100" in lines


def test_a_channel_with_listeners_only_is_forgotten_when_they_are_gone(state, clock):
    listeners = [Recorder(**{f"c{n}": None}) for n in range(50)]
    for listener in listeners:
        state.listen(listener)
    for listener in listeners:
        state.unlisten(listener)
    clock.now += 31
    state.expire()
    assert "channels: 0" in state.stats()


def test_online_prefixes_may_overlap_and_repeat(state):
    state.listen(Recorder(ab=None, abc=None, b=None, ba=None, c=None))
    assert state.online(["ab", "a", "b", "a"]) == [("ab", 1), ("abc", 1), ("b", 1), ("ba", 1)]
    assert state.online(["abc", "zz"]) == [("abc", 1)]


def test_online_with_many_prefixes_does_not_scan_every_channel(make_state):
    """ONLINE for 1000 prefixes costs about the same among 4000 or 64000 online channels."""
    import time

    def cost(channels: int) -> float:
        state = make_state()
        state.listen(Recorder(**{f"c{n}": None for n in range(channels)}))
        prefixes = [f"c{n}x" for n in range(1000)]
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            state.online(prefixes)
            best = min(best, time.perf_counter() - started)
        return best

    assert cost(64000) / cost(4000) < 4


def test_online_and_stats_come_in_bounded_steps_that_miss_nothing(make_state):
    from realplexor.store import STEP_ITEMS

    state = make_state()
    count = STEP_ITEMS * 2 + 10
    state.listen(Recorder(**{f"c{n:06d}": None for n in range(count)}))
    steps = state.online_steps([])
    first = next(steps)
    assert len(first) == STEP_ITEMS
    # Channels coming online between steps: those after the point reached are seen too.
    state.listen(Recorder(a_before=None, zz_after=None))
    rest = [item for part in steps for item in part]
    assert all(len(part) <= STEP_ITEMS for part in state.online_steps([]))
    ids = [channel for channel, _ in first + rest]
    assert len(ids) == len(set(ids)) == count + 1 and "zz_after" in ids
    pieces = list(state.stats_steps())
    assert len(pieces) >= 3 and "".join(pieces) == state.stats()


# -- cursor boundaries: strictly after the listener's cursor ------------------

CURSOR = "1732486800.12345678901234"
JUST_AFTER = "1732486800.12345678901235"


def test_a_queued_message_at_the_listeners_cursor_is_not_replayed(state):
    publish(state, f"{CURSOR}:a", '"at"')
    assert state.listen(Recorder(a=CURSOR)) is None
    publish(state, f"{JUST_AFTER}:a", '"after"')
    parts = json.loads(state.listen(Recorder(a=CURSOR)))
    assert [(p["data"], p["ids"]) for p in parts] == [("after", {"a": JUST_AFTER})]


def test_queued_replay_is_strictly_after_the_cursor_on_every_channel(state):
    # Each channel is read from its own cursor: b's cursor is a's "after".
    publish(state, f"{CURSOR}:a,{CURSOR}:b", '"at both"')
    publish(state, f"{JUST_AFTER}:a,{JUST_AFTER}:b", '"after both"')
    parts = json.loads(state.listen(Recorder(a=CURSOR, b=JUST_AFTER)))
    assert [(p["data"], p["ids"]) for p in parts] == [("after both", {"a": JUST_AFTER})]


def test_a_live_publish_at_the_listeners_cursor_does_not_wake_it(state):
    listener = Recorder(a=CURSOR)
    state.listen(listener)
    publish(state, f"{CURSOR}:a", '"at"')
    assert listener.bodies == []
    publish(state, f"{JUST_AFTER}:a", '"after"')
    assert listener.parts() == [{"ids": {"a": JUST_AFTER}, "data": "after"}]


def test_a_limited_live_publish_at_the_listeners_cursor_does_not_wake_it(state):
    friend = Recorder(a=CURSOR, f=None)
    state.listen(friend)
    publish(state, f"{CURSOR}:a", '"at"', limiters={"f"})
    assert friend.bodies == []
    publish(state, f"{JUST_AFTER}:a", '"after"', limiters={"f"})
    assert friend.parts() == [{"ids": {"a": JUST_AFTER}, "data": "after"}]


def test_a_live_publish_to_several_channels_wakes_only_past_the_cursor(state):
    # One publish at one cursor to a and b: the listener is at that cursor on
    # a and just before it on b, so it hears the message on b alone.
    before = "1732486800.12345678901233"
    listener = Recorder(a=CURSOR, b=before)
    state.listen(listener)
    publish(state, f"{CURSOR}:a,{CURSOR}:b", '"x"')
    assert listener.parts() == [{"ids": {"b": CURSOR}, "data": "x"}]
    at_both = Recorder(a=CURSOR, b=CURSOR)
    state.listen(at_both)
    publish(state, f"{CURSOR}:a,{CURSOR}:b", '"again"')
    assert at_both.bodies == []


# -- limiters on a publish to several channels --------------------------------

def test_a_limited_publish_to_several_channels_wakes_only_listeners_of_a_limiter(state):
    plain = Recorder(a=None, b=None)
    friend = Recorder(a=None, b=None, f=None)
    friend_on_b = Recorder(b=None, f=None)
    other_limiter = Recorder(a=None, g=None)
    for listener in (plain, friend, friend_on_b, other_limiter):
        state.listen(listener)
    placed = dict(publish(state, "a,b,c", '"secret"', limiters={"f", "h"}))
    assert friend.parts() == [{"ids": {"a": placed["a"], "b": placed["b"]}, "data": "secret"}]
    assert friend_on_b.parts() == [{"ids": {"b": placed["b"]}, "data": "secret"}]
    assert plain.bodies == [] and other_limiter.bodies == []
    # Those not woken still wait, and get the next message they may see.
    assert state.listener_count() == 2
    publish(state, "a,b", '"public"')
    assert [p["data"] for p in plain.parts()] == ["public"]
    assert [p["data"] for p in other_limiter.parts()] == ["public"]


def test_a_limited_publish_to_several_channels_is_replayed_only_to_listeners_of_a_limiter(state):
    placed = dict(publish(state, "a,b,c", '"secret"', limiters={"f"}))
    publish(state, "a,b", '"public"')
    assert [p["data"] for p in json.loads(state.listen(Recorder(a="0", b="0")))] == ["public"]
    parts = json.loads(state.listen(Recorder(a="0", b="0", f="0")))
    assert [(p["data"], p["ids"]) for p in parts][0] == ("secret", {"a": placed["a"], "b": placed["b"]})
    assert [p["data"] for p in parts] == ["secret", "public"]
    only_limited = Recorder(c="0")
    assert state.listen(only_limited) is None


# -- offline countdowns -------------------------------------------------------

def test_the_offline_countdown_runs_from_when_the_last_listener_left(state, clock):
    first, second = Recorder(a=None), Recorder(a=None)
    state.listen(first)
    state.listen(second)
    state.unlisten(first)
    clock.now += 20
    state.unlisten(second)            # the countdown starts here, not 20 s ago
    clock.now += 29.9
    state.expire()
    assert state.online() == [("a", 0)]
    clock.now += 0.1
    state.expire()
    assert state.online() == []


def test_a_listener_woken_by_a_publish_starts_its_channels_countdown(state, clock):
    listener = Recorder(a=None, b=None)
    state.listen(listener)
    start = state.position()
    clock.now += 5
    publish(state, "a")
    assert state.online() == [("a", 0), ("b", 0)]
    clock.now += 29.9
    state.expire()
    assert state.online() == [("a", 0), ("b", 0)]
    clock.now += 0.1
    state.expire()
    assert state.online() == []
    assert sorted((e, c) for e, _, c in state.watch(start)) == [("offline", "a"), ("offline", "b")]


def test_a_cancelled_countdown_starts_afresh_on_the_next_leave(state, clock):
    first = Recorder(a=None)
    state.listen(first)
    state.unlisten(first)
    clock.now += 20
    second = Recorder(a=None)
    state.listen(second)
    clock.now += 5
    state.unlisten(second)
    clock.now += 29.9                  # 54.9 s after the first leave, 29.9 after the second
    state.expire()
    assert state.online() == [("a", 0)]
    clock.now += 0.1
    state.expire()
    assert state.online() == []


def test_an_offline_timeout_of_zero_takes_the_channel_offline_at_the_next_expiry(make_state, clock):
    state = make_state(offline_timeout=0)
    listener = Recorder(a=None)
    state.listen(listener)
    state.unlisten(listener)
    state.expire()
    assert state.online() == []


# -- event log positions and retention ----------------------------------------

def test_watch_is_strictly_after_the_position_given(state):
    state.listen(Recorder(a=None, b=None, c=None))
    assert state.watch(11) == [("online", 12, "b"), ("online", 13, "c")]
    assert state.watch(13) == []


def test_the_event_log_keeps_the_newest_three_chains_of_event_chain_len_plus_one(make_state):
    from realplexor.channels import event_log_len

    state = make_state(event_log_len=event_log_len(3))       # 12 events
    state.listen(Recorder(**{f"c{n:02d}": None for n in range(20)}))   # positions 11 to 30
    assert state.position() == 30
    assert state.watch(0) == [("online", 11 + n, f"c{n:02d}") for n in range(8, 20)]


def test_reconfiguring_the_event_log_keeps_the_newest_events(make_state):
    state = make_state(event_log_len=12)
    state.listen(Recorder(**{f"c{n:02d}": None for n in range(10)}))   # positions 11 to 20
    state.reconfigure(Settings(event_log_len=4))
    assert [p for _, p, _ in state.watch(0)] == [17, 18, 19, 20]
    state.reconfigure(Settings(event_log_len=12))
    state.listen(Recorder(d=None))
    assert [p for _, p, _ in state.watch(0)] == [17, 18, 19, 20, 21]
    assert state.position() == 21


def test_counts_follow_what_the_state_holds_and_has_done(state, clock):
    assert state.counts().publishes == 0 and state.counts().deliveries == 0
    one, two = Recorder(a=None), Recorder(a=None, b=None)
    state.listen(one)
    state.listen(two)
    counts = state.counts()
    assert (counts.listeners, counts.online, counts.channels) == (2, 2, 2)
    publish(state, "a", '"x"')                      # wakes both: one body of 1 channel
    publish(state, "a,b", '"yy"')                   # wakes nobody: queued on 2 channels
    counts = state.counts()
    assert counts.publishes == 2
    assert counts.deliveries == 2
    assert counts.delivered_bytes == 2 * len(one.bodies[0]) and one.bodies == two.bodies
    assert (counts.queued_channels, counts.queued_messages) == (2, 2)
    assert counts.queued_bytes == len('"x"') + len('"yy"')
    answer = state.listen(Recorder(b="0"))          # answered at once from the queue
    counts = state.counts()
    assert counts.deliveries == 3 and counts.delivered_bytes == 2 * len(one.bodies[0]) + len(answer)
    clock.now += 3601
    state.expire()
    counts = state.counts()
    assert (counts.queued_channels, counts.queued_messages, counts.queued_bytes) == (0, 0, 0)


def test_counts_queued_messages_once_however_many_channels_hold_them(make_state):
    state = make_state(max_data_for_id=2)
    for n in range(5):
        publish(state, "a,b,c", f'"{n}"')
    counts = state.counts()
    assert (counts.queued_channels, counts.queued_messages, counts.queued_bytes) == (3, 2, 6)


def test_a_state_in_memory_is_always_ready(state):
    assert state.ready() is None
