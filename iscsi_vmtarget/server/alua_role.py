"""The ALUA owner role of an RBD LUN whose non-owners are active/non-optimized
(``server/rbd_gateway.py``), taken by compare-and-swap.

The role is a record ``GROUP ADDRESS`` (the holder's target port group and client
address; empty: nobody holds it), the body of the RADOS object
``iscsi_vmtarget.alua.<image id>`` beside the image. A gateway takes the role with a
:class:`~iscsi_vmtarget.storage.rados_object.VersionedObject` swap based on the version
it read: when several gateways find the holder dead at the same moment, each fences it
and writes itself, and the OSD lets exactly one write through (the others' version
assertion, or exclusive create, fails); the others read the winner and stay
active/non-optimized. Image metadata, where earlier versions kept the record
(:data:`OWNER_KEY`), has no conditional write; it is still read while the object does
not exist, so a gateway upgraded in place sees who held the role before.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..storage.rados_object import VersionedObject
from ..storage.rbd import RbdBackend, role_object_name

#: Image metadata key naming the target port group of the gateway owning the image
#: (standby mode; earlier versions kept the active/non-optimized role's record there
#: too, with the client address after a space).
OWNER_KEY = "iscsi_vmtarget.alua.owner"

#: The largest record read ("GROUP ADDRESS": a group number and a client address).
_MAX_RECORD = 512


def parse_record(record: bytes | None) -> tuple[int | None, str | None]:
    """(group, client address) of a role record; the address is None in a record of
    the standby mode, both are None when there is no record."""
    group, _, address = (record or b"").decode(errors="replace").partition(" ")
    return (int(group) if group.isdigit() else None), (address or None)


@dataclass(frozen=True)
class Holder:
    """Who holds the role, as read: ``version`` is the object's (None: no object yet,
    the record came from the image metadata, if any)."""

    group: int | None
    address: str | None
    version: int | None


class OwnerRole:
    """The owner role of the LU on ``backend``'s image."""

    def __init__(self, backend: RbdBackend) -> None:
        self._object = VersionedObject(backend, role_object_name(backend.image_id), _MAX_RECORD)
        self._legacy = backend.metadata_store(OWNER_KEY)
        backend.on_close(self._object.close)

    def holder(self) -> Holder:
        """The holder now (one read; a second, of the image metadata, while the object
        does not exist)."""
        version, record = self._object.read()
        if version is None:
            record = self._legacy.load()
        return Holder(*parse_record(record), version)

    def take(self, group: int, address: str, seen: Holder) -> bool:
        """Record ``group`` and ``address`` as the holder if the role is still as
        ``seen``; False when another gateway changed it first (nothing written)."""
        return self._object.swap(f"{group} {address}".encode(), seen.version) is not None

    def give_up(self, group: int, address: str) -> None:
        """Clear the record if it still names ``group`` and ``address``."""
        seen = self.holder()
        if (seen.group, seen.address) == (group, address) and seen.version is not None:
            self._object.swap(b"", seen.version)
