"""The VM/unit layer, the core of US 9,354,927 ("Securing virtual machine data", the
patent this target implements): storage units holding a VM's disk and its hidden
non-disk data, guest views in three concealment modes, encrypted state,
pools and discovery. It sits between the SCSI device server and the block backends
and knows nothing of iSCSI.

Four wings, each a sub-package (see its docstring):

* :mod:`.format`: the on-disk format (header, layout, GPT, keys, sealed regions);
* :mod:`.units`: units and where they live (pools, devices, discovery, locks, leases);
* :mod:`.layers`: what serves a unit's bytes (guest/raw views, copy-on-write chains,
  the flattened raw view);
* :mod:`.operations`: snapshots, resize, clone, move, replication, promote.

:mod:`.manager` is the way in: :class:`~.manager.VmManager` creates, finds, changes
and deletes VMs, and its :meth:`~.manager.VmManager.session` (every pool locked and
discovered once) is what every operation works under; the operations register their
crash recovery with :data:`~.manager.RECOVERY`. :mod:`.vm_errors` holds the layer's
exceptions, :mod:`.faults` the crash points tests use. The SCSI logical units a server
builds over VMs are :mod:`iscsi_vmtarget.server.vm_luns`' job.
"""

from .format.crypto import Keyring, MasterKey, create_key_file, load_key_file
from .format.header import Mode, RegionKind, Role, UnitHeader
from .layers.view import GuestView, RawView, SliceBackend
from .manager import StateDir, VmManager
from .operations import clone, move, promote, replicate, snapshot  # noqa: F401  (register recovery)
from .units.scan import Discovery, FoundUnit, FoundVm
from .units.unit import Unit, create_unit
from .units.unit_pools import DEFAULT_POOL, PoolCatalog
from .vm_errors import (
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
