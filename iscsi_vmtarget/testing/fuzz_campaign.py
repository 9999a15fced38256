"""A fuzzing campaign against the real target over TCP, beside a well-behaved session
that verifies its own writes (issue 17, ``tools/fuzz-campaign``).

The target serves two targets: ``fuzz`` (LUN 0, open to all) for the fuzzers and
``good`` (LUN 0, its ACL admits only the verifying initiator). Fuzzer threads open
connections one after the other, each in one of three modes:

* ``login``: mutated Login Requests (the hypothesis strategies of
  :mod:`.pdu_strategies` as seeds: keys and values of every negotiation key, CHAP,
  hostile lengths) sent from the first PDU on (RFC 7143 §6, §11.12);
* ``discovery``: a proper discovery login, then mutated Text Requests
  (``SendTargets``, continuation, hostile keys; RFC 7143 §11.10, §12.3);
* ``normal``: a proper login to ``fuzz``, then any mutated PDU (SCSI commands with real
  CDBs, Data-Out, task management, NOP-Out, SNACK, Logout, Text).

Sessions negotiate HeaderDigest and DataDigest CRC32C at random (half of them), and a
mutated PDU then carries correct digests (so it reaches the parser) or, now and then, a
wrong one (§13.1). Mutations are byte-level and fast (bit flips, interesting values in
the BHS's 32-bit fields, lengths that lie, data cut or grown), on seeds drawn once.

Checked all along: the target process lives (0 crashes); the verifying session's every
WRITE(16)/READ(16) pair on its own LUN succeeds and reads back within its timeout (0
errors, and so no hung good session); at the end, after a grace period, the target holds
no more sockets than before the campaign (0 hung fuzz sessions) and its RSS, sampled
every second, is reported (bounded: the last quarter's peak against the first's).
"""

from __future__ import annotations

import random
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..client import Initiator
from ..iscsi.framing import encode_pdu
from .crash import start
from .process import alive, open_fds, rss_bytes
from .scapy_iscsi import digest

FUZZ = "iqn.2026-11.org.iscsi-vmtarget:fuzz"
GOOD = "iqn.2026-11.org.iscsi-vmtarget:good"
GOOD_INITIATOR = "iqn.2026-11.org.iscsi-vmtarget.test:verifier"
BHS = 48
INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0xFFFF, 0x10000, 0xFFFFFF, 0x1000000, 0x7FFFFFFF,
               0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]  # fmt: skip


@dataclass
class CampaignStats:
    seconds: float = 0.0
    pdus: int = 0
    connections: dict[str, int] = field(default_factory=lambda: {"login": 0, "discovery": 0,
                                                                  "normal": 0})  # fmt: skip
    digests: int = 0  # connections with header and data digests on
    crashes: int = 0
    hung_sessions: int = 0
    good_ops: int = 0
    good_errors: list[str] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    fds_before: int = 0
    fds_after: int = 0

    @property
    def rss_bounded(self) -> bool:
        if len(self.rss) < 8:
            return True
        quarter = len(self.rss) // 4
        return max(self.rss[-quarter:]) <= max(self.rss[:quarter]) * 1.25 + (16 << 20)

    def summary(self) -> str:
        mib = [r / (1 << 20) for r in self.rss] or [0.0]
        return (f"{self.pdus} fuzzed PDUs in {self.seconds:.0f} s "
                f"({self.pdus / max(self.seconds, 1e-9):.0f}/s) over "
                f"{sum(self.connections.values())} connections {self.connections} "
                f"({self.digests} with digests); {self.crashes} target crashes, "
                f"{self.hung_sessions} hung sessions, {self.good_ops} verified good-session "
                f"writes with {len(self.good_errors)} errors; RSS {mib[0]:.0f} -> "
                f"max {max(mib):.0f} -> {mib[-1]:.0f} MiB "
                f"({'bounded' if self.rss_bounded else 'GROWING'}); target sockets/fds "
                f"{self.fds_before} before, {self.fds_after} after")  # fmt: skip

    @property
    def ok(self) -> bool:
        return not (self.crashes or self.hung_sessions or self.good_errors) and self.rss_bounded


def write_config(workdir: Path) -> Path:
    conf = workdir / "fuzz.toml"
    conf.write_text(
        f'state_dir = "{workdir / "state"}"\nnop_interval = 0\n'
        '[[portal]]\nlisten = "127.0.0.1:0"\n'
        f'[[target]]\nname = "{FUZZ}"\n[[target.lun]]\nnumber = 0\n'
        f'path = "{workdir / "fuzz.img"}"\nsize = "4194304"\n'
        f'[[target]]\nname = "{GOOD}"\n[[target.lun]]\nnumber = 0\n'
        f'path = "{workdir / "good.img"}"\nsize = "1048576"\n'
        f'[[target.acl]]\ninitiator = "{GOOD_INITIATOR}"\n'
    )
    return conf


