"""SANITIZE (SBC-3 §5.18): OVERWRITE, BLOCK ERASE, EXIT FAILURE MODE, the
SANITIZE IN PROGRESS state other commands see, its progress indication and pacing."""

from __future__ import annotations

import struct
import threading
from typing import TYPE_CHECKING

from iscsi_vmtarget.scsi import Status
from iscsi_vmtarget.scsi.logical_unit import SanitizeProgress

if TYPE_CHECKING:
    from tests.scsi.conftest import Harness

BLOCK = 512
INVALID_FIELD = (0x5, 0x24, 0x00)
INVALID_PARAM = (0x5, 0x26, 0x00)
PARAM_LENGTH = (0x5, 0x1A, 0x00)
IN_PROGRESS = (0x2, 0x04, 0x1B)
WRITE_PROTECTED = (0x7, 0x27, 0x00)
SOFTWARE_WRITE_PROTECTED = (0x7, 0x27, 0x02)
OVERWRITE, BLOCK_ERASE, CRYPTO_ERASE, EXIT_FAILURE_MODE = 0x01, 0x02, 0x03, 0x1F


def sanitize(action: int, length: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">BB5sHB", 0x48, flags | action, b"", length, 0)


def overwrite_parameters(pattern: bytes, count: int = 1, invert: bool = False) -> bytes:
    return struct.pack(">BBH", (0x80 if invert else 0) | count, 0, len(pattern)) + pattern


