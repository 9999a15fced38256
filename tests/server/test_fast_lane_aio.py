"""The fast lane on a backend with asynchronous I/O (RBD's ``AsyncIO``): a plain READ
or WRITE is started from the lane (``scsi/fast_lane.py`` ``fast_start``) and ended
later with one PDU (``FastCommands.fast_completed``), answering exactly as the full
path does, where the server starts a ``MediumTransfer``.

The backend here is a memory one whose requests complete only when the test (the
harness settling, after each batch) or, under a real server, another thread answers
them; its last blocks fail (MEDIUM ERROR), as in tests/server/test_fast_lane.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import uuid
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from iscsi_vmtarget.client import Initiator
from iscsi_vmtarget.client.window import read_window, write_window
from iscsi_vmtarget.iscsi import pdu as P
from iscsi_vmtarget.iscsi.directory import Portal, TargetEntry
from iscsi_vmtarget.iscsi.transfer import Task
from iscsi_vmtarget.scsi import LogicalUnit, Nexus, ScsiTarget, Status, UnitIdentity
from iscsi_vmtarget.scsi.fast_lane import Outcome, fast_start
from iscsi_vmtarget.scsi.medium_transfer import MediumTransfer
from iscsi_vmtarget.scsi.task import ScsiResponse
from iscsi_vmtarget.server.fast_lane import session_lane
from iscsi_vmtarget.server.listener import TargetServer
from iscsi_vmtarget.server.metrics import Metrics
from iscsi_vmtarget.server.registry import Registry, Target
from iscsi_vmtarget.storage import BackendError
from iscsi_vmtarget.testing.core import CoreHarness
from tests.scsi.conftest import DeferredIO
from tests.server.test_fast_lane import (
    BATCHES,
    BLOCK,
    BLOCKS,
    FUA,
    GUARDS,
    KEY,
    FlakyBackend,
    RemoteBackend,
    assert_same,
    cdb_of,
    clear_attention,
    command,
    harness,
    medium,
    only,
    sense_of,
    unit,
)

Answer = Callable[[], None]


class LaterBackend(DeferredIO, FlakyBackend):
    """A FlakyBackend with asynchronous I/O, remote as RBD: ``start_read`` and
    ``start_write`` only queue the access; :meth:`release` does the queued ones, in the
    order they were started, each calling its ``done``."""

    remote_io = True

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.pending: list[Answer] = []

    def queue(self, answer: Answer) -> None:
        self.pending.append(answer)

    def release(self) -> None:
        pending, self.pending = self.pending, []
        for answer in pending:
            answer()


class StartedHarness(CoreHarness):
    """The server's part as :class:`~iscsi_vmtarget.server.listener.ConnectionHandler`
    plays it for such a backend: the full path starts a MediumTransfer (a range held
    by another command: waited for, the backend's answers coming first), and the
    lane's host (``LaneHost``) collects completions as the server's Inbox does; they
    run when the harness settles, after each :meth:`feed`."""

    backend: LaterBackend

    def __post_init__(self) -> None:
        super().__post_init__()
        self.running = 0
        self.steps: list[Answer] = []

    def post_completion(self, complete: Answer) -> None:
        self.steps.append(complete)

    def feed(self, data: bytes) -> list[P.Pdu]:
        start = len(self.conn.sent)
        super().feed(data)
        self.settle()
        return self.conn.sent[start:]

    def answer_all(self) -> None:
        """The backend answers everything started; the completions run on "the loop"."""
        while self.backend.pending or self.steps:
            self.backend.release()
            steps, self.steps = self.steps, []
            for step in steps:
                step()

    def settle(self) -> None:
        while True:
            self.answer_all()
            self._pump()
            if not self.backend.pending and not self.steps:
                return

    def _execute(self, task: Task) -> None:
        assert self.nexus is not None
        data = memoryview(task.buffer) if task.buffer is not None else None
        if self.scsi.may_block(task.cdb, task.lun):
            # the server runs it in a worker thread, which waits for a started command
            # holding its range while the loop goes on: here the backend answers first
            self.answer_all()
            super()._execute(task)
            return
        response = self.scsi.submit(self.nexus, task.lun, task.cdb, data)
        if not isinstance(response, MediumTransfer):
            assert isinstance(response, ScsiResponse)
            self.conn.command_completed(task, response)
            return
        transfer = response

        def complete() -> None:
            self.conn.command_completed(task, transfer.response())

        if not transfer.start(lambda: self.post_completion(complete)):
            self.answer_all()  # what holds the range ends first (listener: a thread waits)
            transfer.run()
            complete()


def started(seed: int = 18, **options: object) -> StartedHarness:
    core = harness(True, seed, LaterBackend(BLOCKS * BLOCK), kind=StartedHarness, **options)
    assert isinstance(core, StartedHarness)
    return core


def arrive(core: StartedHarness, *pdus: P.Pdu) -> list[P.Pdu]:
    """Feed PDUs without letting the backend answer: what the target sent at once."""
    start = len(core.conn.sent)
    core.conn.receive_data(core.wire(*pdus))
    core._pump()
    return core.conn.sent[start:]


# -- differential: lane against full path -----------------------------------------------


def _spec(write: bool, lba: int, byte1: int = 0) -> dict[str, object]:
    return {
        "cdb": cdb_of(10, write, lba, 2, byte1), "write": write, "edtl": 2 * BLOCK,
        "attr": 1, "immediate": False, "split": "all", "bidi": False,
    }  # fmt: skip


#: a FUA WRITE (run in a worker thread) on the range of a started WRITE: it waits
#: for the backend's answer (in the harness: inline, the backend answering first)
_FUA_BEHIND_STARTED = [[_spec(True, 0), _spec(True, 1, FUA)]]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=BATCHES, seed=st.integers(0, 2**16))
@example(batches=_FUA_BEHIND_STARTED, seed=0)
def test_started_lane_answers_every_command_as_the_full_path(
    batches: list[list[dict[str, object]]], seed: int
) -> None:
    lane = started(seed)
    full = harness(False, seed, LaterBackend(BLOCKS * BLOCK), kind=StartedHarness)
    assert_same(lane, full, batches, seed)
    assert lane.running == 0 and not any(t.dispatched for t in lane.conn.tasks.values())


def test_plain_reads_and_writes_are_started_and_end_later() -> None:
    core = started()
    clear_attention(core)
    core.scsi.execute = core.scsi.submit = None  # type: ignore[assignment,method-assign]
    data = bytes(range(256)) * 4
    write = command(core, 2, cdb_of(16, True, 4, 2), 2 * BLOCK, write=True, data=data)
    assert arrive(core, write) == []  # nothing yet: the backend has not answered
    task = core.conn.tasks[2]
    assert task.dispatched and task.write and core.conn.expcmdsn == write.cmdsn + 1
    assert core.buffered_task_bytes() == 2 * BLOCK and core.running == 1
    assert medium(core.backend)[4 * BLOCK : 6 * BLOCK] != data
    core.settle()
    assert only(core.conn.sent[-1:]).status == Status.GOOD  # type: ignore[attr-defined]
    assert not core.conn.tasks and core.running == 0 and core.buffered_task_bytes() == 0
    for length in (6, 10, 12, 16):
        read = command(core, 3 + length, cdb_of(length, False, 4, 2), 2 * BLOCK, read=True)
        back = only(core.feed(core.wire(read)))
        assert isinstance(back, P.DataIn) and back.status_present and bytes(back.data) == data


def test_backend_failure_is_medium_error_sense() -> None:
    core = started()
    clear_attention(core)
    core.scsi.execute = core.scsi.submit = None  # type: ignore[assignment,method-assign]
    bad = FlakyBackend.bad
    read = command(core, 4, cdb_of(10, False, bad, 1), BLOCK, read=True)
    assert sense_of(only(core.feed(core.wire(read)))) == (0x3, 0x11, 0x00)  # UNRECOVERED READ
    write = command(core, 5, cdb_of(10, True, bad, 1), BLOCK, write=True, data=bytes(BLOCK))
    rsp = only(core.feed(core.wire(write)))
    assert sense_of(rsp) == (0x3, 0x0C, 0x00) and not rsp.residual  # type: ignore[attr-defined]
    assert not core.scsi.luns[0].ranges._held  # every range given back


# -- a started command is a task like the full path's -------------------------------------


def read_at(core: StartedHarness, itt: int, lba: int = 0) -> P.ScsiCommand:
    return command(core, itt, cdb_of(10, False, lba, 1), BLOCK, read=True)


def tmf(core: StartedHarness, itt: int, function: int, ref: P.ScsiCommand | None = None) -> P.Pdu:
    return P.TaskMgmtRequest(
        itt=itt, function=function, immediate=True, cmdsn=core.cmdsn,
        referenced_task_tag=ref.itt if ref else P.RESERVED_TAG, refcmdsn=ref.cmdsn if ref else 0,
    )  # fmt: skip


@pytest.mark.parametrize("function", [1, 2, 5])  # ABORT TASK, ABORT TASK SET, LU RESET
def test_aborted_started_command_gets_no_response(function: int) -> None:
    core = started()
    clear_attention(core)
    read = read_at(core, 6)
    assert arrive(core, read) == [] and core.conn.tasks[6].dispatched
    out = core.feed(core.wire(tmf(core, 7, function, read)))
    assert [type(pdu) for pdu in out] == [P.TaskMgmtResponse]  # and nothing for ITT 6
    assert out[0].response == P.TmfResponse.COMPLETE  # type: ignore[attr-defined]
    assert not core.conn.tasks and core.running == 0
    clear_attention(core)  # after a reset: BUS DEVICE RESET OCCURRED
    again = only(core.feed(core.wire(read_at(core, 6))))  # the tag is free again
    assert isinstance(again, P.DataIn) and again.itt == 6


def test_tag_of_a_started_command_is_in_use() -> None:
    core = started()
    clear_attention(core)
    assert arrive(core, read_at(core, 8)) == []
    reject = only(arrive(core, read_at(core, 8, lba=1)))
    assert isinstance(reject, P.Reject) and reject.reason == P.RejectReason.TASK_IN_PROGRESS
    core.settle()
    assert [pdu.itt for pdu in core.conn.sent[-1:]] == [8]


def test_started_commands_count_in_the_task_set() -> None:
    core = started()
    core.conn.settings = dataclasses.replace(core.conn.settings, max_tasks=1)
    clear_attention(core)
    assert arrive(core, read_at(core, 9)) == []
    full = only(arrive(core, read_at(core, 10, lba=2)))
    assert isinstance(full, P.ScsiResponsePdu) and full.status == Status.TASK_SET_FULL
    core.settle()
    assert isinstance(core.conn.sent[-1], P.DataIn) and core.conn.sent[-1].itt == 9


def test_logout_waits_for_a_started_command() -> None:
    core = started()
    clear_attention(core)
    assert arrive(core, read_at(core, 11)) == []
    logout = P.LogoutRequest(itt=12, reason=0, cmdsn=core.cmdsn, immediate=True)
    assert arrive(core, logout) == [] and core.closed is None
    core.settle()
    assert [type(pdu) for pdu in core.conn.sent[-2:]] == [P.DataIn, P.LogoutResponse]
    assert core.closed == "logout"


# -- the guards, on the SCSI half (False: nothing done, take the full path) ----------------


def start(luns: dict[int, LogicalUnit], write: bool, byte1: int = 0) -> list[Outcome] | None:
    """fast_start a one-block READ or WRITE at LBA 1: its outcome once answered, or
    None when the lane refused it."""
    outcomes: list[Outcome] = []
    cdb = cdb_of(10, write, 1, 1, byte1)
    data = b"\xaa" * BLOCK if write else b""
    if not fast_start(luns, KEY, 0, cdb, data, BLOCK, outcomes.append):
        return None
    luns[0].backend.release()  # type: ignore[attr-defined]
    return outcomes


@pytest.mark.parametrize("name", [*GUARDS, "reservation lock held"])
def test_each_guard_sends_a_started_command_to_the_full_path(name: str) -> None:
    make, reads_too = GUARDS.get(name, (lambda lu: lu.pr_lock.acquire(), True))
    luns, lu = unit(LaterBackend)
    assert start(luns, False) == [bytes(BLOCK)] and start(luns, True) == [b""]  # it serves...
    make(lu)
    before = medium(lu.backend)  # type: ignore[arg-type]
    assert start(luns, True) is None  # ... but not now
    assert (start(luns, False) is None) is reads_too
    assert medium(lu.backend) == before  # type: ignore[arg-type]


def test_fua_remote_without_aio_and_refused_start_take_the_full_path() -> None:
    luns, lu = unit(LaterBackend)
    assert start(luns, True, byte1=0x08) is None  # FUA: flushed by the full path
    remote, _ = unit(RemoteBackend)
    assert start(remote, False) is None and start(remote, True) is None
    lane = session_lane(ScsiTarget(remote), Nexus("i", "i,i,0x1", "t", "t,t,0x0001"),
                        Metrics(), "t", {0: 0}, 1, set(), StartedHarness())  # fmt: skip
    assert lane(1, bytes(8), cdb_of(10, False, 0, 1), b"", BLOCK) is None

    def refuse(*args: object) -> None:
        raise BackendError("not connected")

    lu.backend.start_read = refuse  # type: ignore[attr-defined]
    assert start(luns, False) is None and not lu.ranges._held  # the range given back


# -- under the real server: completions from the backend's own thread ---------------------


class ThreadedBackend(LaterBackend):
    """Answers each request at once from a thread of its own (as librbd's finisher),
    with no failing blocks."""

    bad = 1 << 40

    def queue(self, answer: Answer) -> None:
        threading.Thread(target=answer).start()


NAME = "iqn.2026-12.org.iscsi-vmtarget:lane-aio"


@pytest.fixture
def server() -> Iterator[tuple[TargetServer, int]]:
    lu = LogicalUnit(ThreadedBackend(1 << 20), UnitIdentity.from_uuid(uuid.UUID(int=16), "a"))
    registry = Registry(portals=[Portal("127.0.0.1", 0)])
    registry.add_target(Target(TargetEntry(name=NAME), ScsiTarget({0: lu})))
    srv = TargetServer(registry, nop_interval=0)
    loop = asyncio.new_event_loop()
    port = loop.run_until_complete(srv.start())[0].port
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield srv, port
    asyncio.run_coroutine_threadsafe(srv.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_server_ends_started_commands_answered_from_another_thread(
    server: tuple[TargetServer, int],
) -> None:
    srv, port = server
    ini = Initiator(port=port, target_name=NAME)
    ini.login()
    ini.command(bytes(6))  # the power-on unit attention
    blocks = [bytes([n]) * 8 * BLOCK for n in range(16)]  # 16 in flight, a guest's queue
    written = write_window(ini, 0, BLOCK, ((8 * n, b) for n, b in enumerate(blocks)), 16)
    assert written == 16 * 8 * BLOCK
    assert list(read_window(ini, 0, BLOCK, ((8 * n, 8) for n in range(16)), 16)) == blocks
    counters = srv.metrics.luns[(NAME, 0)]
    assert counters.fast_lane_commands == 32 and counters.reads == 16 and counters.writes == 16
    assert counters.read_bytes == counters.write_bytes == 16 * 8 * BLOCK
    assert [handler.running for handler in srv.handlers] == [0]
    ini.logout()
