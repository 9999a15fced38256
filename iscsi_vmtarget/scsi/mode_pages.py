"""Mode pages and their current values (SPC-4 §7.5, SBC-3 §6.4).

One table, :data:`MODE_PAGES`, holds every page we implement with its default
value and its changeable mask; :class:`ModeState` keeps one LU's current values.
MODE SENSE and MODE SELECT (:mod:`.mode`) read and change them. Nothing is saved,
so a logical unit reset puts the defaults back.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Final

ALL_PAGES: Final = 0x3F
ALL_SUBPAGES: Final = 0xFF

PC_CURRENT: Final = 0
PC_CHANGEABLE: Final = 1
PC_DEFAULT: Final = 2
PC_SAVED: Final = 3


@dataclass(frozen=True)
class ModePageDef:
    """One mode page: ``default`` and ``changeable`` are whole pages, header included."""

    code: int
    name: str
    default: bytes
    changeable: bytes

    def __post_init__(self) -> None:
        assert len(self.default) == len(self.changeable) == self.default[1] + 2


def _caching_page() -> tuple[bytes, bytes]:
    """Caching mode page (SBC-3 §6.4.5), write-back cache enabled by default."""
    default = struct.pack(
        ">BBBBHHHHBBHB3s",
        0x08,  # PS=0, SPF=0, PAGE CODE
        0x12,  # PAGE LENGTH
        0x04,  # IC ABPF CAP DISC SIZE = 0, WCE = 1, MF = 0, RCD = 0
        0x00,  # DEMAND READ / WRITE RETENTION PRIORITY
        0,  # DISABLE PRE-FETCH TRANSFER LENGTH
        0,  # MINIMUM PRE-FETCH
        0,  # MAXIMUM PRE-FETCH
        0,  # MAXIMUM PRE-FETCH CEILING
        0x00,  # FSW LBCSS DRA NV_DIS
        0,  # NUMBER OF CACHE SEGMENTS
        0,  # CACHE SEGMENT SIZE
        0,  # reserved
        b"\x00\x00\x00",  # obsolete
    )
    changeable = bytearray(len(default))
    changeable[2] = 0x04  # WCE
    return default, bytes(changeable)


def _control_page() -> tuple[bytes, bytes]:
    """Control mode page (SPC-4 §7.5.8); D_SENSE and SWP are changeable."""
    default = struct.pack(
        ">BBBBBBHHH",
        0x0A,  # PS=0, SPF=0, PAGE CODE
        0x0A,  # PAGE LENGTH
        0x02,  # TST=0, TMF_ONLY=0, DPICZ=0, D_SENSE=0, GLTSD=1 (no log pages), RLEC=0
        0x10,  # QUEUE ALGORITHM MODIFIER=1 (unrestricted), NUAR=0, QERR=00b
        0x00,  # VS=0, RAC=0, UA_INTLCK_CTRL=00b, SWP=0
        0x00,  # ATO=0, TAS=0, ATMPE=0, RWWP=0, AUTOLOAD MODE=0
        0,  # obsolete
        0xFFFF,  # BUSY TIMEOUT PERIOD: unlimited
        0,  # EXTENDED SELF-TEST COMPLETION TIME
    )
    changeable = bytearray(len(default))
    changeable[2] = 0x04  # D_SENSE
    changeable[4] = 0x08  # SWP
    return default, bytes(changeable)


def _informational_exceptions_page() -> tuple[bytes, bytes]:
    """Informational Exceptions Control mode page (SPC-4 §7.5.13); reporting disabled."""
    default = struct.pack(
        ">BBBBII",
        0x1C,  # PS=0, SPF=0, PAGE CODE
        0x0A,  # PAGE LENGTH
        0x08,  # PERF=0, EBF=0, EWASC=0, DEXCPT=1, TEST=0, EBACKERR=0, LOGERR=0
        0x00,  # MRIE = 0: no reporting of informational exception conditions
        0,  # INTERVAL TIMER
        0,  # REPORT COUNT
    )
    return default, bytes(len(default))


def _page(code: int, name: str, build: tuple[bytes, bytes]) -> ModePageDef:
    return ModePageDef(code, name, build[0], build[1])


#: The one table of mode pages, in ascending page code order (the order of "all pages").
MODE_PAGES: Final[tuple[ModePageDef, ...]] = (
    _page(0x08, "Caching", _caching_page()),
    _page(0x0A, "Control", _control_page()),
    _page(0x1C, "Informational Exceptions Control", _informational_exceptions_page()),
)
PAGES_BY_CODE: Final[dict[int, ModePageDef]] = {page.code: page for page in MODE_PAGES}


class ModeState:
    """Current mode page values of one LU."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current = {page.code: bytes(page.default) for page in MODE_PAGES}

    def page(self, code: int, pc: int = PC_CURRENT) -> bytes:
        definition = PAGES_BY_CODE[code]
        if pc == PC_CHANGEABLE:  # the mask, under the real page code and length
            return definition.default[:2] + definition.changeable[2:]
        if pc == PC_DEFAULT:
            return definition.default
        return self._current[code]

    def apply(self, pages: dict[int, bytes]) -> bool:
        """Install validated pages; True if any value changed."""
        with self._lock:
            changed = any(self._current[code] != value for code, value in pages.items())
            self._current.update(pages)
            return changed

    def restore_defaults(self) -> None:
        with self._lock:
            self._current = {page.code: bytes(page.default) for page in MODE_PAGES}

    @property
    def wce(self) -> bool:
        """Write cache enabled (caching page WCE bit)."""
        return bool(self._current[0x08][2] & 0x04)

    @property
    def d_sense(self) -> bool:
        """Descriptor format sense data (control page D_SENSE bit)."""
        return bool(self._current[0x0A][2] & 0x04)

    @property
    def swp(self) -> bool:
        """Software write protect (control page SWP bit)."""
        return bool(self._current[0x0A][4] & 0x08)
