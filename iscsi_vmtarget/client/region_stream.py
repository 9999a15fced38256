"""Streams through a region LUN of the hypervisor view (issue 14): ``push`` a whole
image (a QEMU migration stream, a machine description) and record its length in the
LUN's stream descriptor (its last 4 KiB, :mod:`iscsi_vmtarget.vm.region_backend`);
``pull`` it back, exactly those bytes."""

from __future__ import annotations

from typing import BinaryIO

from ..vm.layers.region_backend import DESCRIPTOR_BYTES, decode_descriptor, encode_descriptor
from .initiator import InitiatorError
from .remote import RemoteLun

_PIECE = 1 << 20


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
    image = bytearray()
    while len(image) <= capacity:
        piece = source.read(_PIECE)
        if not piece:
            break
        image += piece
    if len(image) > capacity:
        raise StreamError(
            f"the stream is larger than the {region} region's {capacity} bytes "
            f"({remote.what}); nothing was written, the previous image is kept"
            + (" (grow it with 'vm resize --memory')" if region == "state" else "")
        )
    length = len(image)
    image += bytes(-length % remote.block_size)  # whole blocks
    view = memoryview(image)
    for pos in range(0, len(view), _PIECE):
        remote.write(pos, view[pos : pos + _PIECE])
    remote.flush()  # the image is durable before the descriptor records it
    remote.write(capacity, encode_descriptor(length))
    remote.flush()
    return length


def pull(remote: RemoteLun, sink: BinaryIO) -> int:
    """Copy the image ``remote`` records to ``sink``; its length."""
    capacity = capacity_of(remote)
    length = decode_descriptor(remote.read(capacity, DESCRIPTOR_BYTES))
    if length is None or length > capacity:
        raise StreamError(f"{remote.what} records no image (no stream descriptor)")
    done = 0
    while done < length:
        n = min(_PIECE, length - done)
        piece = remote.read(done, -(-n // remote.block_size) * remote.block_size)
        sink.write(piece[:n])
        done += n
    sink.flush()
    return length
