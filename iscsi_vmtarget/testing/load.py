"""N concurrent sessions against one target: each writes, reads back and compares its
own blocks for a set time; every session must make progress and see no error."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

from ..client import Initiator
from .process import rss_bytes

BLOCK = 512
BLOCKS_PER_OP = 8  # 4 KiB
SPAN = 64  # each session owns SPAN * BLOCKS_PER_OP blocks


@dataclass
class LoadResult:
    ops: list[int]
    errors: list[str] = field(default_factory=list)
    peak_rss: int = 0
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.ops)


def _session(
    index: int, port: int, target: str, initiator: str, stop: threading.Event, result: LoadResult
) -> None:
    try:
        ini = Initiator(port=port, target_name=target, timeout=30,
                        initiator_name=f"{initiator}-{index}",
                        isid=bytes.fromhex("40000137") + index.to_bytes(2, "big"))  # fmt: skip
        ini.login()
        ini.command(bytes(6))  # POWER ON unit attention of a new I_T nexus
        base = index * SPAN * BLOCKS_PER_OP
        n = 0
        while not stop.is_set():
            lba = base + (n % SPAN) * BLOCKS_PER_OP
            data = os.urandom(BLOCK * BLOCKS_PER_OP)
            tail = lba.to_bytes(4, "big") + b"\x00" + BLOCKS_PER_OP.to_bytes(2, "big") + b"\x00"
            w = ini.command(bytes([0x2A, 0]) + tail, data_out=data)
            r = ini.command(bytes([0x28, 0]) + tail, read_length=len(data))
            if w.status or r.status or r.data != data:
                result.errors.append(f"session {index} op {n}: write {w.status} read {r.status}")
                return
            n += 1
            result.ops[index] = n
        ini.logout()
    except Exception as exc:
        result.errors.append(f"session {index}: {exc!r}")


def run_load(
    port: int, target: str, initiator: str, sessions: int, seconds: float, pid: int | None = None
) -> LoadResult:
    result = LoadResult(ops=[0] * sessions)
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=_session, args=(i, port, target, initiator, stop, result), daemon=True
        )
        for i in range(sessions)
    ]
    start = time.monotonic()
    for t in threads:
        t.start()
    while time.monotonic() - start < seconds and not result.errors:
        time.sleep(0.25)
        if pid is not None:
            result.peak_rss = max(result.peak_rss, rss_bytes(pid))
    stop.set()
    for t in threads:
        t.join(60)
    result.seconds = time.monotonic() - start
    return result
