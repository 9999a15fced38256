"""The fast lane for plain READ/WRITE (issue 18: iscsi/, scsi/ and server/fast_lane.py)
answers exactly as the full path does, and sends every unusual command there.

The differential test drives two real connections (``testing.core``) over identical
LUs with the same PDU bytes, one with the session's lane and one without, and compares
every PDU sent back (status, sense, data, residuals, StatSN, ExpCmdSN) and the media.
"""

from __future__ import annotations

import dataclasses
import random
import struct
import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iscsi_vmtarget.iscsi import pdu as P
from iscsi_vmtarget.scsi import LogicalUnit, Nexus, ScsiTarget, Status, UnitIdentity
from iscsi_vmtarget.scsi.alua import AccessState, PortGroups
from iscsi_vmtarget.scsi.fast_lane import fast_io
from iscsi_vmtarget.scsi.logical_unit import SanitizeProgress
from iscsi_vmtarget.scsi.sense import parse_sense
from iscsi_vmtarget.server.fast_lane import LaneHost, session_lane
from iscsi_vmtarget.server.metrics import Metrics
from iscsi_vmtarget.storage import BackendError, MemoryBackend, nowait
from iscsi_vmtarget.storage.backend import BlockBackend
from iscsi_vmtarget.storage.file import FileBackend
from iscsi_vmtarget.testing.core import TARGET_NAME, CoreHarness

BLOCK = 512
BLOCKS = 64
OPCODES = {6: (0x08, 0x0A), 10: (0x28, 0x2A), 12: (0xA8, 0xAA), 16: (0x88, 0x8A)}
READ10, WRITE10 = 0x28, 0x2A
FUA = 0x08


def cdb_of(
    length: int, write: bool, lba: int, blocks: int, byte1: int = 0, group: int = 0,
    control: int = 0,
) -> bytes:  # fmt: skip
    """A READ or WRITE CDB (SBC-3 §5.8-5.11, §5.32-5.35), padded to 16 bytes as iSCSI
    carries it. ``byte1`` (flags) has no place in a 6-byte CDB."""
    op = OPCODES[length][write]
    if length == 6:
        cdb = struct.pack(">BIB", op, ((lba & 0x1FFFFF) << 8) | (blocks & 0xFF), control)
    elif length == 10:
        cdb = struct.pack(">BBIBHB", op, byte1, lba & 0xFFFFFFFF, group, blocks & 0xFFFF, control)
    elif length == 12:
        cdb = struct.pack(">BBIIBB", op, byte1, lba & 0xFFFFFFFF, blocks, group, control)
    else:
        cdb = struct.pack(">BBQIBB", op, byte1, lba, blocks, group, control)
    return cdb.ljust(16, b"\x00")


def medium(backend: BlockBackend) -> bytes:
    """The whole medium (a FlakyBackend's past its failing blocks too)."""
    buf = bytearray(backend.size)
    if isinstance(backend, FlakyBackend):
        MemoryBackend.read_into(backend, 0, memoryview(buf))
    else:
        backend.read_into(0, memoryview(buf))
    return bytes(buf)


class FlakyBackend(MemoryBackend):
    """Fails the reads and writes of the blocks from ``bad`` on (a MEDIUM ERROR)."""

    bad = BLOCKS - 2

    def read_into(self, offset: int, buf: memoryview) -> None:
        if offset + len(buf) > self.bad * BLOCK:
            raise BackendError("injected read failure")
        super().read_into(offset, buf)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if offset + len(memoryview(data)) > self.bad * BLOCK:
            raise BackendError("injected write failure")
        super().write(offset, data)


def harness(
    lane: bool, seed: int = 18, backend: BlockBackend | None = None,
    kind: type[CoreHarness] = CoreHarness, **unit: object,
) -> CoreHarness:  # fmt: skip
    """A logged-in connection over one LU of BLOCKS blocks (``backend``, else a
    FlakyBackend) filled from ``seed``; with ``lane`` the session's fast lane is on,
    as the server sets it at login (its host the harness, when ``kind`` is one)."""
    core = kind(lun_bytes=BLOCKS * BLOCK)
    core.backend = backend or FlakyBackend(BLOCKS * BLOCK)  # type: ignore[assignment]
    content = random.Random(seed).randbytes(BLOCKS * BLOCK)
    if isinstance(core.backend, FlakyBackend):
        MemoryBackend.write(core.backend, 0, content)
    else:
        core.backend.write(0, content)
    lu = LogicalUnit(core.backend, UnitIdentity.from_uuid(uuid.UUID(int=9), "fuzz"), **unit)  # type: ignore[arg-type]
    core.scsi = ScsiTarget({0: lu})
    core.login()
    if lane:
        assert core.nexus is not None
        host = core if isinstance(core, LaneHost) else None
        core.conn.fast_lane = session_lane(
            core.scsi, core.nexus, Metrics(), "t", {0: 0}, 1, set(), host
        )
    return core


