"""The opcode table: one row per operation code (and service action).

Dispatch, CDB length checks, reserved-bit checks, the reservation conflict
rules and REPORT SUPPORTED OPERATION CODES all derive from :data:`OPCODE_TABLE`, as LIO derives them
from ``tcm_supported_opcodes`` and gotgt from its 256-entry table.

``usage`` is the CDB USAGE DATA of SPC-4 §6.35.3 (table 238): byte 0 is the
opcode, and every other bit set is a bit the device server looks at. A bit
set in a CDB but clear in ``usage`` gets INVALID FIELD IN CDB with a field
pointer to it, which is how non-zero RDPROTECT/WRPROTECT/VRPROTECT (no
protection information), NACA (not supported) and reserved bits are refused.
"""

from __future__ import annotations

from typing import Final

from . import atomic, mode, pr, provisioning, rsoc, rtpg, sanitize, sbc, spc, xcopy
from .command import Command, be, parse_block_range
from .logical_unit import LogicalUnit
from .opcode_row import (
    SERVICE_ACTION_OPCODES,
    BlockPredicate,
    DataDirection,
    Handler,
    LuPredicate,
    OpcodeRow,
    TransferLength,
)
from .pr_state import PrPolicy
from .sense import Reason, ScsiError, cdb_field

# -- transfer lengths and blocking predicates -----------------------------------------------


def _no_data(cdb: bytes, block_size: int) -> int:
    return 0


def _blocks(cdb: bytes, block_size: int) -> int:
    return parse_block_range(cdb).blocks * block_size


def _allocation(offset: int, size: int) -> TransferLength:
    def length(cdb: bytes, block_size: int) -> int:
        return be(cdb, offset, size)

    return length


def _verify_data(cdb: bytes, block_size: int) -> int:
    """Data-Out of VERIFY: none, the whole range, or one block (SBC-3 §5.27, BYTCHK)."""
    bytchk = (cdb[1] >> 1) & 0x03
    blocks = parse_block_range(cdb).blocks
    if bytchk == 0b01:
        return blocks * block_size
    if bytchk == 0b11 and blocks:
        return block_size
    return 0


def _never(cdb: bytes) -> bool:
    return False


def _always(cdb: bytes) -> bool:
    return True


def _fua(cdb: bytes) -> bool:
    return bool(cdb[1] & 0x08)


def _row(
    opcode: int,
    name: str,
    usage: str,
    handler: Handler,
    direction: DataDirection,
    transfer_length: TransferLength,
    pr_policy: PrPolicy,
    *,
    service_action: int | None = None,
    may_block: BlockPredicate = _never,
    writes_medium: bool = False,
    reads_medium: bool = False,
    startable: bool = False,
    nowait_kind: str | None = None,
    needs_lu: bool = True,
    ua_exempt: bool = False,
    pr_relaxed: BlockPredicate | None = None,
    spc2_exempt: bool = False,
    sanitize_exempt: bool = False,
    supported: LuPredicate | None = None,
) -> OpcodeRow:
    mask = bytes.fromhex(usage)
    extra = {} if supported is None else {"supported": supported}
    return OpcodeRow(
        opcode=opcode,
        service_action=service_action,
        name=name,
        cdb_length=len(mask),
        handler=handler,
        direction=direction,
        usage=mask,
        transfer_length=transfer_length,
        may_block=may_block,
        pr_policy=pr_policy,
        writes_medium=writes_medium,
        reads_medium=reads_medium,
        startable=startable,
        nowait_kind=nowait_kind,
        needs_lu=needs_lu,
        ua_exempt=ua_exempt,
        pr_relaxed=pr_relaxed,
        spc2_exempt=spc2_exempt,
        sanitize_exempt=sanitize_exempt,
        **extra,
    )


def _report_supported_operation_codes(cmd: Command) -> bytes:
    """REPORT SUPPORTED OPERATION CODES over this very table (:mod:`.rsoc`)."""
    return rsoc.report_supported_operation_codes(cmd, OPCODE_TABLE)


