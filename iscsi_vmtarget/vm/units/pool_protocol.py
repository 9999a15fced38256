"""What the VM layer needs of a pool (:class:`Pool`) and where a unit lives in one
(:class:`UnitRef`): the interface every pool kind (:mod:`.unit_pools`, :mod:`.device_pool`)
implements, apart from the pools themselves so that each kind depends on it alone.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Protocol

from ...storage.backend import BlockBackend


@dataclass(frozen=True)
class UnitRef:
    """Where a candidate unit lives in its pool: a file name or a table entry."""

    pool: str
    key: str  # file name in a directory pool, unit UUID in a device pool

    @property
    def location(self) -> str:
        return f"{self.pool}:{self.key}"


class Pool(Protocol):
    """What the VM layer needs from a pool."""

    name: str
    kind: str
    path: str

    def candidates(self) -> list[UnitRef]: ...

    def reload(self) -> None: ...

    def open(self, ref: UnitRef, read_only: bool = False) -> BlockBackend: ...

    def allocate(self, unit_uuid: uuid.UUID, size: int) -> tuple[UnitRef, BlockBackend]: ...

    def commit(self, ref: UnitRef, backend: BlockBackend) -> UnitRef: ...

    def abandon(self, ref: UnitRef, backend: BlockBackend) -> None: ...

    def delete(self, ref: UnitRef) -> None: ...

    def begin_growth(self, ref: UnitRef, backend: BlockBackend, new_size: int) -> None: ...

    def end_growth(self, ref: UnitRef, backend: BlockBackend) -> None: ...

    def recover(self, ref: UnitRef) -> str | None: ...

    def describe(self) -> dict[str, object]: ...

    def close(self) -> None: ...
