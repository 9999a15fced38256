"""Framing of PDUs on a byte stream (RFC 7143 §11.2): BHS, AHS, header digest, data
segment, padding to 4 bytes, data digest.

:class:`PduReader` is sans-I/O: feed it bytes as they arrive, take whole PDUs out.
:func:`encode_pdu` turns a PDU into the buffers to write (scatter-gather, no join).
"""

from __future__ import annotations

from ..buffers import uninitialized
from ..errors import IscsiVmtargetError
from .digest import DIGEST_LEN, crc32c, digest_bytes, unpack_digest
from .pdu import BHS_LEN, Payload, Pdu, RawPdu, peek_lengths

_PAD = (b"", b"\x00\x00\x00", b"\x00\x00", b"\x00")


def pad_len(n: int) -> int:
    """Bytes of padding after a segment of ``n`` bytes (§11.2.3)."""
    return -n & 3


class FramingError(IscsiVmtargetError):
    """The stream cannot be resynchronised: the connection must be dropped."""


#: Opcodes whose large data segments are received in place (:class:`PduReader`):
#: SCSI Command (immediate data) and SCSI Data-Out, the medium's data (§11.3, §11.7).
_IN_PLACE_OPCODES = frozenset({0x01, 0x05})
#: The smallest data segment received in place: below it a copy costs less.
IN_PLACE_MIN = 8192
_MIN_FREE = 64 << 10  # room offered to the socket at least, per receive


class _Segment:
    """The data segment (with padding and data digest) of the PDU being received in
    place, and its header."""

    __slots__ = ("ahs", "bhs", "buf", "data_len", "filled")

    def __init__(self, bhs: bytes, ahs: bytes, data_len: int, size: int) -> None:
        self.bhs, self.ahs, self.data_len = bhs, ahs, data_len
        self.buf = uninitialized(size)  # filled whole before it is framed
        self.filled = 0


class PduReader:
    """Cuts a TCP byte stream into :class:`RawPdu` s.

    Bytes come in two ways. :meth:`feed` copies them in. :meth:`get_buffer` and
    :meth:`buffer_updated` (as asyncio's ``BufferedProtocol``) let the socket receive
    into the reader's own buffer, and, once a SCSI Command's or Data-Out's header is in
    and its data segment (``IN_PLACE_MIN`` bytes or more) is not, straight into a
    buffer of that segment's own, which becomes the PDU's ``data``: the medium's data
    is not copied in this process on its way to the backend.

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
        self._buf = bytearray(2 * _MIN_FREE)
        self._pos = 0
        self._end = 0
        self._segment: _Segment | None = None  # being received in place
        self._want = 0  # the whole of the PDU at _pos, once its header is in

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes received, copied in."""
        with memoryview(data) as view:
            view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
            while view:
                room = self.get_buffer()
                n = min(len(room), len(view))
                room[:n] = view[:n]
                room.release()
                self.buffer_updated(n)
                view = view[n:]

    def get_buffer(self) -> memoryview:
        """Where the next bytes received go: the in-place segment's unfilled part, or
        free room in the reader's buffer (at least ``_MIN_FREE`` bytes and enough for
        the whole PDU whose header is in). Hand them over with :meth:`buffer_updated`."""
        seg = self._segment
        if seg is not None and seg.filled < len(seg.buf):
            return memoryview(seg.buf)[seg.filled :]
        if self._pos == self._end:
            self._pos = self._end = 0
        need = max(_MIN_FREE, self._want - (self._end - self._pos))
        if len(self._buf) - self._end < need:
            self._make_room(need)
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were received into the last :meth:`get_buffer`'s buffer."""
        seg = self._segment
        if seg is not None and seg.filled < len(seg.buf):
            seg.filled += nbytes
        else:
            self._end += nbytes

    def _make_room(self, need: int) -> None:
        """Free room for ``need`` more bytes: the unframed bytes move to the front, or
        to a larger buffer (never a resize: the socket may hold a view)."""
        left = self._end - self._pos
        if left + need <= len(self._buf) and self._pos:
            buf = self._buf
            buf[:left] = buf[self._pos : self._end]  # same length: no resize
        else:
            buf = bytearray(max(2 * len(self._buf), left + need))
            buf[:left] = self._buf[self._pos : self._end]
            self._buf = buf
        self._pos, self._end = 0, left

    @property
    def buffered(self) -> int:
        seg = self._segment
        return self._end - self._pos + (seg.filled if seg is not None else 0)

    def next_pdu(self) -> RawPdu | None:
        """The next complete PDU, or None when more bytes are needed."""
        seg = self._segment
        if seg is not None:
            return self._segment_pdu(seg) if seg.filled == len(seg.buf) else None
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
            head = BHS_LEN + ahs_len + hd
            total = head + data_len + pad + dd
            if avail < total:
                if (
                    data_len >= IN_PLACE_MIN
                    and avail >= head
                    and bhs[0] & 0x3F in _IN_PLACE_OPCODES
                ):
                    self._start_segment(view, bhs, ahs_len, data_len + pad + dd)
                else:
                    self._want = total
                return None
            p = pos + BHS_LEN
            ahs = bytes(view[p : p + ahs_len]) if ahs_len else b""
            p += ahs_len
            if hd:
                self._check_header(buf, p, bhs, ahs)
                p += hd
            data = bytes(view[p : p + data_len]) if data_len else b""
        p += data_len + pad
        bad = False
        if dd:
            bad = unpack_digest(buf, p)[0] != crc32c(_PAD[data_len & 3], crc32c(data))
        self._pos = pos + total
        self._want = 0
        return RawPdu(bhs=bhs, ahs=ahs, data=data, digest_error=bad)

    def _check_header(self, buf: bytearray, at: int, bhs: bytes, ahs: bytes) -> None:
        expected = crc32c(ahs, crc32c(bhs)) if ahs else crc32c(bhs)
        if unpack_digest(buf, at)[0] != expected:
            raise FramingError("header digest mismatch")

    def _start_segment(self, view: memoryview, bhs: bytes, ahs_len: int, size: int) -> None:
        """The PDU at ``_pos`` has its header in, not all its data segment: the rest
        of it is received into a buffer of its own (what is here already copied)."""
        p = self._pos + BHS_LEN
        ahs = bytes(view[p : p + ahs_len]) if ahs_len else b""
        p += ahs_len
        if self.header_digest:  # checked before any of its data is taken in
            self._check_header(self._buf, p, bhs, ahs)
            p += DIGEST_LEN
        seg = _Segment(bhs, ahs, (bhs[5] << 16) | (bhs[6] << 8) | bhs[7], size)
        have = self._end - p
        seg.buf[:have] = view[p : self._end]
        seg.filled = have
        self._pos = self._end = 0  # all that came after the header was its segment's
        self._want = 0
        self._segment = seg

    def _segment_pdu(self, seg: _Segment) -> RawPdu:
        """The PDU received in place, now whole."""
        self._segment = None
        n = seg.data_len
        buf = seg.buf
        data: bytearray | memoryview = buf if len(buf) == n else memoryview(buf)[:n]
        bad = False
        if self.data_digest:
            bad = unpack_digest(buf, len(buf) - DIGEST_LEN)[0] != crc32c(
                _PAD[n & 3], crc32c(data)
            )
        return RawPdu(bhs=seg.bhs, ahs=seg.ahs, data=data, digest_error=bad)


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
