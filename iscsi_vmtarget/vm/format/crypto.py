"""Keys and authenticated encryption for the hidden regions of a unit.

Choice (issue 4): **AES-256-GCM per 64 KiB chunk**, with a fresh random 96-bit nonce
for every chunk written (NIST SP 800-38D §8.2.2) and, as associated data, the unit
UUID, the region kind, the chunk index, the region's generation and the plaintext
length. A flipped byte fails the tag; a chunk copied from another unit, another
region, another index or an older generation fails it too, so a tampered or swapped
chunk is an :class:`IntegrityError`, never wrong bytes. GCM is what ``cryptography``
accelerates with AES-NI and is the AEAD storage systems use per block (dm-crypt's
``aes-gcm-random``, LUKS2 integrity); random nonces keep it safe when a unit is later
copied (snapshot, clone) and both copies are written.

Each unit has its own 256-bit **data key**, stored in the unit header wrapped with the
AES Key Wrap of RFC 3394 (``cryptography``'s ``aes_key_wrap``; RFC 5649 padding is not
needed for a 32-byte key) under the operator's **master key**. The master key is 32
random bytes in a key file created with mode 0600 on first use. Rotation re-wraps each
data key under a new master key, without touching the encrypted data.

A **key id** (8 bytes of HMAC-SHA256 of the master key) is stored next to the wrapped
key, so a wrong key file is named as such instead of failing an unwrap mysteriously.
"""

from __future__ import annotations

import hmac
import os
import stat
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)

from ...storage import atomic_file
from .. import faults
from ..vm_errors import IntegrityError, KeyFileError

KEY_FILE_HEADER: Final = "iscsi-vmtarget master key v1"
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
_AAD = struct.Struct("<16s16sBQQI")
_INTO: Final = hasattr(AESGCM, "encrypt_into")  # cryptography >= 45: no output copy
_AAD_LABEL: Final = b"iscsi-vmtarget/1"

RandomSource = Callable[[int], bytes]


def key_id_of(key: bytes) -> bytes:
    """The 8-byte id of a master key (HMAC-SHA256 under the key of a fixed label)."""
    return hmac.new(key, b"iscsi-vmtarget key id v1", "sha256").digest()[:8]


@dataclass(frozen=True)
class MasterKey:
    key: bytes
    path: str

    @property
    def key_id(self) -> bytes:
        return key_id_of(self.key)

    def wrap(self, data_key: bytes) -> bytes:
        """RFC 3394 AES Key Wrap of ``data_key`` (40 bytes for a 32-byte key)."""
        return aes_key_wrap(self.key, data_key)


def create_key_file(path: str, random: RandomSource = os.urandom) -> MasterKey:
    """Create a new key file (mode 0600, never overwriting one) holding a fresh key.

    The file appears whole or not at all: the key is written and synced under a
    temporary name, then hard-linked to ``path`` (which fails if ``path`` exists). A
    kill -9 between creating and writing the file used to leave an empty key file
    that every later command, and the rotation meant to finish, refused to load."""
    if os.path.exists(path):
        raise KeyFileError(f"key file {path!r} already exists; not overwriting it")
    key = random(KEY_BYTES)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    prefix = f".{os.path.basename(path)}.tmp-"
    for stale in (n for n in os.listdir(directory) if n.startswith(prefix)):
        os.unlink(os.path.join(directory, stale))  # a key no unit was ever wrapped with
    try:
        atomic_file.create_file(
            path,
            f"{KEY_FILE_HEADER}\n{key.hex()}\n".encode(),
            tmp=os.path.join(directory, f"{prefix}{os.getpid()}"),
            mode=0o600,  # whatever the umask said
            before_link=lambda: faults.crashpoint("key.written"),
        )
    except FileExistsError:
        raise KeyFileError(f"key file {path!r} already exists; not overwriting it") from None
    return MasterKey(key, path)


