"""Sense data builder (SPC-4 §4.5): exact bytes for fixed and descriptor formats."""

from __future__ import annotations

import pytest

from iscsi_vmtarget.scsi.sense import (
    SENSE_TABLE,
    Reason,
    SenseKey,
    build_sense,
    cdb_field,
    param_field,
    parse_sense,
)


def test_every_reason_has_a_table_row() -> None:
    assert set(SENSE_TABLE) == set(Reason)


def test_fixed_lba_out_of_range() -> None:
    assert build_sense(Reason.LBA_OUT_OF_RANGE) == bytes.fromhex(
        "70 00 05 00000000 0a 00000000 21 00 00 000000"
    )


def test_fixed_with_field_pointer_and_bit() -> None:
    sense = build_sense(Reason.INVALID_FIELD_IN_CDB, field=cdb_field(1, 5))
    assert sense == bytes.fromhex("70 00 05 00000000 0a 00000000 24 00 00 cd0001")


def test_fixed_parameter_list_pointer_has_cd_clear() -> None:
    sense = build_sense(Reason.INVALID_FIELD_IN_PARAMETER_LIST, field=param_field(0x102))
    assert sense[15:18] == bytes.fromhex("800102")
    assert (sense[12], sense[13]) == (0x26, 0x00)


def test_fixed_information_sets_valid() -> None:
    sense = build_sense(Reason.MISCOMPARE_DURING_VERIFY, information=0x1234)
    assert sense[0] == 0xF0
    assert sense[2] == SenseKey.MISCOMPARE
    assert sense[3:7] == bytes.fromhex("00001234")
    assert (sense[12], sense[13]) == (0x1D, 0x00)


def test_fixed_information_too_big_leaves_valid_clear() -> None:
    sense = build_sense(Reason.MISCOMPARE_DURING_VERIFY, information=1 << 40)
    assert sense[0] == 0x70
    assert sense[3:7] == bytes(4)


def test_descriptor_plain() -> None:
    assert build_sense(Reason.POWER_ON_RESET, descriptor=True) == bytes.fromhex(
        "72 06 29 00 000000 00"
    )


def test_descriptor_with_information_and_field_pointer() -> None:
    sense = build_sense(
        Reason.INVALID_FIELD_IN_CDB, descriptor=True, field=cdb_field(2), information=7
    )
    header = "72 05 24 00 000000 14"
    information = "00 0a 80 00 0000000000000007"
    sense_key_specific = "02 06 0000 c00002 00"
    assert sense == bytes.fromhex(header + information + sense_key_specific)


@pytest.mark.parametrize("descriptor", [False, True])
def test_parse_sense_reads_what_build_sense_writes(descriptor: bool) -> None:
    assert parse_sense(build_sense(Reason.LBA_OUT_OF_RANGE, descriptor=descriptor)) == (
        0x05,
        0x21,
        0x00,
    )
    assert parse_sense(b"") == (0, 0, 0)
