"""Power cuts under the data path: the served LUN is written through our own initiator
with WRITE(10) FUA=1 and with WRITE(10) + SYNCHRONIZE CACHE(10), mixed, while the
target runs under :mod:`.fsrecord`; then every cut point of the recorded mutations is
rebuilt (:mod:`.powercut`) and every acknowledged write is checked, sector by sector
(SBC-3 §5.31 WRITE(10) FUA, §5.24 SYNCHRONIZE CACHE, the caching mode page's WCE §6.4.5):

* WCE=1: a write acknowledged with FUA, or followed by an acknowledged SYNCHRONIZE
  CACHE, reads back (or a later write's data), whatever else the cut lost;
* WCE=0 (set with MODE SELECT): every acknowledged write reads back;
* every 10 groups a PERSISTENT RESERVE OUT registers a new key with APTPL=1: the APTPL
  file (``lun0.img.pr``) is whole JSON holding the last acknowledged key or a later one.

Writes are 4 KiB (8 sectors) over a few aligned places, so they overwrite each other and
a torn write shows. An acknowledgement counts for a cut point when the recorder's log
was no longer than the cut when the initiator received it (:func:`.fsrecord.mark`):
every flush the target made before sending it is then inside the cut.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..client import Initiator
from .crash import TARGET, start, write_config
from .fsrecord import mark, read_log_offsets
from .powercut import Log, Tally, materialize, plan

SECTOR = 512
WRITE_BLOCKS = 8  # 4 KiB writes
PLACES = 16  # aligned 4 KiB places the writer overwrites
LUN_BYTES = 1 << 20
SYNC10 = bytes([0x35]) + bytes(9)
PR_EVERY = 10  # groups between two PERSISTENT RESERVE OUT registrations with APTPL


def register_aptpl(key: int) -> tuple[bytes, bytes]:
    """PERSISTENT RESERVE OUT, REGISTER AND IGNORE EXISTING KEY with APTPL=1 (SPC-4
    §6.16.2, §6.16.3): the CDB and its 24-byte parameter list."""
    params = bytes(8) + key.to_bytes(8, "big") + bytes(4) + b"\x01" + bytes(3)
    return bytes([0x5F, 0x06, 0, 0, 0, 0, 0, 0, len(params), 0]), params


def sector(seq: int, lba: int) -> bytes:
    seed = f"{seq}:{lba}".encode()
    return b"".join(hashlib.sha256(seed + bytes([i])).digest() for i in range(SECTOR // 32))


def write10(lba: int, blocks: int, fua: bool) -> bytes:
    return (bytes([0x2A, 0x08 if fua else 0]) + lba.to_bytes(4, "big") + b"\x00"
            + blocks.to_bytes(2, "big") + b"\x00")  # fmt: skip


@dataclass
class History:
    """Per sector: every write sent to it, in order, with the log size at which it was
    acknowledged as durable (None while it was not)."""

    writes: dict[int, list[tuple[bytes, int | None]]] = field(default_factory=dict)
    keys: list[tuple[int, int]] = field(default_factory=list)  # APTPL key, log size at ack

    def sent(self, lba: int, data: bytes) -> None:
        self.writes.setdefault(lba, []).append((data, None))

    def durable(self, lba: int, at: int) -> None:
        data, _ = self.writes[lba][-1]
        self.writes[lba][-1] = (data, at)

    def allowed(self, lba: int, bound: int) -> list[bytes]:
        """What sector ``lba`` may hold after a cut where the log was ``bound`` bytes:
        its last write acknowledged by then, or any later one (zeros if none was)."""
        writes = self.writes.get(lba, [])
        last = max((i for i, (_, at) in enumerate(writes) if at is not None and at <= bound),
                   default=None)  # fmt: skip
        if last is None:
            return [bytes(SECTOR)] + [d for d, _ in writes]
        return [d for d, _ in writes[last:]]


@dataclass
class IoRun(Tally):
    wce: bool = True
    acknowledged: int = 0

    def summary(self) -> str:
        return f"{super().summary()}, {self.acknowledged} writes acknowledged"


def set_wce(ini: Initiator, enabled: bool) -> None:
    """The caching mode page's WCE through MODE SENSE(6) / MODE SELECT(6)."""
    sense = ini.command(bytes([0x1A, 0x08, 0x08, 0, 0xFF, 0]), read_length=255)
    page = bytearray(sense.data[4 : 4 + 2 + sense.data[5]])
    page[0] &= 0x3F  # PS is reserved in MODE SELECT
    page[2] = page[2] | 0x04 if enabled else page[2] & ~0x04
    params = bytes(4) + bytes(page)
    rsp = ini.command(bytes([0x15, 0x10, 0, 0, len(params), 0]), data_out=params)
    if rsp.status:
        raise RuntimeError(f"MODE SELECT status {rsp.status}")


