"""Vital product data pages (SPC-4 §7.8, SBC-3 §6.5).

:data:`VPD_PAGES` is the one table of pages; the Supported VPD Pages page
(0x00) is generated from it, so a page added to the table is advertised too.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from .atomic import MAX_ATOMIC_TRANSFER_BLOCKS, MAX_COMPARE_AND_WRITE_BLOCKS
from .logical_unit import LogicalUnit
from .provisioning import MAX_UNMAP_DESCRIPTORS, MAX_UNMAP_LBA_COUNT, MAX_WRITE_SAME_BLOCKS
from .sanitize import block_erase_supported, crypto_erase_supported
from .task import Nexus
from .xcopy import third_party_copy_page

PERIPHERAL_DIRECT_ACCESS: Final = 0x00  # PERIPHERAL QUALIFIER 000b, DEVICE TYPE 00h (SBC)

# Designation descriptor fields (SPC-4 §7.8.6.1, tables 584-586)
CODE_SET_BINARY: Final = 0x1
CODE_SET_ASCII: Final = 0x2
CODE_SET_UTF8: Final = 0x3
ASSOCIATION_LU: Final = 0b00
ASSOCIATION_TARGET_PORT: Final = 0b01
ASSOCIATION_TARGET_DEVICE: Final = 0b10
DESIGNATOR_T10_VENDOR_ID: Final = 0x1
DESIGNATOR_NAA: Final = 0x3
DESIGNATOR_RELATIVE_TARGET_PORT: Final = 0x4
DESIGNATOR_TARGET_PORT_GROUP: Final = 0x5
DESIGNATOR_SCSI_NAME_STRING: Final = 0x8

PageBuilder = Callable[["LogicalUnit", Nexus], bytes]


@dataclass(frozen=True)
class VpdPage:
    """One VPD page: ``build`` returns the bytes after the 4-byte page header."""

    code: int
    name: str
    build: PageBuilder


def _designator(
    code_set: int,
    association: int,
    designator_type: int,
    designator: bytes,
    protocol: int | None = None,
) -> bytes:
    """A designation descriptor (SPC-4 §7.8.6.1, table 584).

    PIV is set, with the protocol identifier, only for target port and target
    device designators and only when the transport told us its protocol.
    """
    piv = protocol is not None and association != ASSOCIATION_LU
    return (
        struct.pack(
            ">BBBB",
            ((protocol or 0) << 4 if piv else 0) | code_set,  # PROTOCOL IDENTIFIER, CODE SET
            (0x80 if piv else 0) | association << 4 | designator_type,  # PIV, ASSOCIATION, TYPE
            0x00,  # reserved
            len(designator),  # DESIGNATOR LENGTH
        )
        + designator
    )


def _scsi_name_string(name: str) -> bytes:
    """SCSI name string designator (SPC-4 §7.8.6.11): UTF-8, null-terminated,
    null-padded to a multiple of four bytes, at most 256 bytes."""
    raw = name.encode("utf-8")[:251] + b"\x00"
    return raw + bytes(-len(raw) % 4)


def _protocol(nexus: Nexus) -> int | None:
    """PROTOCOL IDENTIFIER from the initiator's TransportID (SPC-4 §7.6.4, byte 0 bits 3:0)."""
    return nexus.transport_id[0] & 0x0F if nexus.transport_id else None


def _supported_pages(lu: LogicalUnit, nexus: Nexus) -> bytes:
    """Supported VPD Pages (SPC-4 §7.8.14): every page code of :data:`VPD_PAGES`, ascending."""
    return bytes(sorted(page.code for page in VPD_PAGES))  # SUPPORTED VPD PAGE LIST


def _unit_serial_number(lu: LogicalUnit, nexus: Nexus) -> bytes:
    """Unit Serial Number (SPC-4 §7.8.15): PRODUCT SERIAL NUMBER in ASCII."""
    return lu.identity.serial.encode("ascii")