def command(
    core: CoreHarness, itt: int, cdb: bytes, edtl: int, *, read: bool = False,
    write: bool = False, data: bytes = b"", attr: int = 1, immediate: bool = False,
) -> P.ScsiCommand:  # fmt: skip
    pdu = P.ScsiCommand(
        itt=itt, cmdsn=core.cmdsn, read=read, write=write, expected_length=edtl, cdb=cdb,
        data=data, attr=attr, immediate=immediate,
    )  # fmt: skip
    if not immediate:
        core.cmdsn += 1
    return pdu


def only(sent: list[P.Pdu]) -> P.Pdu:
    assert len(sent) == 1, sent
    return sent[0]


def sense_of(pdu: P.Pdu) -> tuple[int, int, int]:
    assert isinstance(pdu, P.ScsiResponsePdu) and pdu.status == Status.CHECK_CONDITION, pdu
    return parse_sense(bytes(pdu.data[2:]))


# -- differential: lane against full path -----------------------------------------------


#: what may make a command unusual; half the commands have none of it (the lane's)
ODD = ("range", "length", "edtl", "flags", "group", "control", "attr", "immediate", "split", "bidi")


@st.composite
def commands(draw: st.DrawFn) -> dict[str, object]:
    odd = draw(st.one_of(st.just(frozenset()), st.frozensets(st.sampled_from(ODD), max_size=3)))

    def pick(aspect: str, plain: st.SearchStrategy, unusual: st.SearchStrategy) -> object:
        return draw(unusual if aspect in odd else plain)

    length = draw(st.sampled_from((6, 10, 10, 16, 12)))
    write = draw(st.booleans())
    blocks = pick("length", st.integers(1, 8), st.sampled_from((0, 16, 17, 256)))
    lba = pick(
        "range", st.integers(0, BLOCKS - 8),
        st.one_of(st.integers(BLOCKS - 5, BLOCKS + 2), st.just(2**32 - 1)),
    )  # fmt: skip
    byte1 = pick(
        "flags",
        st.sampled_from((0, 0x10)),
        st.sampled_from((FUA, 0x18, 0x20, 0x40, 0xE0, 0x04, 0x02, 0x01)),
    )
    described = (blocks or (256 if length == 6 else 0)) * BLOCK  # type: ignore[operator]
    delta = pick("edtl", st.just(0), st.sampled_from((-BLOCK, BLOCK, -described, 1)))
    return {
        "cdb": cdb_of(
            length,
            write,
            lba,
            blocks,
            byte1,  # type: ignore[arg-type]
            pick("group", st.just(0), st.sampled_from((0x01, 0x1F, 0x20))),  # type: ignore[arg-type]
            pick("control", st.just(0), st.sampled_from((0x04, 0x40, 0x01))),  # type: ignore[arg-type]
        ),
        "write": write,
        "edtl": max(0, described + delta),  # type: ignore[operator]
        "attr": pick("attr", st.just(1), st.sampled_from((0, 2, 3, 4))),
        "immediate": pick("immediate", st.just(False), st.just(True)),
        "split": pick("split", st.just("all"), st.sampled_from(("half", "none"))),
        "bidi": pick("bidi", st.just(False), st.just(True)),
    }