class Seeds:
    """Valid PDUs drawn once from the hypothesis strategies, as raw bytes (no digests)."""

    def __init__(self, count: int, seed: int) -> None:
        from hypothesis import strategies as st
        from hypothesis.errors import NonInteractiveExampleWarning

        from . import pdu_strategies as S

        warnings.simplefilter("ignore", NonInteractiveExampleWarning)

        def draw(strategy: st.SearchStrategy[object]) -> list[object]:
            try:  # a plain random draw: fast, no shrinking, no health checks
                from hypothesis.internal.conjecture.data import ConjectureData
            except ImportError:  # another hypothesis: its public (slow) way
                return st.lists(strategy, min_size=count, max_size=count).example()
            out = []
            for i in range(count * 3):
                try:
                    out.append(ConjectureData(random=random.Random(seed * 7919 + i)).draw(strategy))
                except Exception:  # a draw that overran its budget: take the next
                    continue
                if len(out) == count:
                    break
            return out

        self.login = [self._raw(p) for p in draw(S.login_pdu())]
        self.any = [self._raw(p) for p in draw(S.any_pdu()) + draw(S.full_feature_pdu(1, [1]))]
        self.text = [self._text(d, i) for i, d in enumerate(draw(S.text_data()))]  # type: ignore[arg-type]

    @staticmethod
    def _raw(pdu: object) -> bytes:
        return b"".join(bytes(p) for p in encode_pdu(pdu))  # type: ignore[arg-type]

    @staticmethod
    def _text(data: bytes, i: int) -> bytes:
        """A Text Request (opcode 0x04, F=1) carrying ``data`` (a SendTargets one often)."""
        if i % 2:
            data = b"SendTargets=" + (b"All", b"", GOOD.encode(), b"x" * 300)[i % 4] + b"\0"
        head = bytearray(BHS)
        head[0], head[1] = 0x04 | 0x40, 0x80
        head[5:8] = len(data).to_bytes(3, "big")
        head[16:20] = i.to_bytes(4, "big")  # ITT
        head[20:24] = b"\xff" * 4  # TTT
        return bytes(head) + data + bytes(-len(data) & 3)


def mutate(raw: bytes, rng: random.Random) -> bytes:
    """One fast byte-level mutation of a PDU (BHS fields, lengths, data)."""
    buf = bytearray(raw)
    for _ in range(rng.choice((1, 1, 2, 3))):
        how = rng.randrange(6)
        if how == 0:  # bit flips anywhere
            pos = rng.randrange(len(buf))
            buf[pos] ^= 1 << rng.randrange(8)
        elif how == 1:  # an interesting 32-bit value in a BHS field
            pos = rng.randrange(0, BHS - 3, 4)
            buf[pos : pos + 4] = rng.choice(INTERESTING).to_bytes(4, "big")
        elif how == 2:  # the opcode or flags byte
            buf[rng.choice((0, 1, 2, 3))] = rng.randrange(256)
        elif how == 3:  # DataSegmentLength / TotalAHSLength that lie
            if rng.random() < 0.5:
                buf[5:8] = rng.choice(INTERESTING[:10]).to_bytes(4, "big")[1:]
            else:
                buf[4] = rng.choice((0, 1, 2, 0x40, 0xFF))
        elif how == 4:  # the data segment grown or cut (length kept or fixed)
            extra = bytes(rng.randrange(256) for _ in range(rng.choice((1, 4, 64, 700))))
            buf = buf[: max(BHS, len(buf) - rng.randrange(0, 64))] + extra
            if rng.random() < 0.5:
                n = len(buf) - BHS - buf[4] * 4
                buf[5:8] = max(n, 0).to_bytes(3, "big")
        else:  # text keys torn: a NUL or '=' moved
            if len(buf) > BHS:
                pos = rng.randrange(BHS, len(buf))
                buf[pos] = rng.choice(b"\x00=~,x")
    if rng.random() < 0.9 and len(buf) >= BHS:  # mostly honest lengths: get past framing
        buf[4] = raw[4]
        buf[5:8] = max(0, len(buf) - BHS - buf[4] * 4).to_bytes(3, "big")
    return bytes(buf)


def frame(raw: bytes, hd: bool, dd: bool, rng: random.Random) -> bytes:
    """``raw`` with the session's digests (a wrong one in 1 of 50), pad to 4 bytes."""
    ahs = raw[4] * 4 if len(raw) > 4 else 0
    head, data = raw[: BHS + ahs], raw[BHS + ahs :]
    out = head
    if hd:
        out += digest(head) if rng.random() > 0.02 else b"\xde\xad\xbe\xef"
    out += data + bytes(-len(data) & 3)
    if dd and data:
        out += digest(data + bytes(-len(data) & 3)) if rng.random() > 0.02 else b"\0" * 4
    return out


