"""The VM/unit layer, the core of US 9,354,927 ("Securing virtual machine data", the
patent this target implements): storage units holding a VM's disk and its hidden
non-disk data, guest views in three concealment modes, encrypted state,
pools and discovery. It sits between the SCSI device server and the block backends
and knows nothing of iSCSI.

Modules: :mod:`.format` (unit header), :mod:`.layout` (regions per mode, growth),
:mod:`.view` (guest and raw views), :mod:`.crypto` and :mod:`.sealed` (keys,
AES-GCM chunks), :mod:`.unit` (one unit), :mod:`.pool` and :mod:`.device` (pools),
:mod:`.discovery`, :mod:`.manager` (VM operations), :mod:`.export` (LUNs to serve),
:mod:`.replica`, :mod:`.replicate` and :mod:`.promote` (replication to another target),
:mod:`.lease` and :mod:`.lease_device` (unit leases on device pools several hosts see).
"""

# the operations register their crash recovery with the manager when imported
from . import clone, move, replicate, snapshot  # noqa: F401
from .crypto import Keyring, MasterKey, create_key_file, load_key_file
from .discovery import Discovery, FoundUnit, FoundVm
from .errors import (
    ForeignUnitError,
    FormatError,
    IntegrityError,
    InUseError,
    KeyFileError,
    NewerFormatError,
    NotFoundError,
    SizeError,
    VmError,
)
from .format import Mode, RegionKind, Role, UnitHeader
from .manager import StateDir, VmManager
from .pool import DEFAULT_POOL, PoolCatalog
from .unit import Unit, create_unit
from .view import GuestView, RawView, SliceBackend

__all__ = [
    "DEFAULT_POOL",
    "Discovery",
    "ForeignUnitError",
    "FormatError",
    "FoundUnit",
    "FoundVm",
    "GuestView",
    "InUseError",
    "IntegrityError",
    "KeyFileError",
    "Keyring",
    "MasterKey",
    "Mode",
    "NewerFormatError",
    "NotFoundError",
    "PoolCatalog",
    "RawView",
    "RegionKind",
    "Role",
    "SizeError",
    "SliceBackend",
    "StateDir",
    "Unit",
    "UnitHeader",
    "VmError",
    "VmManager",
    "create_key_file",
    "create_unit",
    "load_key_file",
]