def pdus_for(
    core: CoreHarness, itt: int, spec: dict[str, object], rng: random.Random
) -> list[P.Pdu]:
    """The PDUs of one command: a write's data as immediate data, or half of it then a
    Data-Out (InitialR2T=No), or none of it (R2Ts, never answered)."""
    edtl = int(spec["edtl"])  # type: ignore[call-overload]
    write = bool(spec["write"])
    payload = rng.randbytes(edtl) if write and edtl <= 8192 else b""
    split = spec["split"] if payload else "none"
    first = {"all": len(payload), "half": len(payload) // 2, "none": 0}[split]  # type: ignore[index]
    pdus: list[P.Pdu] = [
        command(
            core, itt, spec["cdb"], edtl, read=not write or bool(spec["bidi"]), write=write,  # type: ignore[arg-type]
            data=payload[:first], attr=spec["attr"], immediate=spec["immediate"],  # type: ignore[arg-type]
        )
    ]  # fmt: skip
    if first < len(payload):
        pdus.append(P.DataOut(itt=itt, final=True, buffer_offset=first, data=payload[first:]))
    return pdus


def comparable(pdu: P.Pdu) -> str:
    """A PDU as the differential test compares it: all but ExpCmdSN and MaxCmdSN, the
    window as it stands when the PDU is sent (RFC 7143 §4.2.2.1), and an R2T's StatSN,
    the next one as it stands (§11.8.3). The lane answers a command as it arrives, the
    full path once the batch is read (later commands of it already counted in, an R2T
    for one of them already sent); the counters are compared after each run instead."""
    if hasattr(pdu, "expcmdsn"):
        pdu = dataclasses.replace(pdu, expcmdsn=0, maxcmdsn=0)  # type: ignore[type-var]
    if isinstance(pdu, P.R2T):
        pdu = dataclasses.replace(pdu, statsn=0)
    return repr(pdu)


BATCHES = st.lists(st.lists(commands(), min_size=1, max_size=4), min_size=1, max_size=6)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=BATCHES, seed=st.integers(0, 2**16))
def test_lane_answers_every_command_as_the_full_path(
    batches: list[list[dict[str, object]]], seed: int
) -> None:
    assert_same(harness(True, seed), harness(False, seed), batches, seed)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=BATCHES, seed=st.integers(0, 2**16))
def test_lane_answers_as_the_full_path_on_a_file(
    batches: list[list[dict[str, object]]], seed: int
) -> None:
    """The same over file LUs: reads in nowait mode (RWF_NOWAIT), pwritev writes."""
    with tempfile.TemporaryDirectory() as folder:
        backends = []
        for name in ("lane", "full"):
            path = Path(folder) / name
            path.write_bytes(bytes(BLOCKS * BLOCK))
            backends.append(FileBackend(str(path)))
        try:
            lane, full = harness(True, seed, backends[0]), harness(False, seed, backends[1])
            assert_same(lane, full, batches, seed)
        finally:
            for backend in backends:
                backend.close()


def assert_same(
    lane: CoreHarness, full: CoreHarness, batches: list[list[dict[str, object]]], seed: int
) -> None:
    """Feed both connections the same PDUs, batch by batch, twice (the second time
    without the power-on unit attention): the same PDUs back, the same media."""
    for run in range(2):
        itt = 100 * (run + 1)
        rng_lane, rng_full = random.Random(seed), random.Random(seed)
        for batch in batches:
            sent = []
            for core, rng in ((lane, rng_lane), (full, rng_full)):
                pdus = [
                    p for i, spec in enumerate(batch) for p in pdus_for(core, itt + i, spec, rng)
                ]
                sent.append(sorted(map(comparable, core.feed(core.wire(*pdus)))))
            itt += len(batch)
            assert sent[0] == sent[1]
        assert (lane.conn.statsn, lane.conn.expcmdsn) == (full.conn.statsn, full.conn.expcmdsn)
        assert medium(lane.backend) == medium(full.backend)
        assert lane.closed == full.closed


def test_plain_reads_and_writes_take_the_lane() -> None:
    """The differential test means something only if the lane serves: here it must,
    for each CDB size (the full path would never be asked)."""
    core = harness(True)
    core.feed(core.wire(command(core, 1, bytes(16), 0)))  # TUR: the unit attention
    core.scsi.execute = None  # type: ignore[assignment,method-assign]  # the full path: gone
    for itt, length in enumerate((6, 10, 12, 16), start=2):
        data = bytes([itt]) * 2 * BLOCK
        out = core.feed(core.wire(command(
            core, itt, cdb_of(length, True, 8 * itt, 2), 2 * BLOCK, write=True, data=data
        )))  # fmt: skip
        assert only(out).status == Status.GOOD  # type: ignore[attr-defined]
        back = only(core.feed(core.wire(command(
            core, itt + 10, cdb_of(length, False, 8 * itt, 2, byte1=FUA if length > 6 else 0),
            2 * BLOCK, read=True,
        ))))  # fmt: skip
        assert isinstance(back, P.DataIn) and back.status_present and bytes(back.data) == data


