"""Storage layer: flat byte stores. Knows nothing of SCSI or iSCSI."""

from .backend import (
    Abilities,
    AllocationMap,
    BackendError,
    BlockBackend,
    CapacityNotifier,
    CryptoErasable,
    WrittenMap,
    Zeroing,
    check_range,
)
from .file import FileBackend, create_sparse_file
from .memory import MemoryBackend

__all__ = [
    "Abilities",
    "AllocationMap",
    "BackendError",
    "BlockBackend",
    "CapacityNotifier",
    "CryptoErasable",
    "FileBackend",
    "MemoryBackend",
    "WrittenMap",
    "Zeroing",
    "check_range",
    "create_sparse_file",
]
