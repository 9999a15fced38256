"""The merged-request counters (server/metrics.py): read from the LUs' backends when
scraped, for the LUs whose backend merges (RBD, storage/rbd_aio.py)."""

from __future__ import annotations

import uuid

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from iscsi_vmtarget.iscsi.directory import Portal, TargetEntry
from iscsi_vmtarget.scsi import LogicalUnit, ScsiTarget, UnitIdentity
from iscsi_vmtarget.server.listener import TargetServer
from iscsi_vmtarget.server.registry import Registry, Target
from iscsi_vmtarget.storage import MemoryBackend

NAME = "iqn.2026-11.org.iscsi-vmtarget.test:Merges"


class MergingBackend(MemoryBackend):
    """A memory backend that reports merges as RBD's does."""

    def merged_requests(self) -> tuple[int, int]:
        return (7, 3)


def _samples(server: TargetServer) -> dict[tuple[str, str], float]:
    text = generate_latest(server.metrics.registry()).decode()
    return {
        (s.name, s.labels.get("lun", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if "merged" in s.name
    }


def test_merged_requests_are_scraped_for_the_lus_whose_backend_merges() -> None:
    lus = {
        n: LogicalUnit(backend, UnitIdentity.from_uuid(uuid.UUID(int=n + 1), f"lu{n}"))
        for n, backend in enumerate((MergingBackend(1 << 20), MemoryBackend(1 << 20)))
    }
    registry = Registry(portals=[Portal("127.0.0.1", 0)])
    registry.add_target(Target(TargetEntry(name=NAME), ScsiTarget(lus)))
    server = TargetServer(registry)
    key = NAME.lower()  # as sessions name it in every other series
    assert server.metrics.merged() == {(key, 0): (7, 3)}  # LUN 1 does not merge
    assert _samples(server) == {
        ("iscsi_vmtarget_lun_merged_reads_total", "0"): 7,
        ("iscsi_vmtarget_lun_merged_writes_total", "0"): 3,
    }
