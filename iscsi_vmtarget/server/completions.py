"""Completions handed from a backend's threads to the event loop, one wakeup a batch.

librbd calls back from its own thread for every finished request (storage/rbd.py,
``AsyncIO``). ``loop.call_soon_threadsafe`` for each would write to the loop's wakeup
socket and wake it once per request, and the loop would then send each response in
a system call of its own. An :class:`Inbox` collects completions and wakes the loop
only when it held none; the loop runs the whole batch in order, then each distinct
follow-up once (a connection's flush: every response of the batch in one send).
Completions that finish on the loop itself (librbd's C-API path, storage/rbd_aio.py)
are batched the same way, without the wakeup: the drain is just scheduled.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable

Step = Callable[[], None]


class Inbox:
    """Completions posted from any thread, run on one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()  # made on the loop (TargetServer.inbox)
        self._lock = threading.Lock()
        self._items: list[tuple[Step, Step]] = []

    def post(self, complete: Step, then: Step) -> None:
        """Run ``complete()`` on the loop, and ``then()`` after the batch it is part
        of (once per batch however many completions name it). Any thread."""
        with self._lock:
            self._items.append((complete, then))
            if len(self._items) > 1:
                return  # a wakeup is already on its way
        if threading.get_ident() == self._loop_thread:
            self._loop.call_soon(self._drain)
            return
        with contextlib.suppress(RuntimeError):  # the loop is gone: server stopping
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        follow_ups: dict[Step, None] = {}
        for complete, then in items:
            complete()
            follow_ups[then] = None
        for then in follow_ups:
            then()
