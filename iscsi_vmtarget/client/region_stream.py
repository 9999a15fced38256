"""Streams through a region LUN of the hypervisor view (issue 14): ``push`` a whole
image (a QEMU migration stream, a machine description) and record its length in the
LUN's stream descriptor (its last 4 KiB, :mod:`iscsi_vmtarget.vm.region_backend`);
``pull`` it back, exactly those bytes. Both keep several 1 MiB commands in flight
(:mod:`.window`), so the target seals or opens one while the next is on the wire."""

from __future__ import annotations

from typing import BinaryIO

from ..vm.layers.region_backend import DESCRIPTOR_BYTES, decode_descriptor, encode_descriptor
from .initiator import InitiatorError
from .remote import MAX_IO, RemoteLun

_PIECE = MAX_IO  # bytes per command


class StreamError(InitiatorError):
    """A stream the region cannot take, or a LUN holding no recorded stream."""


def capacity_of(remote: RemoteLun) -> int:
    """Image bytes the LUN holds: all but its stream descriptor."""
    if remote.size <= DESCRIPTOR_BYTES:
        raise StreamError(f"{remote.what} is no region LUN (only {remote.size} bytes)")
    return remote.size - DESCRIPTOR_BYTES


def push(remote: RemoteLun, source: BinaryIO, region: str = "state") -> int:
    """Copy ``source`` whole to ``remote`` and record its length; StreamError (nothing
    written) if it is larger than the region."""
    capacity = capacity_of(remote)
    pieces: list[bytes] = []  # one WRITE(16) each: sent as read, never joined
    length = 0
    while length <= capacity:
        piece = _read_full(source, _PIECE)
        if not piece:
            break
        pieces.append(piece)
        length += len(piece)
    if length > capacity:
        raise StreamError(
            f"the stream is larger than the {region} region's {capacity} bytes "
            f"({remote.what}); nothing was written, the previous image is kept"
            + (" (grow it with 'vm resize --memory')" if region == "state" else "")
        )
    if pieces and len(pieces[-1]) % remote.block_size:  # whole blocks
        pieces[-1] += bytes(-len(pieces[-1]) % remote.block_size)
    remote.write_stream(0, pieces)
    remote.flush()  # the image is durable before the descriptor records it
    remote.write(capacity, encode_descriptor(length))
    remote.flush()
    return length


def _read_full(source: BinaryIO, size: int) -> bytes:
    """``size`` bytes of ``source``, fewer only at its end (a pipe may return less)."""
    piece = source.read(size)
    while piece and len(piece) < size:
        more = source.read(size - len(piece))
        if not more:
            break
        piece += more
    return piece


def pull(remote: RemoteLun, sink: BinaryIO) -> int:
    """Copy the image ``remote`` records to ``sink``; its length."""
    capacity = capacity_of(remote)
    length = decode_descriptor(remote.read(capacity, DESCRIPTOR_BYTES))
    if length is None or length > capacity:
        raise StreamError(f"{remote.what} records no image (no stream descriptor)")
    whole = -(-length // remote.block_size) * remote.block_size
    done = 0
    for piece in remote.read_stream(0, whole):
        n = min(len(piece), length - done)
        sink.write(piece if n == len(piece) else memoryview(piece)[:n])
        done += n
    sink.flush()
    return length