# -- each guard sends the command to the full path ----------------------------------------


def first_read(core: CoreHarness) -> P.Pdu:
    return only(core.feed(core.wire(command(core, 7, cdb_of(10, False, 0, 1), BLOCK, read=True))))


def first_write(core: CoreHarness) -> P.Pdu:
    pdu = command(core, 8, cdb_of(10, True, 0, 1), BLOCK, write=True, data=bytes(BLOCK))
    return only(core.feed(core.wire(pdu)))


def clear_attention(core: CoreHarness) -> None:
    core.feed(core.wire(command(core, 1, bytes(16), 0)))


def test_pending_unit_attention_is_reported_not_bypassed() -> None:
    core = harness(True)  # POWER ON OCCURRED is queued for the new nexus (SAM-5 §5.14)
    assert sense_of(first_read(core)) == (0x6, 0x29, 0x00)
    assert isinstance(first_read(core), P.DataIn)


def test_reservation_of_another_nexus_conflicts() -> None:
    core = harness(True)
    clear_attention(core)
    other = Nexus("iqn.2026-12.test:other", "iqn.2026-12.test:other,i,0x1", TARGET_NAME,
                  f"{TARGET_NAME},t,0x0001")  # fmt: skip
    core.scsi.nexus_added(other)
    core.scsi.execute(other, 0, bytes(6), None)  # its POWER ON unit attention
    key = struct.pack(">QQIBBH", 0, 7, 0, 0, 0, 0)
    for action, kind, params in ((0, 0, key), (1, 1, struct.pack(">QQIBBH", 7, 0, 0, 0, 0, 0))):
        cdb = struct.pack(">BBBHIB", 0x5F, action, kind, 0, len(params), 0)  # PR OUT
        assert core.scsi.execute(other, 0, cdb, params).status == Status.GOOD
    assert isinstance(first_read(core), P.DataIn)  # WRITE EXCLUSIVE lets others read
    rsp = first_write(core)
    assert isinstance(rsp, P.ScsiResponsePdu) and rsp.status == Status.RESERVATION_CONFLICT


def test_alua_standby_refuses_reads() -> None:
    core = harness(True)
    clear_attention(core)
    core.scsi.luns[0].alua = PortGroups(1, AccessState.STANDBY)
    assert sense_of(first_read(core))[:2] == (0x2, 0x04)  # NOT READY, TARGET PORT IN STANDBY


def test_write_protected_unit_refuses_writes() -> None:
    core = harness(True, read_only=True)
    clear_attention(core)
    before = medium(core.backend)
    assert sense_of(first_write(core)) == (0x7, 0x27, 0x00)  # DATA PROTECT, WRITE PROTECTED
    assert medium(core.backend) == before
    assert isinstance(first_read(core), P.DataIn)


def test_sanitize_in_progress_is_not_ready() -> None:
    core = harness(True)
    clear_attention(core)
    core.scsi.luns[0].sanitizing = SanitizeProgress(total=10)
    assert sense_of(first_read(core)) == (0x2, 0x04, 0x1B)


def test_grown_backend_reports_capacity_change_first() -> None:
    core = harness(True)
    clear_attention(core)
    core.backend.resize(core.backend.size + 64 * BLOCK)
    assert sense_of(first_read(core)) == (0x6, 0x2A, 0x09)  # CAPACITY DATA HAS CHANGED


def test_medium_error_gets_sense() -> None:
    core = harness(True)
    clear_attention(core)
    pdu = command(core, 9, cdb_of(10, False, FlakyBackend.bad, 1), BLOCK, read=True)
    assert sense_of(only(core.feed(core.wire(pdu)))) == (0x3, 0x11, 0x00)


# -- the guards one by one, on the SCSI half (None: nothing done, take the full path) -----


KEY = ("iqn.2026-12.test:i,i,0x1", "iqn.2026-12.test:t,t,0x0001")


def unit(
    kind: type[MemoryBackend] = MemoryBackend, **options: object
) -> tuple[dict[int, LogicalUnit], LogicalUnit]:
    lu = LogicalUnit(kind(BLOCKS * BLOCK), UnitIdentity.from_uuid(uuid.UUID(int=1), "u"),
                     **options)  # type: ignore[arg-type]  # fmt: skip
    return {0: lu}, lu


