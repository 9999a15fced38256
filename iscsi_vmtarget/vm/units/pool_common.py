"""What every kind of pool shares: unit file names, pool names, the header-slot probe
and the pool definition file (``<conf>/pools/<name>.toml``)."""

from __future__ import annotations

import json
import os
import re

from ...storage import atomic_file
from ...storage.backend import BlockBackend
from ..format.header import SLOT_OFFSETS, SLOT_SIZE, TAIL_SIZE, decode_header
from ..vm_errors import VmError

_POOL_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
UNIT_SUFFIX = ".unit"


def check_pool_name(name: str) -> None:
    if not _POOL_NAME.match(name):
        raise VmError(
            f"bad pool name {name!r}: use 1-32 of a-z, 0-9, '-' and '_', starting "
            "with a letter or digit"
        )


def slots_valid(backend: BlockBackend) -> bool:
    """Whether the tail of ``backend`` holds at least one valid header slot."""
    if backend.size < TAIL_SIZE:
        return False
    raw = backend.read(backend.size - TAIL_SIZE, 2 * SLOT_SIZE)
    for rel in SLOT_OFFSETS:
        try:
            decode_header(raw[rel : rel + SLOT_SIZE])
            return True
        except VmError:
            continue
    return False


def write_definition(
    conf_dir: str, name: str, kind: str, path: str, extra: dict[str, str] | None = None
) -> None:
    """Write ``<conf>/pools/<name>.toml`` crash-atomically (:mod:`~..storage.atomic_file`);
    ``extra``: more keys a kind of pool needs (an rbd pool's ``ceph_conf``)."""
    directory = os.path.join(conf_dir, "pools")
    os.makedirs(directory, exist_ok=True)
    final = os.path.join(directory, f"{name}.toml")
    text = (
        "# iscsi-vmtarget pool definition (written by 'pool create')\n"
        f"name = {json.dumps(name)}\nkind = {json.dumps(kind)}\n"
        f"path = {json.dumps(path)}\n"
        + "".join(f"{key} = {json.dumps(value)}\n" for key, value in (extra or {}).items())
    )
    atomic_file.write_file(final, text.encode(), tmp=final + ".tmp")