_IN, _OUT, _NONE = DataDirection.IN, DataDirection.OUT, DataDirection.NONE
_ALLOWED, _READ, _WRITE = PrPolicy.ALLOWED, PrPolicy.READ, PrPolicy.WRITE
#: Rows every reservation and a running SANITIZE leave alone (SPC-4 §5.13.1, SBC-3 §4.11).
_ALWAYS = {"spc2_exempt": True, "sanitize_exempt": True}

# Usage masks: byte 1 of READ/WRITE/VERIFY keeps DPO (10h) and FUA (08h) or BYTCHK, never
# the PROTECT bits; GROUP NUMBER (1Fh) is accepted and ignored; the CONTROL byte is 00h.
# Service-action rows keep the SERVICE ACTION bits (1Fh) of byte 1.
# fmt: off
#: The one opcode table (SPC-4 and SBC-3 commands we implement), in opcode order.
OPCODE_TABLE: Final[tuple[OpcodeRow, ...]] = (
    _row(0x00, "TEST UNIT READY", "00 00 00 00 00 00",
         spc.test_unit_ready, _NONE, _no_data, _ALLOWED),
    _row(0x03, "REQUEST SENSE", "03 01 00 00 ff 00",
         spc.request_sense, _IN, _allocation(4, 1), _ALLOWED, needs_lu=False, ua_exempt=True,
         **_ALWAYS),
    _row(0x08, "READ(6)", "08 1f ff ff ff 00",
         sbc.read, _IN, _blocks, _READ, reads_medium=True, nowait_kind="read", startable=True),
    _row(0x0A, "WRITE(6)", "0a 1f ff ff ff 00",
         sbc.write, _OUT, _blocks, _WRITE, writes_medium=True, nowait_kind="write", startable=True),
    _row(0x12, "INQUIRY", "12 01 ff ff ff 00",
         spc.inquiry, _IN, _allocation(3, 2), _ALLOWED, needs_lu=False, ua_exempt=True,
         **_ALWAYS),
    _row(0x15, "MODE SELECT(6)", "15 11 00 00 ff 00",
         mode.mode_select6, _OUT, _allocation(4, 1), _WRITE),
    _row(0x16, "RESERVE(6)", "16 00 00 00 00 00",
         pr.reserve, _NONE, _no_data, _ALLOWED),
    _row(0x17, "RELEASE(6)", "17 00 00 00 00 00",
         pr.release, _NONE, _no_data, _ALLOWED, spc2_exempt=True),
    _row(0x1A, "MODE SENSE(6)", "1a 08 ff ff ff 00",
         mode.mode_sense6, _IN, _allocation(4, 1), _READ),
    _row(0x1B, "START STOP UNIT", "1b 01 00 0f f7 00",
         sbc.start_stop_unit, _NONE, _no_data, _WRITE, may_block=sbc.stop_flushes,
         pr_relaxed=sbc.start_stop_allowed_under_reservation),
    _row(0x1E, "PREVENT ALLOW MEDIUM REMOVAL", "1e 00 00 00 03 00",
         sbc.prevent_allow, _NONE, _no_data, _WRITE, pr_relaxed=sbc.prevent_allows_removal),
    _row(0x25, "READ CAPACITY(10)", "25 00 ff ff ff ff 00 00 01 00",
         sbc.read_capacity10, _IN, lambda cdb, bs: 8, _ALLOWED),
    _row(0x28, "READ(10)", "28 18 ff ff ff ff 1f ff ff 00",
         sbc.read, _IN, _blocks, _READ, reads_medium=True, nowait_kind="read", startable=True),
    _row(0x2A, "WRITE(10)", "2a 18 ff ff ff ff 1f ff ff 00",
         sbc.write, _OUT, _blocks, _WRITE, may_block=_fua, writes_medium=True,
         nowait_kind="write", startable=True),
    _row(0x2E, "WRITE AND VERIFY(10)", "2e 12 ff ff ff ff 1f ff ff 00",
         sbc.write_and_verify, _OUT, _blocks, _WRITE, may_block=_always, writes_medium=True),
    _row(0x2F, "VERIFY(10)", "2f 16 ff ff ff ff 1f ff ff 00",
         sbc.verify, _OUT, _verify_data, _READ, reads_medium=True),
    _row(0x34, "PRE-FETCH(10)", "34 02 ff ff ff ff 1f ff ff 00",
         sbc.pre_fetch, _NONE, _no_data, _READ),
    _row(0x35, "SYNCHRONIZE CACHE(10)", "35 06 ff ff ff ff 1f ff ff 00",
         sbc.synchronize_cache, _NONE, _no_data, _WRITE, may_block=_always),
    _row(0x37, "READ DEFECT DATA(10)", "37 00 1f 00 00 00 00 ff ff 00",
         sbc.read_defect_data, _IN, _allocation(7, 2), _READ),
    _row(0x41, "WRITE SAME(10)", "41 08 ff ff ff ff 1f ff ff 00",
         provisioning.write_same, _OUT, provisioning.write_same_data_length, _WRITE,
         may_block=_always, writes_medium=True),
    _row(0x42, "UNMAP", "42 00 00 00 00 00 1f ff ff 00",
         provisioning.unmap, _OUT, _allocation(7, 2), _WRITE, may_block=_always,
         writes_medium=True, supported=provisioning.unmap_supported),
    _row(0x48, "SANITIZE OVERWRITE", "48 bf 00 00 00 00 00 ff ff 00",
         sanitize.sanitize, _OUT, _allocation(7, 2), _WRITE, service_action=0x01,
         may_block=_always, writes_medium=True),
    _row(0x48, "SANITIZE BLOCK ERASE", "48 bf 00 00 00 00 00 ff ff 00",
         sanitize.sanitize, _OUT, _allocation(7, 2), _WRITE, service_action=0x02,
         may_block=_always, writes_medium=True, supported=sanitize.block_erase_supported),
    _row(0x48, "SANITIZE CRYPTO ERASE", "48 bf 00 00 00 00 00 ff ff 00",
         sanitize.sanitize, _OUT, _allocation(7, 2), _WRITE, service_action=0x03,
         may_block=_always, writes_medium=True, supported=sanitize.crypto_erase_supported),
    _row(0x48, "SANITIZE EXIT FAILURE MODE", "48 bf 00 00 00 00 00 ff ff 00",
         sanitize.sanitize, _OUT, _allocation(7, 2), _WRITE, service_action=0x1F,
         writes_medium=True),
    _row(0x55, "MODE SELECT(10)", "55 11 00 00 00 00 00 ff ff 00",
         mode.mode_select10, _OUT, _allocation(7, 2), _WRITE),
    _row(0x56, "RESERVE(10)", "56 00 00 00 00 00 00 00 00 00",
         pr.reserve, _NONE, _no_data, _ALLOWED),
    _row(0x57, "RELEASE(10)", "57 00 00 00 00 00 00 00 00 00",
         pr.release, _NONE, _no_data, _ALLOWED, spc2_exempt=True),
    _row(0x5A, "MODE SENSE(10)", "5a 18 ff ff 00 00 00 ff ff 00",
         mode.mode_sense10, _IN, _allocation(7, 2), _READ),
    *(
        _row(0x5E, f"PERSISTENT RESERVE IN {sa.name.replace('_', ' ')}",
             "5e 1f 00 00 00 00 00 ff ff 00",
             pr.persistent_reserve_in, _IN, _allocation(7, 2), _ALLOWED, service_action=sa,
             spc2_exempt=True)
        for sa in pr.PrIn
    ),
    *(
        _row(0x5F, f"PERSISTENT RESERVE OUT {sa.name.replace('_', ' ')}",
             "5f 1f ff 00 00 ff ff ff ff 00",
             pr.persistent_reserve_out, _OUT, _allocation(5, 4), _ALLOWED, service_action=sa,
             may_block=_always)
        for sa in pr.PrOut
    ),
    _row(0x83, "EXTENDED COPY(LID1)", "83 1f 00 00 00 00 00 00 00 00 ff ff ff ff 00 00",
         xcopy.extended_copy, _OUT, _allocation(10, 4), _WRITE, service_action=0x00,
         may_block=_always),
    _row(0x84, "RECEIVE COPY RESULTS COPY STATUS",
         "84 1f ff 00 00 00 00 00 00 00 ff ff ff ff 00 00",
         xcopy.receive_copy_results, _IN, _allocation(10, 4), _WRITE, service_action=0x00),
    _row(0x84, "RECEIVE COPY RESULTS OPERATING PARAMETERS",
         "84 1f 00 00 00 00 00 00 00 00 ff ff ff ff 00 00",
         xcopy.receive_copy_results, _IN, _allocation(10, 4), _WRITE, service_action=0x03),
    _row(0x88, "READ(16)", "88 18 ff ff ff ff ff ff ff ff ff ff ff ff 1f 00",
         sbc.read, _IN, _blocks, _READ, reads_medium=True, nowait_kind="read", startable=True),
    _row(0x89, "COMPARE AND WRITE", "89 18 ff ff ff ff ff ff ff ff 00 00 00 ff 1f 00",
         atomic.compare_and_write, _OUT, atomic.compare_and_write_length, _WRITE,
         may_block=atomic.fua_may_block, writes_medium=True),
    _row(0x8A, "WRITE(16)", "8a 18 ff ff ff ff ff ff ff ff ff ff ff ff 1f 00",
         sbc.write, _OUT, _blocks, _WRITE, may_block=_fua, writes_medium=True,
         nowait_kind="write", startable=True),
    _row(0x8B, "ORWRITE(16)", "8b 18 ff ff ff ff ff ff ff ff ff ff ff ff 1f 00",
         atomic.orwrite, _OUT, _blocks, _WRITE, may_block=_fua, writes_medium=True),
    _row(0x8E, "WRITE AND VERIFY(16)", "8e 12 ff ff ff ff ff ff ff ff ff ff ff ff 1f 00",
         sbc.write_and_verify, _OUT, _blocks, _WRITE, may_block=_always, writes_medium=True),
    _row(0x8F, "VERIFY(16)", "8f 16 ff ff ff ff ff ff ff ff ff ff ff ff 1f 00",
         sbc.verify, _OUT, _verify_data, _READ, reads_medium=True),
    _row(0x90, "PRE-FETCH(16)", "90 02 ff ff ff ff ff ff ff ff ff ff ff ff 1f 00",
         sbc.pre_fetch, _NONE, _no_data, _READ),
    _row(0x91, "SYNCHRONIZE CACHE(16)", "91 06 ff ff ff ff ff ff ff ff ff ff ff ff 1f 00",
         sbc.synchronize_cache, _NONE, _no_data, _WRITE, may_block=_always),
    _row(0x93, "WRITE SAME(16)", "93 09 ff ff ff ff ff ff ff ff ff ff ff ff 1f 00",
         provisioning.write_same, _OUT, provisioning.write_same_data_length, _WRITE,
         may_block=_always, writes_medium=True),
    _row(0x9C, "WRITE ATOMIC(16)", "9c 18 ff ff ff ff ff ff ff ff ff ff ff ff 1f 00",
         atomic.write_atomic, _OUT, atomic.write_atomic_length, _WRITE, may_block=_fua,
         writes_medium=True),
    _row(0x9E, "READ CAPACITY(16)", "9e 1f ff ff ff ff ff ff ff ff ff ff ff ff 01 00",
         sbc.read_capacity16, _IN, _allocation(10, 4), _ALLOWED, service_action=0x10),
    _row(0x9E, "GET LBA STATUS", "9e 1f ff ff ff ff ff ff ff ff ff ff ff ff 00 00",
         provisioning.get_lba_status, _IN, _allocation(10, 4), _READ, service_action=0x12),
    _row(0xA0, "REPORT LUNS", "a0 00 ff 00 00 00 ff ff ff ff 00 00",
         spc.report_luns, _IN, _allocation(6, 4), _ALLOWED, needs_lu=False, ua_exempt=True,
         **_ALWAYS),
    _row(0xA3, "REPORT TARGET PORT GROUPS", "a3 ff 00 00 00 00 ff ff ff ff 00 00",
         rtpg.report_target_port_groups, _IN, _allocation(6, 4), _ALLOWED,
         service_action=0x0A, supported=rtpg.offers_alua, **_ALWAYS),
    _row(0xA3, "REPORT SUPPORTED OPERATION CODES", "a3 1f 87 ff ff ff ff ff ff ff 00 00",
         _report_supported_operation_codes, _IN, _allocation(6, 4), _ALLOWED,
         service_action=0x0C, **_ALWAYS),
    _row(0xA3, "REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS",
         "a3 1f 80 00 00 00 ff ff ff ff 00 00",
         rsoc.report_supported_tmfs, _IN, _allocation(6, 4), _ALLOWED, service_action=0x0D,
         **_ALWAYS),
    _row(0xA8, "READ(12)", "a8 18 ff ff ff ff ff ff ff ff 1f 00",
         sbc.read, _IN, _blocks, _READ, reads_medium=True, nowait_kind="read", startable=True),
    _row(0xAA, "WRITE(12)", "aa 18 ff ff ff ff ff ff ff ff 1f 00",
         sbc.write, _OUT, _blocks, _WRITE, may_block=_fua, writes_medium=True,
         nowait_kind="write", startable=True),
    _row(0xAE, "WRITE AND VERIFY(12)", "ae 12 ff ff ff ff ff ff ff ff 1f 00",
         sbc.write_and_verify, _OUT, _blocks, _WRITE, may_block=_always, writes_medium=True),
    _row(0xAF, "VERIFY(12)", "af 16 ff ff ff ff ff ff ff ff 1f 00",
         sbc.verify, _OUT, _verify_data, _READ),
    _row(0xB7, "READ DEFECT DATA(12)", "b7 1f ff ff ff ff ff ff ff ff 00 00",
         sbc.read_defect_data, _IN, _allocation(6, 4), _READ),
)
# fmt: on

