"""Storage layer: flat byte stores. Knows nothing of SCSI or iSCSI."""

from .backend import (
    Abilities,
    AllocationMap,
    AsyncIO,
    BackendError,
    BlockBackend,
    CapacityNotifier,
    CryptoErasable,
    MergeCounting,
    NowaitCapable,
    Remeasurable,
    WrittenMap,
    Zeroing,
    check_range,
)
from .file import FileBackend, create_sparse_file
from .memory import MemoryBackend
from .rbd import RbdBackend, RbdImageSpec, RbdPoolSpec

__all__ = [
    "Abilities",
    "AllocationMap",
    "AsyncIO",
    "BackendError",
    "BlockBackend",
    "CapacityNotifier",
    "CryptoErasable",
    "FileBackend",
    "MemoryBackend",
    "MergeCounting",
    "NowaitCapable",
    "RbdBackend",
    "RbdImageSpec",
    "RbdPoolSpec",
    "Remeasurable",
    "WrittenMap",
    "Zeroing",
    "check_range",
    "create_sparse_file",
]