def drive(workdir: Path, wce: bool, groups: int, seed: int) -> tuple[Path, History, int]:
    """Serve a LUN under the recorder and write ``groups`` FUA writes or batches of
    writes + SYNCHRONIZE CACHE; the log, the history and the writes acknowledged."""
    root = workdir / "root"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    conf = write_config(root, LUN_BYTES)
    logfile = workdir / f"io-wce{int(wce)}.log"
    logfile.unlink(missing_ok=True)
    module = ["iscsi_vmtarget.testing.fsrecord", str(logfile), str(root), "--"]
    proc, port = start(conf, workdir / "target.log", module=module)
    history, acked = History(), 0
    rng = random.Random(seed)
    try:
        ini = Initiator(port=port, target_name=TARGET, timeout=20)
        ini.login()
        ini.command(bytes(6))  # the power-on unit attention
        set_wce(ini, wce)
        seq = 0
        for group in range(groups):
            if group % PR_EVERY == 0:  # APTPL state: the acknowledged key survives
                cdb, params = register_aptpl(0x1000 + group)
                rsp = ini.command(cdb, data_out=params)
                if rsp.status:
                    raise RuntimeError(f"PERSISTENT RESERVE OUT status {rsp.status}")
                history.keys.append((0x1000 + group, mark(str(logfile))))
            fua = rng.random() < 0.5
            batch: list[int] = []
            for _ in range(1 if fua else rng.randint(1, 3)):
                first = rng.randrange(PLACES) * WRITE_BLOCKS
                seq += 1
                data = b"".join(sector(seq, first + i) for i in range(WRITE_BLOCKS))
                for i in range(WRITE_BLOCKS):
                    history.sent(first + i, data[i * SECTOR : (i + 1) * SECTOR])
                rsp = ini.command(write10(first, WRITE_BLOCKS, fua), data_out=data)
                if rsp.status:
                    raise RuntimeError(f"WRITE status {rsp.status}")
                batch.append(first)
                if fua or not wce:  # durable once acknowledged
                    at = mark(str(logfile))
                    for i in range(WRITE_BLOCKS):
                        history.durable(first + i, at)
                    acked += 1
            if not fua:
                rsp = ini.command(SYNC10)
                if rsp.status:
                    raise RuntimeError(f"SYNCHRONIZE CACHE status {rsp.status}")
                at = mark(str(logfile))
                for first in batch:
                    for i in range(WRITE_BLOCKS):
                        if history.writes[first + i][-1][1] is None:
                            history.durable(first + i, at)
                    acked += wce
        ini.logout()
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    return logfile, history, acked


def run(workdir: Path, wce: bool, groups: int = 80, limit: int | None = 200,
        seeds: int = 2, spread: int | None = None, seed: int = 1) -> IoRun:  # fmt: skip
    """Record a writer, then check every cut point of the first ``limit`` mutations (or
    ``spread`` evenly spread ones) under every choice."""
    logfile, history, acked = drive(workdir, wce, groups, seed)
    offsets = [end for end, _ in read_log_offsets(str(logfile))]
    records = [rec for _, rec in read_log_offsets(str(logfile))]
    log = Log.parse(records)
    base = len(records) - len(log.ops)
    out = IoRun(f"data path WCE={int(wce)}", len(log.ops), wce=wce, acknowledged=acked)
    total = len(log.ops)
    points = {total * (i + 1) // (spread + 1) for i in range(spread)} if spread else None
    seen: set[str] = set()
    cuts = set()
    lun = Path("lun0.img")
    for n, choice, s in plan(log, limit, seeds):
        if points is not None and n not in points and n != total:
            continue
        cuts.add(n)
        bound = offsets[base + n - 1] if base + n - 1 >= 0 else 0
        state = Path(tempfile.mkdtemp(prefix="io-cut-", dir=workdir))
        try:
            outcome = materialize(log, n, choice, s, str(state))
            acks = sum(
                at is not None and at <= bound for w in history.writes.values() for _, at in w
            )
            key = f"{outcome.digest}:{acks}"  # more acknowledged: a stricter check
            if key in seen:
                out.duplicates += 1
                continue
            seen.add(key)
            out.checked += 1
            image = (state / lun).read_bytes() if (state / lun).exists() else b""
            pr = (state / "lun0.img.pr").read_bytes() if (state / "lun0.img.pr").exists() else None
        finally:
            shutil.rmtree(state, ignore_errors=True)
        aptpl = _check_aptpl(pr, history, bound)
        if aptpl:
            out.failures.append(f"cut {n}/{total} {choice}/{s}: {aptpl}")
        if len(image) != LUN_BYTES:  # the target's start cut: it creates it again
            if image or acks:
                out.failures.append(f"cut {n} {choice}/{s}: the LUN file is {len(image)} bytes")
            continue
        for lba in history.writes:
            got = image[lba * SECTOR : (lba + 1) * SECTOR]
            if got not in history.allowed(lba, bound):
                out.failures.append(f"cut {n}/{total} {choice}/{s}: LBA {lba} lost an "
                                    "acknowledged write")  # fmt: skip
                break
    out.cut_points = len(cuts)
    return out


def _check_aptpl(pr: bytes | None, history: History, bound: int) -> str | None:
    """The APTPL file: whole JSON holding the last key acknowledged by then, or a later
    one (none before the first acknowledgement)."""
    acked = [i for i, (_, at) in enumerate(history.keys) if at <= bound]
    if pr is None:
        return "the APTPL file is gone" if acked else None
    try:
        keys = {int(r["key"]) for r in json.loads(pr)["registrations"]}
    except (ValueError, KeyError, TypeError):
        return f"the APTPL file is torn ({len(pr)} bytes)"
    allowed = {k for k, _ in history.keys[acked[-1] :]} if acked else {k for k, _ in history.keys}
    return None if keys & allowed or (not acked and not keys) else f"APTPL keys {keys}"


__all__ = ["IoRun", "run"]