def test_overwrite_writes_the_pattern_everywhere(scsi: Harness) -> None:
    scsi.backend.write(0, b"a" * 8 * BLOCK)
    data = overwrite_parameters(b"\xaa\x55\x01\x02")
    scsi.good(sanitize(OVERWRITE, len(data)), data)
    assert scsi.backend.read(0, 2048 * BLOCK) == b"\xaa\x55\x01\x02" * (2048 * BLOCK // 4)
    assert scsi.backend.flushes == 1


def test_overwrite_with_invert_alternates(scsi: Harness) -> None:
    data = overwrite_parameters(b"\x0f" * BLOCK, count=2, invert=True)
    scsi.good(sanitize(OVERWRITE, len(data)), data)
    assert scsi.backend.read(0, BLOCK) == b"\xf0" * BLOCK  # the second pass is inverted


def test_overwrite_parameter_checks(scsi: Harness) -> None:
    """libiscsi Sanitize.Overwrite: 4 < PARAMETER LIST LENGTH <= block size + 4."""
    data = overwrite_parameters(b"\xaa" * BLOCK)
    for length in range(5):
        response = scsi.check(sanitize(OVERWRITE, length), INVALID_FIELD, data[:length])
        assert response.sense[15:18] == bytes.fromhex("c00007")
    scsi.check(sanitize(OVERWRITE, BLOCK + 5), INVALID_FIELD, data + b"\x00")
    scsi.check(sanitize(OVERWRITE, len(data)), INVALID_PARAM, b"\x00" + data[1:])  # count 0
    scsi.check(sanitize(OVERWRITE, len(data)), INVALID_PARAM, data[:2] + b"\x00\x00" + data[4:])
    too_long = data[:2] + struct.pack(">H", BLOCK + 4) + data[4:]
    scsi.check(sanitize(OVERWRITE, len(data)), INVALID_PARAM, too_long)
    scsi.check(sanitize(OVERWRITE, len(data)), INVALID_PARAM, b"\x21" + data[1:])  # TEST
    short = overwrite_parameters(b"\xaa" * 8)
    scsi.check(sanitize(OVERWRITE, len(short)), PARAM_LENGTH, short[:6])


def test_block_erase_deallocates_a_thin_lu(thin: Harness) -> None:
    thin.good(thin.cdb10(0x2A, 0, 256), b"a" * 256 * BLOCK)
    thin.good(sanitize(BLOCK_ERASE))
    assert thin.backend.read(0, 256 * BLOCK) == bytes(256 * BLOCK)
    lba_status = thin.good(struct.pack(">BBQIBB", 0x9E, 0x12, 0, 64, 0, 0))
    assert lba_status[8:21] == struct.pack(">QIB", 0, 2048, 1)  # one deallocated extent


def test_block_erase_and_exit_failure_mode_take_no_parameters(thin: Harness) -> None:
    for action in (BLOCK_ERASE, EXIT_FAILURE_MODE):
        response = thin.check(sanitize(action, 8), INVALID_FIELD, bytes(8))
        assert response.sense[15:18] == bytes.fromhex("c00007")
    thin.good(sanitize(EXIT_FAILURE_MODE))


def test_unsupported_service_actions(scsi: Harness) -> None:
    """BLOCK ERASE only on thin LUs; CRYPTO ERASE needs an encrypted unit."""
    for action in (0x00, BLOCK_ERASE, CRYPTO_ERASE, 0x04, 0x10, 0x1E):
        response = scsi.check(sanitize(action), INVALID_FIELD)
        assert response.sense[15:18] == bytes.fromhex("cc0001")


def test_reserved_bits(thin: Harness) -> None:
    response = thin.check(sanitize(BLOCK_ERASE, flags=0x40), INVALID_FIELD)
    assert response.sense[15:18] == bytes.fromhex("ce0001")
    for byte in range(2, 7):
        cdb = bytearray(sanitize(BLOCK_ERASE))
        cdb[byte] = byte
        thin.check(bytes(cdb), INVALID_FIELD)
    thin.good(sanitize(BLOCK_ERASE, flags=0x80 | 0x20))  # IMMED, AUSE


def test_sanitize_is_refused_on_write_protected_lus(scsi_ro: Harness, scsi: Harness) -> None:
    data = overwrite_parameters(b"\xaa")
    scsi_ro.check(sanitize(OVERWRITE, len(data)), WRITE_PROTECTED, data)
    control = bytearray(scsi.lu.mode.page(0x0A))
    control[4] |= 0x08  # SWP
    scsi.lu.mode.apply({0x0A: bytes(control)})
    scsi.check(sanitize(OVERWRITE, len(data)), SOFTWARE_WRITE_PROTECTED, data)


def test_other_commands_see_sanitize_in_progress(scsi: Harness) -> None:
    """libiscsi Sanitize.Reset: TEST UNIT READY, START STOP UNIT and READ get NOT
    READY, SANITIZE IN PROGRESS; INQUIRY, REPORT LUNS and REQUEST SENSE work."""
    scsi.lu.sanitizing = SanitizeProgress(total=4, done=1)
    response = scsi.check(bytes(6), IN_PROGRESS)
    assert response.sense[15:18] == bytes.fromhex("804000")  # SKSV, progress 1/4
    scsi.check(bytes([0x1B, 1, 0, 0, 0, 0]), IN_PROGRESS)
    scsi.check(scsi.cdb16(0x88, 0, 1), IN_PROGRESS)
    scsi.good(bytes([0x12, 0, 0, 0, 36, 0]))
    scsi.good(bytes.fromhex("a0 00 00 000000 00001000 00 00"))
    sense = scsi.good(bytes([0x03, 0, 0, 0, 252, 0]))
    assert (sense[2], sense[12], sense[13]) == IN_PROGRESS
    assert sense[15:18] == bytes.fromhex("804000")
    data = overwrite_parameters(b"\xaa")
    scsi.check(sanitize(OVERWRITE, len(data)), IN_PROGRESS, data)  # no second one
    scsi.lu.sanitizing = None
    scsi.good(bytes(6))


def test_unit_attentions_wait_behind_a_sanitize(scsi: Harness) -> None:
    """A new I_T nexus during a sanitize first learns the sanitize is still going."""
    scsi.lu.sanitizing = SanitizeProgress(total=1)
    other = scsi.make_nexus("iqn.2024-01.test:other")
    scsi.target.nexus_added(other)
    scsi.check(bytes(6), IN_PROGRESS, nexus=other)
    scsi.lu.sanitizing = None
    scsi.check(bytes(6), (0x6, 0x29, 0x00), nexus=other)


def test_sanitize_is_paced_with_an_injected_clock(harness_factory: type[Harness]) -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    harness = harness_factory.create(
        blocks=4096, clock=lambda: now[0], sleep=sleep, sanitize_rate=1 << 20
    )
    data = overwrite_parameters(b"\x11")
    harness.good(sanitize(OVERWRITE, len(data)), data)
    assert abs(sum(slept) - 2.0) < 1e-6  # 2 MiB at 1 MiB/s
    assert harness.lu.sanitizing is None


def test_sanitize_marks_the_lu_busy_while_it_runs(harness_factory: type[Harness]) -> None:
    gate = threading.Event()
    seen: list[Status] = []

    def sleep(seconds: float) -> None:
        if not gate.is_set():
            seen.append(harness.run(bytes(6)).status)
            gate.set()

    harness = harness_factory.create(clock=lambda: 0.0, sleep=sleep, sanitize_rate=1)
    data = overwrite_parameters(b"\x11")
    harness.good(sanitize(OVERWRITE, len(data)), data)
    assert seen == [Status.CHECK_CONDITION]
    harness.good(bytes(6))


def test_crypto_erase_where_the_backend_can_change_its_key(
    harness_factory: type[Harness],
) -> None:
    erased: list[bool] = []
    harness = harness_factory.create(crypto_erase=lambda: erased.append(True))
    assert harness.good(bytes([0x12, 1, 0xB1, 0, 255, 0]))[7] == 0x10  # WACEREQ=01b
    one = harness.good(struct.pack(">BBBBHIBB", 0xA3, 0x0C, 0b010, 0x48, 0x03, 64, 0, 0))
    assert one[1] == 0x03  # supported
    harness.good(sanitize(CRYPTO_ERASE))
    assert erased == [True]
    harness.check(sanitize(CRYPTO_ERASE, 8), INVALID_FIELD, bytes(8))