_ROWS: Final[dict[tuple[int, int | None], OpcodeRow]] = {row.key: row for row in OPCODE_TABLE}
if len(_ROWS) != len(OPCODE_TABLE):  # pragma: no cover - a table editing mistake
    raise RuntimeError("duplicate row in OPCODE_TABLE")


def _service_action(cdb: bytes) -> int | None:
    if cdb[0] in SERVICE_ACTION_OPCODES:
        return cdb[1] & 0x1F if len(cdb) > 1 else None
    return None


def find_row(cdb: bytes) -> OpcodeRow | None:
    """The row for this CDB, or None for an unknown opcode or service action."""
    if not cdb:
        return None
    return _ROWS.get((cdb[0], _service_action(cdb)))


def lookup(cdb: bytes, lu: LogicalUnit | None = None) -> OpcodeRow:
    """The row for this CDB; INVALID COMMAND OPERATION CODE for an unknown opcode
    (or one the LU does not offer), INVALID FIELD IN CDB pointing at the SERVICE
    ACTION for an unknown service action."""
    row = find_row(cdb)
    if row is not None and (lu is None or row.supported(lu)):
        return row
    if cdb and cdb[0] in SERVICE_ACTION_OPCODES:
        raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field=cdb_field(1, 4))
    raise ScsiError(Reason.INVALID_COMMAND_OPERATION_CODE, field=cdb_field(0))


def validate_cdb(row: OpcodeRow, cdb: bytes) -> bytes:
    """Cut the CDB to the row's length (iSCSI pads CDBs to 16 bytes) and refuse
    any bit the usage mask does not allow (SPC-4 §2.4 reserved fields)."""
    if len(cdb) < row.cdb_length:
        raise ScsiError(Reason.INVALID_FIELD_IN_CDB, field=cdb_field(len(cdb)))
    cdb = bytes(cdb[: row.cdb_length])
    if int.from_bytes(cdb[1:], "big") & row.reject_mask:
        for index in range(1, row.cdb_length):
            extra = cdb[index] & ~row.usage[index] & 0xFF
            if extra:
                raise ScsiError(
                    Reason.INVALID_FIELD_IN_CDB, field=cdb_field(index, extra.bit_length() - 1)
                )
    return cdb