def lane_write(luns: dict[int, LogicalUnit], byte1: int = 0) -> bytes | bytearray | None:
    return fast_io(luns, KEY, 0, cdb_of(10, True, 1, 1, byte1), b"\xaa" * BLOCK, BLOCK)


def lane_read(luns: dict[int, LogicalUnit]) -> bytes | bytearray | None:
    return fast_io(luns, KEY, 0, cdb_of(10, False, 1, 1), b"", BLOCK)


def _attention(lu: LogicalUnit) -> None:
    lu.add_nexus(KEY)


def _registration(lu: LogicalUnit) -> None:
    nexus = Nexus("iqn.2026-12.test:x", "iqn.2026-12.test:x,i,0x1", "t", "t,t,0x0001")
    params = struct.pack(">QQIBBH", 0, 5, 0, 0, 0, 0)
    cdb = struct.pack(">BBBHIB", 0x5F, 0, 0, 0, len(params), 0)
    assert ScsiTarget({0: lu}).execute(nexus, 0, cdb, params).status == Status.GOOD


def _spc2_reserve(lu: LogicalUnit) -> None:
    lu.reservations.spc2_holder = ("iqn.2026-12.test:x,i,0x1", "t,t,0x0001")


def _alua(lu: LogicalUnit) -> None:
    lu.alua = PortGroups(1, AccessState.ACTIVE_OPTIMIZED)  # served: an RBD gateway's owner
    lu.alua.set_state(AccessState.TRANSITIONING)  # refused (NOT READY) by the full path


def _software_write_protect(lu: LogicalUnit) -> None:
    control = bytearray(lu.mode.page(0x0A))
    control[4] |= 0x08  # SWP
    lu.mode.apply({0x0A: bytes(control)})


def _write_cache_off(lu: LogicalUnit) -> None:
    caching = bytearray(lu.mode.page(0x08))
    caching[2] &= ~0x04  # WCE
    lu.mode.apply({0x08: bytes(caching)})


def _sanitizing(lu: LogicalUnit) -> None:
    lu.sanitizing = SanitizeProgress(total=1)


def _capacity_changed(lu: LogicalUnit) -> None:
    lu.backend.resize(lu.backend.size + BLOCK)  # type: ignore[attr-defined]


def _range_held(lu: LogicalUnit) -> None:
    lu.ranges.try_hold(0, 8)  # COMPARE AND WRITE in a thread, say


GUARDS = {
    "unit attention": (_attention, True),
    "PR registration": (_registration, True),
    "SPC-2 reservation": (_spc2_reserve, True),
    "ALUA not active": (_alua, True),
    "sanitize": (_sanitizing, True),
    "capacity changed": (_capacity_changed, True),
    "range held": (_range_held, True),
    "software write protect": (_software_write_protect, False),
    "write cache off": (_write_cache_off, False),
}


@pytest.mark.parametrize("name", GUARDS)
def test_each_guard_sends_the_command_to_the_full_path(name: str) -> None:
    make, reads_too = GUARDS[name]
    luns, lu = unit()
    assert lane_read(luns) is not None and lane_write(luns) == b""  # the lane serves...
    make(lu)
    before = medium(lu.backend)  # type: ignore[arg-type]
    assert lane_write(luns) is None  # ... but not now
    assert (lane_read(luns) is None) is reads_too
    assert medium(lu.backend) == before  # type: ignore[arg-type]


@pytest.mark.parametrize("state", list(AccessState))
def test_alua_group_state_answers_as_the_full_path(state: AccessState) -> None:
    """An LU with target port groups (an RBD gateway's) is served while its own group
    is active (SPC-4 §5.15.2.2-3), and refused in the other states as the full path
    refuses it (§5.15.2.4)."""
    answers = []
    for lane in (True, False):
        core = harness(lane)
        clear_attention(core)
        core.scsi.luns[0].alua = PortGroups(1, state)
        answers.append([comparable(first_read(core)), comparable(first_write(core))])
    assert answers[0] == answers[1]
    luns, lu = unit()
    lu.alua = PortGroups(1, state, non_owner=AccessState.ACTIVE_NON_OPTIMIZED)
    active = state in (AccessState.ACTIVE_OPTIMIZED, AccessState.ACTIVE_NON_OPTIMIZED)
    assert (lane_read(luns) is not None) is active and (lane_write(luns) == b"") is active


