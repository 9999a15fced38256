"""Primary commands (SPC-4 §6): TEST UNIT READY, INQUIRY, REQUEST SENSE, REPORT LUNS.

MODE SENSE/SELECT live in :mod:`.mode`, the VPD pages in :mod:`.vpd`.
"""

from __future__ import annotations

import struct
from typing import Final

from .command import Command, require
from .logical_unit import UnitIdentity
from .lun_address import encode_lun
from .sense import Reason, ScsiError, build_sense
from .task import it_key
from .vpd import PERIPHERAL_DIRECT_ACCESS, vpd_page

#: PERIPHERAL QUALIFIER 011b, DEVICE TYPE 1Fh: no logical unit at this LUN (SPC-4 §6.6.2).
PERIPHERAL_NO_LU: Final = 0x7F

#: Version descriptors (SPC-4 §6.6.2, table 142): SAM-5, SPC-4, SBC-3, no version claimed.
VERSION_DESCRIPTORS: Final = (0x00A0, 0x0460, 0x04C0)

STANDARD_INQUIRY_LENGTH: Final = 96

_NO_LU_IDENTITY: Final = UnitIdentity(naa=bytes([0x60]) + bytes(15), serial="0")


def test_unit_ready(cmd: Command) -> None:
    """TEST UNIT READY (SPC-4 §6.47): the medium is always ready."""
    return None


def standard_inquiry(identity: UnitIdentity, peripheral: int, tpgs: int = 0) -> bytes:
    """Standard INQUIRY data (SPC-4 §6.6.2), 96 bytes with version descriptors;
    ``tpgs`` 01b announces implicit ALUA (§5.15)."""
    descriptors = b"".join(struct.pack(">H", d) for d in VERSION_DESCRIPTORS)
    return struct.pack(
        ">BBBBBBBB8s16s4s20sBB16s22s",
        peripheral,  # PERIPHERAL QUALIFIER, PERIPHERAL DEVICE TYPE
        0x00,  # RMB=0, LU_CONG=0
        0x06,  # VERSION: SPC-4
        0x12,  # NORMACA=0, HISUP=1, RESPONSE DATA FORMAT=2
        STANDARD_INQUIRY_LENGTH - 5,  # ADDITIONAL LENGTH
        0x08 | tpgs << 4,  # SCCS=0 ACC=0 TPGS 3PC=1 (EXTENDED COPY) PROTECT=0
        0x00,  # ENCSERV=0, MULTIP=0
        0x02,  # CMDQUE=1
        identity.vendor.ljust(8).encode("ascii"),  # T10 VENDOR IDENTIFICATION
        identity.product.ljust(16).encode("ascii"),  # PRODUCT IDENTIFICATION
        identity.revision.ljust(4).encode("ascii"),  # PRODUCT REVISION LEVEL
        b"",  # vendor specific
        0x00,  # CLOCKING, QAS, IUS
        0x00,  # reserved
        descriptors,  # VERSION DESCRIPTOR 1..8
        b"",  # reserved
    )


def inquiry(cmd: Command) -> bytes:
    """INQUIRY (SPC-4 §6.6). A LUN without a logical unit still answers the
    standard data, with peripheral qualifier 011b (SPC-4 §6.6.2)."""
    cdb = cmd.cdb
    evpd = cdb[1] & 0x01  # EVPD
    page_code = cdb[2]  # PAGE CODE
    if not evpd:
        require(page_code == 0, 2)
        if cmd.lu is None:
            return standard_inquiry(_NO_LU_IDENTITY, PERIPHERAL_NO_LU)
        tpgs = 0b01 if cmd.lu.alua is not None else 0b00  # implicit ALUA only
        return standard_inquiry(cmd.lu.identity, PERIPHERAL_DIRECT_ACCESS, tpgs)
    if cmd.lu is None:
        raise ScsiError(Reason.LOGICAL_UNIT_NOT_SUPPORTED)
    page = vpd_page(cmd.lu, cmd.nexus, page_code)
    require(page is not None, 2)
    assert page is not None
    return page


def request_sense(cmd: Command) -> bytes:
    """REQUEST SENSE (SPC-4 §6.39): the pending unit attention (now cleared) or
    NO SENSE; LOGICAL UNIT NOT SUPPORTED for a LUN without a logical unit."""
    descriptor = bool(cmd.cdb[1] & 0x01)  # DESC
    if cmd.lu is None:
        reason = Reason.LOGICAL_UNIT_NOT_SUPPORTED
    else:
        sanitizing = cmd.lu.sanitizing
        if sanitizing is not None:  # progress of a running SANITIZE (SPC-4 §4.5.2.4.4)
            error = sanitizing.error()
            return build_sense(error.reason, descriptor=descriptor, field=error.field)
        reason = cmd.lu.pop_attention(it_key(cmd.nexus)) or Reason.NO_SENSE
    return build_sense(reason, descriptor=descriptor)


#: SELECT REPORT (SPC-4 §6.33) -> whether our LUs are listed. Every LU here
#: is an ordinary one: no well-known LUs, no administrative LUs, no conglomerates.
_SELECT_REPORT: Final[dict[int, bool]] = {
    0x00: True,  # LUs of the addressing methods we use, well-known LUs excluded
    0x01: False,  # well-known LUs only: we have none
    0x02: True,  # every LU accessible to this I_T nexus
    0x10: False,  # administrative LUs only: none
    0x11: True,  # administrative LUs and the LUs outside any conglomerate: all ours
    0x12: False,  # the addressed administrative LU's subsidiaries: it is none
}


def report_luns(cmd: Command) -> bytes:
    """REPORT LUNS (SPC-4 §6.33): the LUN inventory this I_T nexus may see - the LUN
    map of its ACL (``cmd.luns``), never another initiator's - for each SELECT REPORT
    value; a reserved or vendor-specific one is INVALID FIELD IN CDB."""
    select = cmd.cdb[2]  # SELECT REPORT
    require(select in _SELECT_REPORT, 2)
    luns = sorted(cmd.luns) if _SELECT_REPORT[select] else []
    body = b"".join(encode_lun(n) for n in luns)
    return (
        struct.pack(
            ">II",
            len(body),  # LUN LIST LENGTH
            0,  # reserved
        )
        + body
    )
