"""Keys and sealed regions: key files, wrapping, rotation, tampering and swapping."""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

import pytest

from iscsi_vmtarget.storage import MemoryBackend
from iscsi_vmtarget.vm.format.crypto import (
    Keyring,
    RegionCipher,
    create_key_file,
    key_id_of,
    load_key_file,
)
from iscsi_vmtarget.vm.format.header import Region, RegionKind
from iscsi_vmtarget.vm.format.sealed import (
    CHUNK,
    capacity,
    length_for,
    read_chunks,
    table_bytes,
    write_chunks,
)
from iscsi_vmtarget.vm.vm_errors import IntegrityError, KeyFileError

UNIT = uuid.UUID("11111111-2222-4333-8444-555555555555")
MIB = 1 << 20


def test_key_file_is_created_0600_and_never_overwritten(tmp_path: Path) -> None:
    path = str(tmp_path / "k" / "master.key")
    key = create_key_file(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_key_file(path).key == key.key and len(key.key) == 32
    with pytest.raises(KeyFileError, match="already exists"):
        create_key_file(path)
    assert load_key_file(path).key == key.key


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "master.key")
    create_key_file(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_key_file(path)


@pytest.mark.parametrize("content", [b"", b"hello\n", b"iscsi-vmtarget master key v1\nzz\n"])
def test_malformed_key_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "master.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="not an iscsi-vmtarget key file"):
        load_key_file(str(path))


def test_missing_key_file_is_not_created_by_readers(tmp_path: Path) -> None:
    path = str(tmp_path / "master.key")
    with pytest.raises(KeyFileError, match="no key file"):
        Keyring.load(path)
    assert not os.path.exists(path)


def test_wrong_master_key_is_named(tmp_path: Path) -> None:
    right = create_key_file(str(tmp_path / "a.key"))
    wrong = create_key_file(str(tmp_path / "b.key"))
    wrapped = right.wrap(b"k" * 32)
    assert len(wrapped) == 40  # RFC 3394: n + 8 bytes
    assert Keyring([right]).unwrap(right.key_id, wrapped, "unit x") == b"k" * 32
    with pytest.raises(KeyFileError, match="wrong key file"):
        Keyring([wrong]).unwrap(right.key_id, wrapped, "unit x")
    with pytest.raises(KeyFileError, match="does not unwrap"):  # right id, tampered wrap
        Keyring([right]).unwrap(right.key_id, bytes(40), "unit x")


def test_key_ids_differ_per_key() -> None:
    assert key_id_of(b"a" * 32) != key_id_of(b"b" * 32)


# -- sealed regions ---------------------------------------------------------------------


def _region(used: int, generation: int = 1, length: int = 2 * MIB) -> Region:
    return Region(RegionKind.STATE, MIB, length, True, generation=generation, used=used)


def _pieces(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]


def _sealed(data: bytes) -> tuple[MemoryBackend, Region, RegionCipher]:
    backend = MemoryBackend(4 * MIB)
    region = _region(len(data))
    cipher = RegionCipher(b"d" * 32, UNIT, RegionKind.STATE)
    assert write_chunks(backend, region, 1, cipher, _pieces(data)) == len(data)
    return backend, region, cipher


def test_geometry() -> None:
    assert table_bytes(MIB) == CHUNK and capacity(MIB) == 15 * CHUNK
    for size in (1, CHUNK, MIB, 100 * MIB + 3):
        assert capacity(length_for(size)) >= size and length_for(size) % MIB == 0


def test_round_trip_and_no_plaintext_on_the_medium() -> None:
    data = b"SECRET-MEMORY-PAGE" * 20000
    backend, region, cipher = _sealed(data)
    assert b"".join(read_chunks(backend, region, cipher, "state")) == data
    assert b"SECRET-MEMORY" not in bytes(backend.read(0, backend.size))


@pytest.mark.parametrize("where", ["data", "table-tag", "table-nonce", "table-length"])
def test_one_flipped_byte_is_detected(where: str) -> None:
    data = os.urandom(3 * CHUNK + 100)
    backend, region, cipher = _sealed(data)
    offset = {
        "data": region.offset + table_bytes(region.length) + CHUNK + 17,
        "table-tag": region.offset + 64 + 12,
        "table-nonce": region.offset + 64,
        "table-length": region.offset + 64 + 36,
    }[where]
    backend.write(offset, bytes([backend.read(offset, 1)[0] ^ 0x01]))
    with pytest.raises(IntegrityError, match="chunk 1"):
        b"".join(read_chunks(backend, region, cipher, "state"))


def test_swapped_chunks_are_detected() -> None:
    data = os.urandom(2 * CHUNK)
    backend, region, cipher = _sealed(data)
    base = region.offset + table_bytes(region.length)
    first, second = backend.read(base, CHUNK), backend.read(base + CHUNK, CHUNK)
    entries = backend.read(region.offset, 128)
    backend.write(base, second)
    backend.write(base + CHUNK, first)
    backend.write(region.offset, entries[64:] + entries[:64])  # swap the entries too
    with pytest.raises(IntegrityError, match="chunk 0"):
        b"".join(read_chunks(backend, region, cipher, "state"))


def test_stale_generation_is_detected() -> None:
    data = os.urandom(CHUNK)
    backend, _region1, cipher = _sealed(data)
    newer = _region(len(data), generation=2)
    with pytest.raises(IntegrityError, match="generation 1"):
        b"".join(read_chunks(backend, newer, cipher, "state"))


def test_chunk_from_another_unit_or_region_is_detected() -> None:
    data = os.urandom(CHUNK)
    backend, region, _cipher = _sealed(data)
    for other in (
        RegionCipher(b"d" * 32, uuid.uuid4(), RegionKind.STATE),
        RegionCipher(b"d" * 32, UNIT, RegionKind.CONFIG),
    ):
        with pytest.raises(IntegrityError):
            b"".join(read_chunks(backend, region, other, "state"))


@pytest.mark.parametrize("into", [True, False])  # cryptography >= 45, and older
def test_sealing_into_a_buffer_is_sealing(into: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from iscsi_vmtarget.vm.format import crypto

    monkeypatch.setattr(crypto, "_INTO", into)
    nonces = iter([b"n" * 12, b"n" * 12])
    cipher = RegionCipher(b"d" * 32, UNIT, RegionKind.STATE, lambda n: next(nonces))
    plain = bytes(range(256)) * 16
    nonce, ciphertext, tag = cipher.seal(3, 7, plain)
    out = memoryview(bytearray(len(plain) + 16))
    assert cipher.seal_into(3, 7, plain, out) == (nonce, tag)
    assert bytes(out[: len(plain)]) == ciphertext
    back = memoryview(bytearray(len(plain)))
    cipher.open_into(3, 7, nonce, out, back, "the state region")
    assert bytes(back) == plain
    out[5] ^= 1  # tampered: refused, and nothing of it left in the output
    with pytest.raises(IntegrityError, match="chunk 3 failed authentication"):
        cipher.open_into(3, 7, nonce, out, back, "the state region")
    assert bytes(back) == bytes(len(plain))
