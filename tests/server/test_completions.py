"""The inbox that hands backend completions to the event loop (server/completions.py):
everything posted runs on the loop, in order, and a batch ends with each follow-up
once (one flush of a connection for all its responses)."""

from __future__ import annotations

import asyncio
import threading

from iscsi_vmtarget.server.completions import Inbox


def test_completions_from_threads_run_on_the_loop_in_batches() -> None:
    async def scenario() -> tuple[list[int], list[str], set[int]]:
        loop = asyncio.get_running_loop()
        inbox = Inbox(loop)
        ran: list[int] = []
        flushed: list[str] = []
        threads_seen: set[int] = set()
        all_done = asyncio.Event()

        def complete(n: int) -> None:
            threads_seen.add(threading.get_ident())
            ran.append(n)
            if len(ran) == 40:
                all_done.set()

        def flush() -> None:  # a connection's _pump: equal for all its completions
            flushed.append("a")

        def poster(first: int) -> None:  # a backend's completion thread
            for n in range(first, first + 20):
                inbox.post(lambda n=n: complete(n), flush)

        workers = [threading.Thread(target=poster, args=(k * 20,)) for k in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()  # the loop was not running meanwhile: one batch waits for it
        await asyncio.wait_for(all_done.wait(), 5)
        assert threads_seen == {threading.get_ident()}  # on the loop's thread only
        return ran, flushed, threads_seen

    ran, flushed, _ = asyncio.run(scenario())
    assert sorted(ran) == list(range(40))
    for first in (0, 20):  # each thread's completions in the order it posted them
        mine = [n for n in ran if first <= n < first + 20]
        assert mine == sorted(mine)
    assert flushed == ["a"]  # 40 completions, one follow-up


def test_completions_posted_on_the_loop_batch_without_a_wakeup() -> None:
    """librbd's C-API completions are reaped on the loop (storage/rbd_aio.py): posted
    there, they still run after the current callback, in one batch, and do not write
    to the loop's wakeup socket (call_soon_threadsafe)."""

    async def scenario() -> tuple[list[int], list[str], int]:
        loop = asyncio.get_running_loop()
        inbox = Inbox(loop)
        ran: list[int] = []
        flushed: list[str] = []
        wakeups = 0
        threadsafe = loop.call_soon_threadsafe

        def counted(*args: object, **kw: object) -> object:
            nonlocal wakeups
            wakeups += 1
            return threadsafe(*args, **kw)  # type: ignore[arg-type]

        def flush() -> None:
            flushed.append("a")

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        for n in range(5):
            inbox.post(lambda n=n: ran.append(n), flush)
        assert ran == []  # not inline: after the callback that posted them
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return ran, flushed, wakeups

    ran, flushed, wakeups = asyncio.run(scenario())
    assert ran == [0, 1, 2, 3, 4] and flushed == ["a"] and wakeups == 0
