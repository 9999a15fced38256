"""Discovery: find every VM in a set of pools from the units alone (US 9,354,927: "a virtual
machine management system can efficiently and automatically discover virtual machines
by examining visible network storage units").

The procedure of US 9,354,927, step for step: list the candidates of every pool; keep those
whose header carries the marker and a valid checksum; take each base unit, read the
secondary-disk designators it names and attach the units that carry them, removing
them from the list; what remains is listed apart - secondaries no base names
(orphans), units with our marker but no valid header (damaged) and everything else
(foreign). Delta layers and snapshot records (:mod:`..operations.snapshot`) are claimed by the
base unit they name as owner, so a VM's snapshots are found from its units alone.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from ..format.header import RegionKind, Role, UnitHeader
from ..vm_errors import ForeignUnitError, FormatError, NewerFormatError, VmError
from .unit import Unit
from .unit_pools import Pool, UnitRef

VM_TARGET_PREFIX = "vm."


@dataclass(frozen=True)
class FoundUnit:
    """A valid unit found in a pool."""

    pool: str
    ref: UnitRef
    header: UnitHeader

    def to_json(self) -> dict[str, object]:
        h = self.header
        return {
            "uuid": str(h.unit_uuid),
            "naa": h.naa.hex(),
            "role": h.role.name.lower(),
            "mode": h.mode.name.lower(),
            "pool": self.pool,
            "location": self.ref.location,
            "unit_bytes": h.unit_size,
            "disk_bytes": h.disk_size,
            "generation": h.generation,
            "state": h.state.name.lower(),
            "regions": [
                {
                    "kind": r.kind.name.lower(),
                    "offset": r.offset,
                    "length": r.length,
                    "encrypted": r.encrypted,
                    **(
                        {"status": r.status.name.lower(), "generation": r.generation}
                        if r.encrypted
                        else {}
                    ),
                    **({"used_bytes": r.used} if r.kind is RegionKind.STATE else {}),
                }
                for r in h.regions
            ],
        }


@dataclass
class FoundVm:
    """A VM rebuilt from its base unit and the secondaries it names."""

    name: str
    base: FoundUnit
    secondaries: list[FoundUnit] = field(default_factory=list)
    missing: list[bytes] = field(default_factory=list)
    layers: list[FoundUnit] = field(default_factory=list)  # delta units (copy-on-write)
    records: list[FoundUnit] = field(default_factory=list)  # snapshot records
    #: every valid unit of the discovery run by UUID (shared by all its VMs): a linked
    #: clone's chains continue into its source VM's layers and volume units
    index: dict[uuid.UUID, FoundUnit] = field(default_factory=dict, repr=False)

    @property
    def units(self) -> list[FoundUnit]:
        return [self.base, *self.secondaries]

    @property
    def all_units(self) -> list[FoundUnit]:
        """Every unit of the VM, snapshot layers and records included."""
        return [*self.units, *self.layers, *self.records]

    def lun_map(self) -> dict[int, FoundUnit]:
        """LUN 0 the base unit, LUN n the n-th secondary the base names; a missing
        secondary leaves its LUN number unused rather than shifting the others."""
        by_naa = {u.header.naa: u for u in self.secondaries}
        luns = {0: self.base}
        for number, naa in enumerate(self.base.header.secondaries, 1):
            if naa in by_naa:
                luns[number] = by_naa[naa]
        return luns

    def disk_size(self, volume: FoundUnit) -> int:
        """What the guest sees of ``volume``: its top layer's size when it has layers
        (a disk grown while it had snapshots, or reverted to an older one), else its
        unit's (:mod:`..operations.snapshot_resize`)."""
        top = self.index.get(self.base.header.top_of(volume.header.naa, volume.header.unit_uuid))
        if top is None or top.header.role is not Role.DELTA:
            return volume.header.disk_size
        return top.header.require_region(RegionKind.DISK).used or volume.header.disk_size

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "pool": self.base.pool,
            "mode": self.base.header.mode.name.lower(),
            "disk_bytes": self.disk_size(self.base),
            "luns": [
                {"lun": number, **unit.to_json(), "disk_bytes": self.disk_size(unit)}
                for number, unit in enumerate(self.units)
            ],
            "missing_secondaries": [naa.hex() for naa in self.missing],
            "snapshots": [
                {
                    "uuid": str(r.header.unit_uuid),
                    "naa": r.header.naa.hex(),
                    "created": r.header.created,
                    "layers": [str(layer) for _naa, layer in r.header.tops],
                }
                for r in self.records
            ],
            "layers": [str(u.header.unit_uuid) for u in self.layers],
        }