class Fuzzer(threading.Thread):
    def __init__(self, port: int, seeds: Seeds, stats: CampaignStats, until: float,
                 seed: int) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.port, self.seeds, self.stats, self.until = port, seeds, stats, until
        self.rng = random.Random(seed)
        self.lock = threading.Lock()

    def run(self) -> None:
        while time.monotonic() < self.until:
            mode = self.rng.choice(("login", "discovery", "normal", "normal"))
            digests = self.rng.random() < 0.5
            try:
                self.connection(mode, digests)
            except (OSError, Exception):  # the target closed on us: the point of fuzzing
                pass

    def connection(self, mode: str, digests: bool) -> None:
        self.stats.connections[mode] += 1
        self.stats.digests += digests
        if mode == "login":
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            pool, hd = self.seeds.login, False
        else:
            ini = Initiator(port=self.port, target_name=None if mode == "discovery" else FUZZ,
                            header_digest=digests, data_digest=digests, timeout=5)  # fmt: skip
            ini.connect()
            ini.login()
            assert ini.sock is not None
            sock, hd = ini.sock, digests
            pool = self.seeds.text if mode == "discovery" else self.seeds.any + self.seeds.text
        sock.setblocking(True)
        sock.settimeout(5)
        try:
            for _ in range(self.rng.randrange(20, 400)):
                raw = self.rng.choice(pool)
                if self.rng.random() < 0.85:
                    raw = mutate(raw, self.rng)
                sock.sendall(frame(raw, hd, hd, self.rng))
                self.stats.pdus += 1
                self._drain(sock)
                if time.monotonic() >= self.until:
                    break
        finally:
            sock.close()

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        """Read what the target answered so far, without waiting (keeps buffers moving)."""
        sock.settimeout(0.0)  # a timeout socket would wait for data before recv
        try:
            while True:
                try:
                    chunk = sock.recv(1 << 16)
                except (BlockingIOError, TimeoutError):  # nothing more to read now
                    return
                if not chunk:
                    raise ConnectionResetError("closed by the target")
        finally:
            sock.settimeout(5)


class GoodSession(threading.Thread):
    """Writes and reads back its own blocks with digests on, for the whole campaign."""

    def __init__(self, port: int, stats: CampaignStats, until: float) -> None:
        super().__init__(daemon=True)
        self.port, self.stats, self.until = port, stats, until

    def run(self) -> None:
        rng = random.Random(7)
        try:
            ini = Initiator(port=self.port, target_name=GOOD, initiator_name=GOOD_INITIATOR,
                            header_digest=True, data_digest=True, timeout=20)  # fmt: skip
            ini.login()
            ini.read_capacity16()  # past the power-on unit attention
            while time.monotonic() < self.until:
                lba = rng.randrange(2048 // 8) * 8
                data = rng.randbytes(4096)
                ini.write16(lba, data, 512)
                if ini.read16(lba, 8, 512) != data:
                    self.stats.good_errors.append(f"LBA {lba} read back other data")
                self.stats.good_ops += 1
                time.sleep(0.01)
            ini.logout()
        except Exception as exc:
            self.stats.good_errors.append(f"good session: {type(exc).__name__}: {exc}")


def run_campaign(workdir: Path, seconds: float, fuzzers: int = 2, seed: int = 1,
                 grace: float = 5.0, progress: bool = False) -> CampaignStats:  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    conf = write_config(workdir)
    proc, port = start(conf, workdir / "target.log")
    stats = CampaignStats()
    try:
        seeds = Seeds(150, seed)
        stats.fds_before = open_fds(proc.pid)
        started = time.monotonic()
        until = started + seconds
        good = GoodSession(port, stats, until)
        good.start()
        workers = [Fuzzer(port, seeds, stats, until, seed * 1000 + i) for i in range(fuzzers)]
        for worker in workers:
            worker.start()
        last = 0.0
        while time.monotonic() < until:
            time.sleep(1)
            if not alive(proc.pid):
                stats.crashes += 1
                break
            stats.rss.append(rss_bytes(proc.pid))
            if progress and time.monotonic() - last > 30:
                last = time.monotonic()
                print(f"{time.monotonic() - started:.0f} s: {stats.pdus} PDUs, "
                      f"RSS {stats.rss[-1] >> 20} MiB", flush=True)  # fmt: skip
        for worker in workers:
            worker.join(30)
        good.join(60)
        stats.seconds = time.monotonic() - started
        if alive(proc.pid):
            deadline = time.monotonic() + grace  # closed fuzz connections wind down
            while time.monotonic() < deadline and open_fds(proc.pid) > stats.fds_before:
                time.sleep(0.2)
            stats.fds_after = open_fds(proc.pid)
            stats.hung_sessions = max(0, stats.fds_after - stats.fds_before)
        else:
            stats.crashes = 1
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    return stats


__all__ = ["CampaignStats", "run_campaign"]