def test_read_only_unit_and_fua_write_take_the_full_path() -> None:
    luns, _ = unit(read_only=True)
    assert lane_write(luns) is None and lane_read(luns) is not None
    luns, _ = unit()
    assert lane_write(luns, FUA) is None  # durable before GOOD: flushed by the full path
    assert lane_write(luns, 0x20) is None  # WRPROTECT: INVALID FIELD IN CDB there
    assert lane_write(luns, 0x10) == b""  # DPO: a hint


def test_unknown_lun_and_other_opcodes_take_the_full_path() -> None:
    luns, _ = unit()
    assert fast_io(luns, KEY, 1, cdb_of(10, False, 0, 1), b"", BLOCK) is None
    assert fast_io(luns, KEY, 0, bytes(16), b"", 0) is None  # TEST UNIT READY


def test_read_the_kernel_would_block_goes_to_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not in the page cache: the lane names the command (its ITT) for the full path
    to run in a worker thread, rather than trying it inline twice."""
    path = tmp_path / "lun"
    path.write_bytes(bytes(BLOCKS * BLOCK))
    backend = FileBackend(str(path))
    lu = LogicalUnit(backend, UnitIdentity.from_uuid(uuid.UUID(int=2), "f"))
    if "read" not in lu.abilities.nowait:
        pytest.skip("this file system has no RWF_NOWAIT reads")
    blocked: set[int] = set()
    lane = session_lane(ScsiTarget({0: lu}), Nexus("i", "i,i,0x1", "t", "t,t,0x0001"),
                        Metrics(), "t", {0: 0}, 1, blocked)  # fmt: skip
    assert lane(7, bytes(8), cdb_of(10, False, 1, 1), b"", BLOCK) == bytes(BLOCK)
    monkeypatch.setattr(nowait, "refused", frozenset({"read"}))
    with pytest.raises(nowait.WouldBlock):
        lane_read({0: lu})
    assert nowait.MODE.flags == 0  # nowait mode ended with the command
    assert lane(8, bytes(8), cdb_of(10, False, 1, 1), b"", BLOCK) is None and blocked == {8}
    backend.close()


def test_lane_counts_commands_as_the_full_path() -> None:
    luns, _ = unit()
    metrics = Metrics()
    nexus = Nexus("i", "i,i,0x1", "t", "t,t,0x0001")
    lane = session_lane(ScsiTarget(luns), nexus, metrics, "t", {0: 3}, 5, set())
    assert lane(1, bytes(8), cdb_of(10, False, 0, 2), b"", 2 * BLOCK) is not None
    assert lane(2, bytes(8), cdb_of(16, True, 0, 1), bytes(BLOCK), BLOCK) == b""
    assert lane(3, bytes(8), cdb_of(16, True, 0, 1, FUA), bytes(BLOCK), BLOCK) is None
    counters = metrics.luns[("t", 3)]
    assert (counters.reads, counters.read_bytes, counters.writes, counters.write_bytes) == (
        1, 2 * BLOCK, 1, BLOCK,
    )  # fmt: skip
    assert counters.errors == 0  # (the FUA write is counted by the full path)


class RemoteBackend(MemoryBackend):
    """As RBD looks to the SCSI layer: every I/O a network round trip."""

    remote_io = True


class StartingBackend(MemoryBackend):
    """A backend with asynchronous I/O (AsyncIO): READ/WRITE are started, not run."""

    def start_read(self, offset: int, length: int, done: object) -> None:
        raise AssertionError("not from the lane")

    def start_write(self, offset: int, data: object, done: object) -> None:
        raise AssertionError("not from the lane")


@pytest.mark.parametrize("backend", [RemoteBackend, StartingBackend])
def test_remote_and_asynchronous_backends_take_the_full_path(backend: type) -> None:
    lu = LogicalUnit(backend(BLOCKS * BLOCK), UnitIdentity.from_uuid(uuid.UUID(int=3), "r"))
    assert lane_read({0: lu}) is None and lane_write({0: lu}) is None
    assert medium(lu.backend) == bytes(BLOCKS * BLOCK)  # type: ignore[arg-type]


def test_short_cdb_long_transfer_and_short_data_take_the_full_path() -> None:
    luns, _ = unit(max_transfer_bytes=2 * BLOCK)
    assert fast_io(luns, KEY, 0, cdb_of(10, False, 0, 1)[:8], b"", BLOCK) is None
    assert fast_io(luns, KEY, 0, cdb_of(10, False, 0, 3), b"", 3 * BLOCK) is None
    assert fast_io(luns, KEY, 0, cdb_of(10, True, 0, 1), bytes(BLOCK - 1), BLOCK) is None
    assert fast_io(luns, KEY, 0, cdb_of(10, False, 0, 2), b"", 2 * BLOCK) is not None


# -- the transport's half: only in-order, whole, plain commands ----------------------------


def test_lun_outside_the_sessions_view_is_not_supported() -> None:
    """Masking: the lane sees the LUs of the session's own view, as the full path."""
    core = harness(True)
    clear_attention(core)
    pdu = command(core, 10, cdb_of(10, False, 0, 1), BLOCK, read=True)
    pdu.lun = bytes([0, 1]) + bytes(6)  # LUN 1: not in the view
    assert sense_of(only(core.feed(core.wire(pdu)))) == (0x5, 0x25, 0x00)


