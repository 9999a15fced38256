"""Storage layer: flat byte stores. Knows nothing of SCSI or iSCSI."""

from .backend import BackendError, BlockBackend, check_range
from .file import FileBackend, create_sparse_file
from .memory import MemoryBackend

__all__ = [
    "BackendError",
    "BlockBackend",
    "FileBackend",
    "MemoryBackend",
    "check_range",
    "create_sparse_file",
]
