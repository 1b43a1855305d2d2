"""The fan-out: the listeners waiting in this process, and delivering to them.

Listeners register by channel (O(1) per channel, whatever else waits
there). When a message reaches some channels, :meth:`FanOut.wake`
finds the listeners it is for, renders each distinct body once and
delivers it. Whether a channel has anyone here is told to the store
through ``on_occupied`` and ``on_vacated``, on the first arrival and
the last departure only.
"""
from __future__ import annotations

from decimal import Decimal
from typing import Callable, Iterable, Protocol

from .protocol import render_wait_body_one
from .store import Message, Placed


class Listener(Protocol):
    """A waiting WAIT request, as the channel state sees it.

    ``cursors`` maps each listened channel id to the cursor it listens
    from; the state fills in None cursors with "now" on registration.
    ``deliver`` is called exactly once, after the listener has been
    removed from all of its channels, with the rendered body; it must not
    block (it wakes a greenlet or writes to a non-blocking socket). A
    listener with a true ``tells_cuts`` attribute (a stream) is told of
    history cuts in answers a shared store reads for it.
    """

    cursors: dict[str, Decimal]

    def deliver(self, body: bytes) -> None: ...


class _Slot:
    """The listeners of one channel, kept small: most channels have one.

    held: the one listener, or {listener: None} for several (O(1) add and
    remove, in arrival order)
    """

    __slots__ = ("held",)

    def __init__(self, listener: Listener):
        self.held: Listener | dict[Listener, None] = listener

    def add(self, listener: Listener) -> None:
        held = self.held
        if type(held) is dict:
            held[listener] = None
        elif held is not listener:
            self.held = {held: None, listener: None}

    def remove(self, listener: Listener) -> bool | None:
        """True when it was the last, False when others remain, None when it was not here."""
        held = self.held
        if held is listener:
            return True
        if type(held) is dict and held.pop(listener, 0) is None:
            return not held
        return None

    def listeners(self) -> Iterable[Listener]:
        held = self.held
        return held if type(held) is dict else (held,)

    def count(self) -> int:
        held = self.held
        return len(held) if type(held) is dict else 1


class FanOut:
    """The listeners of this process, by channel."""

    def __init__(self, on_occupied: Callable[[str], None], on_vacated: Callable[[str], None]):
        self._slots: dict[str, _Slot] = {}
        self._on_occupied = on_occupied
        self._on_vacated = on_vacated
        self.listeners = 0
        # Answers handed to listeners, and their body bytes (for the metrics).
        self.deliveries = 0
        self.delivered_bytes = 0

    def register(self, listener: Listener) -> None:
        """Wait on every channel of ``listener.cursors``."""
        slots = self._slots
        for channel_id in listener.cursors:
            slot = slots.get(channel_id)
            if slot is None:
                slots[channel_id] = _Slot(listener)
                self._on_occupied(channel_id)
            else:
                slot.add(listener)
        self.listeners += 1

    def unregister(self, listener: Listener) -> None:
        """Stop waiting (idempotent, O(1) per channel)."""
        registered = False
        slots = self._slots
        for channel_id in listener.cursors:
            slot = slots.get(channel_id)
            if slot is None:
                continue
            last = slot.remove(listener)
            if last is None:
                continue
            registered = True
            if last:
                del slots[channel_id]
                self._on_vacated(channel_id)
        if registered:
            self.listeners -= 1

    def counted(self, body: bytes) -> None:
        """Count an answer given at once from the queues (no listener was woken)."""
        self.deliveries += 1
        self.delivered_bytes += len(body)

    def channel_count(self) -> int:
        """How many channels have a listener here."""
        return len(self._slots)

    def count(self, channel_id: str) -> int:
        """How many listeners wait on ``channel_id`` here."""
        slot = self._slots.get(channel_id)
        return 0 if slot is None else slot.count()

    def channels(self) -> Iterable[str]:
        """The channels with a listener here."""
        return self._slots.keys()

    def listeners_of(self, channel_id: str) -> list[Listener]:
        """The listeners waiting on ``channel_id`` here."""
        slot = self._slots.get(channel_id)
        return [] if slot is None else list(slot.listeners())

    def wake(self, placed: list[Placed], message: Message) -> None:
        """Deliver ``message`` to the listeners it reaches, each body rendered once."""
        if len(placed) == 1:
            self._wake_one_channel(*placed[0], message)
            return
        # Costs the placed ids plus, per woken listener, its own listened
        # ids: never listeners times placed ids.
        where = {channel_id: (index, cursor, text)
                 for index, (channel_id, cursor, text) in enumerate(placed)}
        # One body per distinct set of reached channels.
        bodies: dict[tuple[int, ...], bytes] = {}
        for channel_id, cursor, _ in placed:
            slot = self._slots.get(channel_id)
            if slot is None:
                continue
            woken = [listener for listener in slot.listeners()
                     if listener.cursors[channel_id] < cursor
                     and message.visible_to(listener.cursors)]
            for listener in woken:
                reached = _reached(where, listener.cursors)
                body = bodies.get(reached)
                if body is None:
                    ids = [(placed[index][0], placed[index][2]) for index in reached]
                    body = bodies[reached] = render_wait_body_one(ids, message.data)
                self.unregister(listener)
                self.deliveries += 1
                self.delivered_bytes += len(body)
                listener.deliver(body)

    def _wake_one_channel(self, channel_id: str, cursor: Decimal, text: str, message: Message) -> None:
        # The common case, kept lean: every woken listener gets the same body.
        slot = self._slots.get(channel_id)
        if slot is None:
            return
        listeners = slot.listeners()
        if message.limiters:
            woken = [listener for listener in listeners
                     if listener.cursors[channel_id] < cursor and message.visible_to(listener.cursors)]
        else:
            woken = [listener for listener in listeners if listener.cursors[channel_id] < cursor]
        if not woken:
            return
        body = render_wait_body_one(((channel_id, text),), message.data)
        self.deliveries += len(woken)
        self.delivered_bytes += len(body) * len(woken)
        unregister = self.unregister
        for listener in woken:
            unregister(listener)
            listener.deliver(body)


def _reached(where: dict[str, tuple[int, Decimal, str]], listened: dict[str, Decimal]) -> tuple[int, ...]:
    """Publish-order indexes of the placed channels a listener hears this message on."""
    reached = []
    for channel_id, listened_from in listened.items():
        placed = where.get(channel_id)
        if placed is not None and listened_from < placed[1]:
            reached.append(placed[0])
    reached.sort()
    return tuple(reached)