def test_commands_out_of_cmdsn_order_all_complete() -> None:
    """A command arriving before its predecessor waits for it (RFC 7143 §4.2.2.1);
    the lane must neither run it early nor strand it."""
    core = harness(True)
    clear_attention(core)
    first = command(core, 20, cdb_of(10, False, 0, 1), BLOCK, read=True)
    second = command(core, 21, cdb_of(10, False, 1, 1), BLOCK, read=True)
    sent = core.feed(core.wire(second))
    assert sent == [] and core.conn.expcmdsn == first.cmdsn
    sent = core.feed(core.wire(first))
    assert [pdu.itt for pdu in sent] == [20, 21]
    assert core.conn.expcmdsn == second.cmdsn + 1


def test_task_tag_in_use_is_rejected() -> None:
    core = harness(True)
    clear_attention(core)
    waiting = command(core, 30, cdb_of(10, True, 0, 1), BLOCK, write=True)  # data to come
    assert core.feed(core.wire(waiting)) == [] and 30 in core.conn.tasks
    again = only(core.feed(core.wire(command(core, 30, cdb_of(10, False, 0, 1), BLOCK, read=True))))
    assert isinstance(again, P.Reject) and again.reason == P.RejectReason.TASK_IN_PROGRESS


def test_read_longer_than_one_data_in_is_split() -> None:
    """The initiator declared MaxRecvDataSegmentLength=8192 (testing.core)."""
    core = harness(True)
    clear_attention(core)
    sent = core.feed(core.wire(command(core, 40, cdb_of(10, False, 0, 17), 17 * BLOCK, read=True)))
    assert [len(pdu.data) for pdu in sent] == [8192, BLOCK]


def test_digests_bad_data_digest_is_rejected_good_ones_take_the_lane() -> None:
    core = CoreHarness(lun_bytes=BLOCKS * BLOCK)
    core.login(digests=True)
    assert core.nexus is not None
    core.conn.fast_lane = session_lane(core.scsi, core.nexus, Metrics(), "t", {0: 0}, 1, set())
    clear_attention(core)
    pdu = command(core, 50, cdb_of(10, True, 0, 1), BLOCK, write=True, data=b"\x55" * BLOCK)
    wire = bytearray(core.wire(pdu))
    wire[-1] ^= 0xFF  # the data digest
    reject = only(core.feed(bytes(wire)))
    assert isinstance(reject, P.Reject) and reject.reason == P.RejectReason.DATA_DIGEST_ERROR
    assert medium(core.backend) == bytes(BLOCKS * BLOCK)
    # the same write, its digest right, then read back: both through the lane, with
    # the digests of what it sends checked by RecordingConnection (testing.core)
    core.scsi.execute = None  # type: ignore[assignment,method-assign]  # the full path: gone
    core.cmdsn -= 1  # the discarded command's CmdSN is still expected (RFC 7143 §7.8)
    pdu = command(core, 51, cdb_of(10, True, 0, 1), BLOCK, write=True, data=b"\x55" * BLOCK)
    assert only(core.feed(core.wire(pdu))).status == Status.GOOD  # type: ignore[attr-defined]
    back = only(core.feed(core.wire(command(core, 52, cdb_of(10, False, 0, 1), BLOCK, read=True))))
    assert isinstance(back, P.DataIn) and bytes(back.data) == b"\x55" * BLOCK