def _device_identification(lu: LogicalUnit, nexus: Nexus) -> bytes:
    """Device Identification (SPC-4 §7.8.6).

    LU designators: NAA 6 (the unit's identity, kept by snapshots) and T10
    vendor ID (vendor + the NAA in hex, unique whatever the serial number is).
    Target port: its SCSI name string, its relative port and, with ALUA, its target
    port group. Target device:
    the target's SCSI name string.
    """
    identity = lu.identity
    protocol = _protocol(nexus)
    t10 = identity.vendor.ljust(8).encode("ascii") + identity.naa.hex().upper().encode("ascii")
    relative_port = struct.pack(
        ">HH",
        0,  # obsolete
        nexus.relative_port & 0xFFFF,  # RELATIVE TARGET PORT IDENTIFIER
    )
    # ALUA: the target port group this port belongs to (SPC-4 §7.8.6.7)
    group = (
        b""
        if lu.alua is None
        else _designator(
            CODE_SET_BINARY,
            ASSOCIATION_TARGET_PORT,
            DESIGNATOR_TARGET_PORT_GROUP,
            struct.pack(">HH", 0, lu.alua.own),  # reserved, TARGET PORT GROUP
            protocol,
        )
    )
    return b"".join(
        (
            _designator(CODE_SET_BINARY, ASSOCIATION_LU, DESIGNATOR_NAA, identity.naa),
            _designator(CODE_SET_ASCII, ASSOCIATION_LU, DESIGNATOR_T10_VENDOR_ID, t10),
            _designator(
                CODE_SET_UTF8,
                ASSOCIATION_TARGET_PORT,
                DESIGNATOR_SCSI_NAME_STRING,
                _scsi_name_string(nexus.target_port),
                protocol,
            ),
            _designator(
                CODE_SET_BINARY,
                ASSOCIATION_TARGET_PORT,
                DESIGNATOR_RELATIVE_TARGET_PORT,
                relative_port,
                protocol,
            ),
            group,
            _designator(
                CODE_SET_UTF8,
                ASSOCIATION_TARGET_DEVICE,
                DESIGNATOR_SCSI_NAME_STRING,
                _scsi_name_string(nexus.target_name),
                protocol,
            ),
        )
    )


def _block_limits(lu: LogicalUnit, nexus: Nexus) -> bytes:
    """Block Limits (SBC-3 §6.5.3; the atomic fields of SBC-4 §6.6.4), page length 3Ch.

    UNMAP limits are reported only when UNMAP exists (a thin or resource-provisioned
    LU, LBPU=1); the unmap and atomic granularity is the 4 KiB allocation unit of the backing file.
    """

    physical = lu.allocation_unit_blocks
    unmaps = lu.provisioning_managed
    return struct.pack(
        ">BBHIIIIIIIQIIIII",
        0x00,  # reserved, WSNZ=0: WRITE SAME with zero blocks means "to the end"
        MAX_COMPARE_AND_WRITE_BLOCKS,  # MAXIMUM COMPARE AND WRITE LENGTH
        physical,  # OPTIMAL TRANSFER LENGTH GRANULARITY
        lu.max_transfer_blocks,  # MAXIMUM TRANSFER LENGTH
        0,  # OPTIMAL TRANSFER LENGTH (not reported)
        0,  # MAXIMUM PREFETCH LENGTH (no limit)
        MAX_UNMAP_LBA_COUNT if unmaps else 0,  # MAXIMUM UNMAP LBA COUNT
        MAX_UNMAP_DESCRIPTORS if unmaps else 0,  # MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT
        physical if unmaps else 0,  # OPTIMAL UNMAP GRANULARITY
        0x80000000 if unmaps else 0,  # UGAVALID=1, UNMAP GRANULARITY ALIGNMENT=0
        MAX_WRITE_SAME_BLOCKS,  # MAXIMUM WRITE SAME LENGTH
        MAX_ATOMIC_TRANSFER_BLOCKS,  # MAXIMUM ATOMIC TRANSFER LENGTH
        physical,  # ATOMIC ALIGNMENT
        physical,  # ATOMIC TRANSFER LENGTH GRANULARITY
        0,  # MAXIMUM ATOMIC TRANSFER LENGTH WITH ATOMIC BOUNDARY (no boundaries)
        0,  # MAXIMUM ATOMIC BOUNDARY SIZE
    )


