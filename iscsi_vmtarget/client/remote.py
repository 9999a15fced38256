"""A LUN of a remote iSCSI target as a block backend: what ``vm replicate`` writes to.

:class:`RemoteLun` offers the :class:`~iscsi_vmtarget.storage.backend.BlockBackend`
methods (byte offsets, whole blocks) over our own :class:`~.initiator.Initiator`:
READ(16), WRITE(16), WRITE SAME(16) and SYNCHRONIZE CACHE(16) (SBC-3 §5), so code that
writes a unit or a replica to a local file writes it to another target unchanged.
:func:`parse_url` reads libiscsi's URL form and :func:`open_lun` logs in, turning every
way a destination can refuse into one sentence an operator can act on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..errors import IscsiVmtargetError
from ..iscsi.names import IscsiNameError, normalize_name
from ..iscsi.pdu import Payload
from .initiator import (
    ILLEGAL_REQUEST,
    Initiator,
    InitiatorError,
    LoginFailed,
    ScsiCommandError,
)
from .window import DEPTH, read_window, write_window

DEFAULT_PORT = 3260
#: Bytes per READ/WRITE command: 1 MiB, a MaxBurstLength every target accepts.
MAX_IO = 1 << 20
#: Blocks per WRITE SAME: our Block Limits MAXIMUM WRITE SAME LENGTH (SBC-3 §6.5.3).
MAX_WRITE_SAME = 0xFFFF

_URL = re.compile(
    r"^iscsi://(?:(?P<user>[^%@/]+)(?:%(?P<secret>[^@/]*))?@)?"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^:/\[\]]+)(?::(?P<port>\d+))?"
    r"/(?P<iqn>[^/]+?)(?:/(?P<lun>\d+))?/?$"
)

#: Login status details of class 2 (initiator error, RFC 7143 §11.13.5) in words.
_LOGIN_REFUSED = {
    0x01: "authentication failed (check --chap-user/--chap-secret)",
    0x02: "this initiator is not authorized (add an ACL for it on the destination)",
    0x03: "no such target there",
    0x04: "the target was removed",
}


class UrlError(IscsiVmtargetError, ValueError):
    """A destination URL that is not ``iscsi://HOST[:PORT]/IQN[/LUN]``."""