@dataclass
class Discovery:
    vms: list[FoundVm] = field(default_factory=list)
    orphans: list[FoundUnit] = field(default_factory=list)
    foreign: list[dict[str, str]] = field(default_factory=list)
    damaged: list[dict[str, str]] = field(default_factory=list)
    repaired: list[dict[str, str]] = field(default_factory=list)

    def find(self, name: str) -> FoundVm | None:
        for vm in self.vms:
            if vm.name == name:
                return vm
        return None

    def to_json(self) -> dict[str, object]:
        return {
            "vms": [vm.to_json() for vm in self.vms],
            "orphan_secondaries": [u.to_json() for u in self.orphans],
            "foreign": self.foreign,
            "damaged": self.damaged,
            "repaired": self.repaired,
        }


def scan_pool(
    pool: Pool,
    result: Discovery,
    *,
    repair: bool,
    may_repair: Callable[[UnitHeader], bool] | None = None,
) -> list[FoundUnit]:
    """Open every candidate of ``pool``; sort them into ``result``'s lists. With
    ``may_repair``, a unit of a device pool (which other hosts may see) is repaired
    only if it says yes: never one a daemon elsewhere is writing (:mod:`.lease`)."""
    found = []
    pool.reload()
    remove_leftovers = getattr(pool, "remove_leftovers", None)
    if repair and remove_leftovers is not None:  # creations a crash cut short
        for name in remove_leftovers():
            result.repaired.append(
                {"location": f"{pool.name}:{name}", "action": "unfinished unit removed"}
            )
    guarded = repair and may_repair is not None and pool.kind == "device"
    for ref in pool.candidates():
        try:
            unit = Unit.open(pool, ref, repair=repair and not guarded)
            if guarded and may_repair is not None and may_repair(unit.header):
                unit.close()
                unit = Unit.open(pool, ref, repair=True)
        except ForeignUnitError:
            result.foreign.append({"pool": pool.name, "location": ref.location})
            continue
        except NewerFormatError as exc:
            result.damaged.append({"pool": pool.name, "location": ref.location, "reason": str(exc)})
            continue
        except (FormatError, VmError) as exc:
            result.damaged.append({"pool": pool.name, "location": ref.location, "reason": str(exc)})
            continue
        try:
            for note in unit.repaired:
                result.repaired.append({"location": ref.location, "action": note})
            found.append(FoundUnit(pool.name, unit.ref, unit.header))
        finally:
            unit.close()
    return found


def assemble(units: list[FoundUnit], result: Discovery) -> Discovery:
    """Rebuild VMs: each base unit claims the secondaries it names by designator."""
    by_naa = {u.header.naa: u for u in units if u.header.role is Role.SECONDARY}
    claimed: set[bytes] = set()
    names: dict[str, FoundVm] = {}
    for unit in sorted(units, key=lambda u: (u.header.name, str(u.header.unit_uuid))):
        if unit.header.role is not Role.BASE:
            continue
        vm = FoundVm(unit.header.name, unit)
        for naa in unit.header.secondaries:
            secondary = by_naa.get(naa)
            if secondary is None or naa in claimed:
                vm.missing.append(naa)
            else:
                vm.secondaries.append(secondary)
                claimed.add(naa)
        if vm.name in names:
            result.damaged.append(
                {
                    "pool": unit.pool,
                    "location": unit.ref.location,
                    "reason": f"a second base unit for VM {vm.name!r} "
                    f"(the first is {names[vm.name].base.ref.location})",
                }
            )
            continue
        names[vm.name] = vm
        result.vms.append(vm)
    result.orphans = [u for naa, u in by_naa.items() if naa not in claimed]
    by_owner = {vm.base.header.unit_uuid: vm for vm in result.vms}
    index = {u.header.unit_uuid: u for u in units}
    for vm in result.vms:
        vm.index = index
    for unit in units:
        if unit.header.role not in (Role.DELTA, Role.SNAPSHOT):
            continue
        owner = by_owner.get(unit.header.owner_uuid) if unit.header.owner_uuid else None
        if owner is None:
            result.damaged.append(
                {
                    "pool": unit.pool,
                    "location": unit.ref.location,
                    "reason": f"{unit.header.role.name.lower()} unit of VM "
                    f"{unit.header.name!r} whose base unit is missing",
                }
            )
        elif unit.header.role is Role.DELTA:
            owner.layers.append(unit)
        else:
            owner.records.append(unit)
    return result


def discover(
    pools: list[Pool],
    *,
    repair: bool = True,
    may_repair: Callable[[UnitHeader], bool] | None = None,
) -> Discovery:
    """Scan ``pools`` (callers hold each pool's lock when ``repair`` is set)."""
    result = Discovery()
    units: list[FoundUnit] = []
    for pool in pools:
        units.extend(scan_pool(pool, result, repair=repair, may_repair=may_repair))
    return assemble(units, result)