def _block_device_characteristics(lu: LogicalUnit, nexus: Nexus) -> bytes:
    """Block Device Characteristics (SBC-3 §6.5.2), page length 3Ch: a non-rotating
    medium. WABEREQ=01b where SANITIZE BLOCK ERASE exists (LBPME=1) and WACEREQ=01b
    where CRYPTO ERASE does: reads after the erase succeed."""

    wabereq = 0b01 if block_erase_supported(lu) else 0b00
    wacereq = 0b01 if crypto_erase_supported(lu) else 0b00
    return struct.pack(
        ">HBBB55s",
        0x0001,  # MEDIUM ROTATION RATE: non-rotating medium (solid state)
        0x00,  # PRODUCT TYPE: not indicated
        wabereq << 6 | wacereq << 4,  # WABEREQ, WACEREQ, NOMINAL FORM FACTOR: not reported
        0x00,  # ZONED, FUAB, VBULS
        b"",  # reserved (bytes 9-63)
    )


def _logical_block_provisioning(lu: LogicalUnit, nexus: Nexus) -> bytes:
    """Logical Block Provisioning (SBC-4 §6.6.6): a thin or resource-provisioned LU
    offers UNMAP and WRITE SAME(10/16) with UNMAP, and unmapped blocks read as
    zeros (LBPRZ)."""
    managed = lu.provisioning_managed
    kind = 0x02 if lu.thin_provisioning else 0x01 if managed else 0x00
    return struct.pack(
        ">BBBB",
        0,  # THRESHOLD EXPONENT: no thresholds
        0xE4 if managed else 0x00,  # LBPU, LBPWS, LBPWS10, LBPRZ; ANC_SUP=0, DP=0
        kind,  # PROVISIONING TYPE: thin / resource / fully provisioned
        0x00,  # reserved
    )


def _third_party_copy(lu: LogicalUnit, nexus: Nexus) -> bytes:

    return third_party_copy_page(lu, nexus)


#: The one table of VPD pages (page 0x00 lists exactly these).
VPD_PAGES: Final[tuple[VpdPage, ...]] = (
    VpdPage(0x00, "Supported VPD Pages", _supported_pages),
    VpdPage(0x80, "Unit Serial Number", _unit_serial_number),
    VpdPage(0x83, "Device Identification", _device_identification),
    VpdPage(0x8F, "Third-party Copy", _third_party_copy),
    VpdPage(0xB0, "Block Limits", _block_limits),
    VpdPage(0xB1, "Block Device Characteristics", _block_device_characteristics),
    VpdPage(0xB2, "Logical Block Provisioning", _logical_block_provisioning),
)
_PAGES_BY_CODE: Final[dict[int, VpdPage]] = {page.code: page for page in VPD_PAGES}


def vpd_page(lu: LogicalUnit, nexus: Nexus, code: int) -> bytes | None:
    """The whole page ``code`` with its header (SPC-4 §7.8.1), or None if unsupported."""
    page = _PAGES_BY_CODE.get(code)
    if page is None:
        return None
    body = page.build(lu, nexus)
    header = struct.pack(
        ">BBH",
        PERIPHERAL_DIRECT_ACCESS,  # PERIPHERAL QUALIFIER, PERIPHERAL DEVICE TYPE
        code,  # PAGE CODE
        len(body),  # PAGE LENGTH
    )
    return header + body