def load_key_file(path: str) -> MasterKey:
    """Read a key file; KeyFileError if missing, malformed or readable by others."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyFileError(
            f"no key file at {path!r} (it is created by the first 'vm create'; "
            "give --key-file if it lives elsewhere)"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path!r}: {exc.strerror}") from exc
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    if mode & 0o077:
        raise KeyFileError(
            f"key file {path!r} has mode {mode:04o}: others may read it; chmod 600 it"
        )
    lines = data.decode("ascii", "replace").splitlines()
    if len(lines) != 2 or lines[0] != KEY_FILE_HEADER or len(lines[1]) != 2 * KEY_BYTES:
        raise KeyFileError(f"{path!r} is not an iscsi-vmtarget key file")
    try:
        key = bytes.fromhex(lines[1])
    except ValueError:
        raise KeyFileError(f"{path!r} is not an iscsi-vmtarget key file") from None
    return MasterKey(key, path)


def pending_path(path: str) -> str:
    """Where ``key rotate`` keeps the new key until every unit is re-wrapped."""
    return path + ".new"


class Keyring:
    """The master key of a key file, plus the new key of an unfinished rotation.

    During ``key rotate`` some units are wrapped by the old key and some by the new
    one; both files exist until the rotation finishes, and either unwraps.
    """

    def __init__(self, keys: list[MasterKey]) -> None:
        self.keys = keys

    @classmethod
    def load(cls, path: str, *, create: bool = False) -> Keyring:
        """Load ``path`` (and ``path.new`` if a rotation was interrupted); with
        ``create``, make a new key file when none exists."""
        if create and not os.path.exists(path) and not os.path.exists(pending_path(path)):
            return cls([create_key_file(path)])
        keys = []
        if os.path.exists(path) or not os.path.exists(pending_path(path)):
            keys.append(load_key_file(path))
        if os.path.exists(pending_path(path)):
            keys.append(load_key_file(pending_path(path)))
        return cls(keys)

    @property
    def current(self) -> MasterKey:
        """The key new units are wrapped with (the new one during a rotation)."""
        return self.keys[-1]

    def find(self, key_id: bytes) -> MasterKey | None:
        for key in self.keys:
            if key.key_id == key_id:
                return key
        return None

    def unwrap(self, key_id: bytes, wrapped: bytes, what: str) -> bytes:
        """The data key of ``what``; KeyFileError naming both key ids when it is wrapped
        by another master key."""
        key = self.find(key_id)
        if key is None:
            held = ", ".join(f"{k.key_id.hex()} ({k.path})" for k in self.keys)
            raise KeyFileError(
                f"{what} is sealed by master key {key_id.hex()}, but the key file holds "
                f"{held}: wrong key file (give the right one with --key-file)"
            )
        try:
            return aes_key_unwrap(key.key, wrapped)
        except InvalidUnwrap:
            raise KeyFileError(
                f"{what}: its wrapped data key does not unwrap under master key "
                f"{key_id.hex()} (header damaged or tampered)"
            ) from None


class RegionCipher:
    """AES-256-GCM for the chunks of one encrypted region of one unit."""

    def __init__(
        self,
        data_key: bytes,
        unit_uuid: uuid.UUID,
        kind: int,
        random: RandomSource = os.urandom,
    ) -> None:
        self._aead = AESGCM(data_key)
        self._unit = unit_uuid.bytes
        self._kind = kind
        self._random = random

    def _aad(self, index: int, generation: int, length: int) -> bytes:
        return _AAD.pack(_AAD_LABEL, self._unit, self._kind, index, generation, length)

    def seal(self, index: int, generation: int, plaintext: bytes) -> tuple[bytes, bytes, bytes]:
        """(nonce, ciphertext, tag) of chunk ``index`` of ``generation``."""
        nonce = self._random(NONCE_BYTES)
        out = self._aead.encrypt(nonce, plaintext, self._aad(index, generation, len(plaintext)))
        return nonce, out[:-TAG_BYTES], out[-TAG_BYTES:]

    def nonces(self, count: int) -> list[bytes]:
        """``count`` fresh random nonces for :meth:`seal_into`, from one draw."""
        pool = self._random(NONCE_BYTES * count)
        return [pool[i : i + NONCE_BYTES] for i in range(0, NONCE_BYTES * count, NONCE_BYTES)]

    def seal_into(
        self,
        index: int,
        generation: int,
        plaintext: bytes | memoryview,
        out: memoryview,
        nonce: bytes | None = None,
    ) -> tuple[bytes, bytes]:
        """Like :meth:`seal`, the ciphertext written to ``out`` (``len(plaintext) +
        TAG_BYTES`` bytes: the tag lands in its last ones, scratch for the caller):
        (nonce, tag). One copy less, and no allocation, with cryptography >= 45.
        ``nonce``: one of :meth:`nonces` (used once), else a fresh one."""
        nonce = nonce or self._random(NONCE_BYTES)
        aad = self._aad(index, generation, len(plaintext))
        if _INTO:
            self._aead.encrypt_into(nonce, plaintext, aad, out)
        else:
            out[:] = self._aead.encrypt(nonce, plaintext, aad)
        return nonce, bytes(out[len(plaintext) :])

    def open_into(
        self, index: int, generation: int, nonce: bytes, sealed: memoryview, out: memoryview,
        what: str,
    ) -> None:  # fmt: skip
        """Like :meth:`open`, ``sealed`` being ciphertext + tag, the plaintext written to
        ``out`` (zeroed again if it does not authenticate)."""
        aad = self._aad(index, generation, len(out))
        try:
            if _INTO:
                self._aead.decrypt_into(nonce, sealed, aad, out)
            else:
                out[:] = self._aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            out[:] = bytes(len(out))  # no unauthenticated byte leaves
            raise _unauthentic(what, index) from None

    def open(
        self, index: int, generation: int, nonce: bytes, ciphertext: bytes, tag: bytes, what: str
    ) -> bytes:
        try:
            return self._aead.decrypt(
                nonce, ciphertext + tag, self._aad(index, generation, len(ciphertext))
            )
        except InvalidTag:
            raise _unauthentic(what, index) from None


def _unauthentic(what: str, index: int) -> IntegrityError:
    return IntegrityError(
        f"{what}: chunk {index} failed authentication (tampered, swapped or "
        "corrupted); refusing to return its bytes"
    )


def new_data_key(random: RandomSource = os.urandom) -> bytes:
    return random(KEY_BYTES)
