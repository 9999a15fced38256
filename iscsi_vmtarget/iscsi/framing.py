"""Framing of PDUs on a byte stream (RFC 7143 §11.2): BHS, AHS, header digest, data
segment, padding to 4 bytes, data digest.

:class:`PduReader` is sans-I/O: feed it bytes as they arrive, take whole PDUs out.
:func:`encode_pdu` turns a PDU into the buffers to write (scatter-gather, no join).
"""

from __future__ import annotations

from ..errors import IscsiVmtargetError
from .digest import DIGEST_LEN, crc32c, digest_bytes, unpack_digest
from .pdu import BHS_LEN, Payload, Pdu, RawPdu, peek_lengths

_PAD = (b"", b"\x00\x00\x00", b"\x00\x00", b"\x00")


def pad_len(n: int) -> int:
    """Bytes of padding after a segment of ``n`` bytes (§11.2.3)."""
    return -n & 3


class FramingError(IscsiVmtargetError):
    """The stream cannot be resynchronised: the connection must be dropped."""


#: The reader's buffer (allocated at the first receive; larger only for a larger
#: PDU): room for as much as uvloop's own reads take, so several PDUs come in one
#: system call when they are there. 256 KiB per connection.
BUFFER_SIZE = 256 << 10
#: Room offered at least: below it the unframed bytes move to the buffer's front (a
#: move at every receive would copy a partly received 64 KiB PDU again each time).
_MIN_ROOM = 64 << 10


class PduReader:
    """Cuts a TCP byte stream into :class:`RawPdu` s.

    Bytes come in two ways. :meth:`feed` copies them in. :meth:`get_buffer` and
    :meth:`buffer_updated` (as asyncio's ``BufferedProtocol``) let the socket receive
    into the reader's own buffer: no ``bytes`` object per receive to copy again.
    (Receiving a large data segment straight into a buffer of its own was tried: the
    extra receive per PDU cost more than the copy it saved, ``tools/loop-bench``.)

    A header digest mismatch or an oversized data segment is a :class:`FramingError`
    (at ErrorRecoveryLevel 0 the connection is closed, §7.8). A data digest mismatch
    yields the PDU with ``digest_error`` set, so the session can Reject it (§7.8).
    """

    def __init__(
        self,
        max_data_length: int = 8192,
        header_digest: bool = False,
        data_digest: bool = False,
    ) -> None:
        self.max_data_length = max_data_length
        self.header_digest = header_digest
        self.data_digest = data_digest
        # bytes [_pos, _end) of _buf are received and not framed yet. _buf is never
        # resized (the socket may still hold a view of it): replaced when too small.
        self._buf = bytearray()
        self._pos = 0
        self._end = 0
        self._want = 0  # the whole of the PDU at _pos, once its header is in

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes received, copied in."""
        with memoryview(data).cast("B") as view:
            while view:
                room = self.get_buffer()
                n = min(len(room), len(view))
                room[:n] = view[:n]
                room.release()
                self.buffer_updated(n)
                view = view[n:]

    def get_buffer(self) -> memoryview:
        """Where the next bytes received go: free room in the reader's buffer
        (``BUFFER_SIZE``), at least ``_MIN_ROOM`` and enough for the whole PDU whose
        header is in. Hand them over with :meth:`buffer_updated`."""
        if self._pos == self._end:
            self._pos = self._end = 0
        left = self._end - self._pos
        need = max(self._want - left, _MIN_ROOM)
        if len(self._buf) - self._end < need:
            self._make_room(need)
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were received into the last :meth:`get_buffer`'s buffer."""
        self._end += nbytes

    def _make_room(self, need: int) -> None:
        """Free room for ``need`` more bytes: the unframed bytes move to the front, or
        to a larger buffer (never a resize: the socket may hold a view)."""
        left = self._end - self._pos
        old = memoryview(self._buf)
        if left + need <= len(self._buf) and self._pos:
            old[:left] = old[self._pos : self._end]  # one memmove, no resize
        else:
            buf = bytearray(max(BUFFER_SIZE, left + need))
            buf[:left] = old[self._pos : self._end]
            self._buf = buf
        old.release()
        self._pos, self._end = 0, left

    @property
    def buffered(self) -> int:
        return self._end - self._pos

    @property
    def capacity(self) -> int:
        """Bytes the reader's buffer holds allocated (the connection's memory)."""
        return len(self._buf)

    def next_pdu(self) -> RawPdu | None:
        """The next complete PDU, or None when more bytes are needed."""
        buf = self._buf
        pos = self._pos
        avail = self._end - pos
        if avail < BHS_LEN:
            return None
        # One copy of each part, out of a view (a bytearray slice would copy twice).
        with memoryview(buf) as view:
            bhs = bytes(view[pos : pos + BHS_LEN])
            ahs_len, data_len = peek_lengths(bhs)
            if data_len > self.max_data_length:
                raise FramingError(
                    f"data segment of {data_len} bytes exceeds MaxRecvDataSegmentLength "
                    f"{self.max_data_length}"
                )
            hd = DIGEST_LEN if self.header_digest else 0
            dd = DIGEST_LEN if (self.data_digest and data_len) else 0
            pad = -data_len & 3  # pad_len(), inline
            total = BHS_LEN + ahs_len + hd + data_len + pad + dd
            if avail < total:
                self._want = total
                return None
            p = pos + BHS_LEN
            ahs = bytes(view[p : p + ahs_len]) if ahs_len else b""
            p += ahs_len
            if hd:
                expected = crc32c(ahs, crc32c(bhs)) if ahs else crc32c(bhs)
                if unpack_digest(buf, p)[0] != expected:
                    raise FramingError("header digest mismatch")
                p += hd
            data = bytes(view[p : p + data_len]) if data_len else b""
        p += data_len + pad
        bad = False
        if dd:
            bad = unpack_digest(buf, p)[0] != crc32c(_PAD[data_len & 3], crc32c(data))
        self._pos = pos + total
        self._want = 0
        return RawPdu(bhs=bhs, ahs=ahs, data=data, digest_error=bad)


def encode_pdu(pdu: Pdu, header_digest: bool = False, data_digest: bool = False) -> list[Payload]:
    """The buffers that put ``pdu`` on the wire, in order (no joining of payload)."""
    bhs = pdu.encode_bhs()
    return frame(bhs + pdu.ahs if pdu.ahs else bhs, pdu.data, header_digest, data_digest)


def frame(head: bytes, data: Payload, header_digest: bool, data_digest: bool) -> list[Payload]:
    """The wire buffers of an encoded BHS (+ AHS) and its data segment: header digest,
    padding to 4 bytes and data digest added (§11.2, §13.1)."""
    if header_digest:
        head += crc32c(head).to_bytes(DIGEST_LEN, "little")
    n = len(data)
    if not n:
        return [head]
    pad = _PAD[n & 3]
    tail = pad + digest_bytes(data, pad) if data_digest else pad
    return [head, data, tail] if tail else [head, data]