@dataclass(frozen=True)
class LunUrl:
    """A parsed ``iscsi://[USER[%SECRET]@]HOST[:PORT]/IQN[/LUN]`` (libiscsi's form)."""

    host: str
    port: int
    iqn: str
    lun: int
    user: str | None = None
    secret: str | None = None

    def __str__(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"iscsi://{host}:{self.port}/{self.iqn}/{self.lun}"


def parse_url(text: str) -> LunUrl:
    match = _URL.match(text.strip())
    if match is None:
        raise UrlError(f"bad destination URL {text!r}: want iscsi://HOST[:PORT]/IQN[/LUN]")
    port = int(match["port"] or DEFAULT_PORT)
    lun = int(match["lun"] or 0)
    if not 0 < port < 65536:
        raise UrlError(f"bad destination URL {text!r}: port {port} is out of range")
    try:
        normalize_name(match["iqn"])  # the rules login applies (RFC 7143 §4.2.7)
    except IscsiNameError as exc:
        raise UrlError(
            f"bad destination URL {text!r}: {match['iqn']!r} is not a target name: it {exc}"
        ) from exc
    return LunUrl(
        host=match["host"].strip("[]"),
        port=port,
        iqn=match["iqn"],
        lun=lun,
        user=match["user"],
        secret=match["secret"],
    )


class RemoteLun:
    """One LUN of a logged-in session, seen as a block backend."""

    def __init__(self, initiator: Initiator, lun: int, what: str) -> None:
        self.initiator = initiator
        self.lun = lun
        self.what = what
        blocks, self.block_size = initiator.read_capacity16(lun)
        self._size = blocks * self.block_size
        self.bytes_written = 0  # payload bytes of WRITE(16) (what a round sends)
        self._unmap_mode = 2  # 2: WRITE SAME with UNMAP, 1: WRITE SAME of zeros, 0: WRITE

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return False

    def _blocks(self, offset: int, length: int) -> tuple[int, int]:
        bs = self.block_size
        if offset % bs or length % bs or offset < 0 or offset + length > self._size:
            raise ValueError(
                f"{self.what}: {length} bytes at {offset} are not whole {bs}-byte blocks "
                f"inside its {self._size} bytes"
            )
        return offset // bs, length // bs

    def read(self, offset: int, length: int) -> bytearray:
        lba, blocks = self._blocks(offset, length)
        out = bytearray()
        step = MAX_IO // self.block_size
        for first in range(0, blocks, step):
            n = min(step, blocks - first)
            out += self.initiator.read16(lba + first, n, self.block_size, self.lun)
        return out

    def read_into(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.read(offset, len(buf))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        lba, _ = self._blocks(offset, len(view))
        for pos in range(0, len(view), MAX_IO):
            piece = view[pos : pos + MAX_IO]  # a view: the PDUs copy it once, into frames
            self.initiator.write16(lba + pos // self.block_size, piece, self.block_size, self.lun)
            self.bytes_written += len(piece)

    def write_stream(self, offset: int, pieces: Iterable[Payload], depth: int = DEPTH) -> int:
        """Write ``pieces`` one after the other from ``offset`` (each whole blocks, at
        most MAX_IO bytes: one WRITE(16)), ``depth`` commands in flight; the bytes
        written."""

        def placed() -> Iterator[tuple[int, Payload]]:
            pos = offset
            for piece in pieces:
                n = memoryview(piece).nbytes
                if n > MAX_IO:
                    raise ValueError(f"{self.what}: a {n}-byte piece is over {MAX_IO} bytes")
                yield self._blocks(pos, n)[0], piece
                pos += n

        written = write_window(
            self.initiator, self.lun, self.block_size, placed(), depth, f" of {self.what}"
        )
        self.bytes_written += written
        return written

    def read_stream(self, offset: int, length: int, depth: int = DEPTH) -> Iterator[bytes]:
        """``length`` bytes (whole blocks) from ``offset`` in MAX_IO pieces, in order,
        ``depth`` READ(16)s in flight."""
        lba, blocks = self._blocks(offset, length)
        step = MAX_IO // self.block_size
        ranges = ((lba + n, min(step, blocks - n)) for n in range(0, blocks, step))
        return read_window(
            self.initiator, self.lun, self.block_size, ranges, depth, f" of {self.what}"
        )

    def unmap(self, offset: int, length: int) -> None:
        """Make a range read as zeros: WRITE SAME(16) with UNMAP where the LU is thin,
        WRITE SAME of a zero block where it is not, plain zeros where neither works."""
        lba, blocks = self._blocks(offset, length)
        done = 0
        while done < blocks:
            n = min(MAX_WRITE_SAME, blocks - done)
            if self._unmap_mode:
                try:
                    self.initiator.write_same16(
                        lba + done, n, self.block_size, self.lun, unmap=self._unmap_mode == 2
                    )
                except ScsiCommandError as exc:
                    if exc.sense[0] != ILLEGAL_REQUEST:
                        raise
                    self._unmap_mode -= 1  # not supported here: the next way down
                    continue
            else:  # WRITE(16)s of zeros, MAX_IO bytes at most
                step = MAX_IO // self.block_size
                zeros = memoryview(bytes(min(n, step) * self.block_size))
                for first in range(lba + done, lba + done + n, step):
                    count = min(step, lba + done + n - first)
                    self.initiator.write16(
                        first, zeros[: count * self.block_size], self.block_size, self.lun
                    )
            done += n

    def flush(self) -> None:
        self.initiator.synchronize_cache16(self.lun)

    def resize(self, size: int) -> None:
        raise InitiatorError(f"{self.what}: a remote LUN is resized on its own target")

    def close(self) -> None:
        try:
            if self.initiator.sock is not None:
                self.initiator.logout()
        except (InitiatorError, OSError):
            pass
        finally:
            self.initiator.close()


def open_lun(
    url: LunUrl,
    *,
    initiator_name: str,
    chap_user: str | None = None,
    chap_secret: str | None = None,
    mutual_secret: str | None = None,
    timeout: float = 60.0,
) -> RemoteLun:
    """Log in to ``url``'s target and open its LUN; InitiatorError saying why not. The
    session takes Data-In segments of up to MAX_IO bytes: a READ(16) of MAX_IO bytes
    comes back as one PDU."""
    user = chap_user or url.user
    secret = chap_secret if chap_secret is not None else url.secret
    initiator = Initiator(
        host=url.host,
        port=url.port,
        initiator_name=initiator_name,
        target_name=url.iqn,
        chap_user=user,
        chap_secret=secret.encode() if secret else None,
        mutual_secret=mutual_secret.encode() if mutual_secret else None,
        timeout=timeout,
        max_recv_data_segment_length=MAX_IO,
    )
    where = f"{url.host}:{url.port}"
    try:
        initiator.connect()
    except OSError as exc:
        raise InitiatorError(
            f"cannot reach the destination {where}: {exc.strerror or exc}"
        ) from exc
    try:
        initiator.login()
        return RemoteLun(initiator, url.lun, f"LUN {url.lun} of {url.iqn}")
    except LoginFailed as exc:
        initiator.close()
        reason = (
            _LOGIN_REFUSED.get(exc.status_detail, f"detail 0x{exc.status_detail:02x}")
            if exc.status_class == 2
            else f"status class 0x{exc.status_class:02x} detail 0x{exc.status_detail:02x}"
        )
        raise InitiatorError(
            f"the destination {where} refused the login of {initiator_name} to {url.iqn}: {reason}"
        ) from exc
    except ScsiCommandError as exc:
        initiator.close()
        if exc.sense[1:] == (0x25, 0x00):  # LOGICAL UNIT NOT SUPPORTED
            raise InitiatorError(f"{url.iqn} at {where} has no LUN {url.lun}") from exc
        raise
    except (InitiatorError, OSError) as exc:
        initiator.close()
        raise InitiatorError(f"login to {url.iqn} at {where} failed: {exc}") from exc
