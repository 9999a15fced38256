"""``tools/bench --rbd``: one gateway on a local Ceph cluster against direct librbd.

Starts a cluster of its own (tools/ceph-cluster: one monitor, one bluestore OSD, in
/dev/shm where bluestore can run there) unless ``--ceph-conf`` names one, makes one
image and fills it, then measures on the same image at the same queue depth (16):

- direct librbd from Python: ``Image.aio_read`` / ``aio_write`` with 16 requests in
  flight, time-bound;
- through one gateway (``serve`` with the image as LUN 0): libiscsi's iscsi-perf for
  reads, ``qemu-img bench`` for writes (as tools/bench does for file LUNs).

Rows: 64 KiB sequential read and write, 4 KiB random read; the ratio gateway/librbd
against the issue's goals (0.8, 0.8, 0.5). Then the failover time, median of
``--failovers`` (5): two gateways, an initiator logged in to the standby, SIGKILL to
the owner, and the time until a WRITE through the standby completes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from iscsi_vmtarget.client.initiator import Initiator  # noqa: E402
from iscsi_vmtarget.storage.rbd import RbdImageSpec, open_image  # noqa: E402
from iscsi_vmtarget.testing.ceph import CephCluster, fast_directory, gateway_config  # noqa: E402
from iscsi_vmtarget.testing.process import cpu_seconds  # noqa: E402

IQN = "iqn.2026-11.org.iscsi-vmtarget:bench-rbd"
CLIENT_IQN = "iqn.2026-11.org.iscsi-vmtarget:bench-client"
QD = 16
GOALS = {"read 64K seq QD16": 0.8, "write 64K seq QD16": 0.8, "read 4K rand QD16": 0.5}
ROWS = [  # name, request size, random, write
    ("read 64K seq QD16", 65536, False, False),
    ("write 64K seq QD16", 65536, False, True),
    ("read 4K rand QD16", 4096, True, False),
]
PERF_RE = re.compile(r"iops average (\d+) \((\d+) MB/s\)")
QEMU_RE = re.compile(r"Run completed in ([0-9.]+) seconds")


class BenchError(Exception):
    pass


# -- direct librbd --------------------------------------------------------------------


def librbd_run(spec: RbdImageSpec, size: int, req: int, rand: bool, write: bool,
               seconds: float, cpu: list[dict[str, float]]) -> float:
    """Requests per second with QD requests of REQ bytes in flight for SECONDS; where
    the CPU went is appended to CPU."""
    backend = open_image(spec, None, read_only=not write)
    image = backend.handle()
    slots = threading.Semaphore(QD)
    errors: list[int] = []
    done = 0
    lock = threading.Lock()
    data = os.urandom(req)
    blocks = size // req
    rng = random.Random(1)

    def complete(comp: object, *_: object) -> None:
        nonlocal done
        rv = comp.get_return_value()  # type: ignore[attr-defined]
        with lock:
            done += 1
            if rv < 0:
                errors.append(rv)
        slots.release()

    n = 0
    meter = CpuMeter()
    start = time.perf_counter()
    end = start + seconds
    try:
        while time.perf_counter() < end:
            slots.acquire()
            offset = (rng.randrange(blocks) if rand else n % blocks) * req
            n += 1
            if write:
                image.aio_write(data, offset, complete)
            else:
                image.aio_read(offset, req, complete)
        for _ in range(QD):
            slots.acquire()
        elapsed = time.perf_counter() - start
        cpu.append(meter.stop(done))
    finally:
        backend.close()
    if errors:
        raise BenchError(f"librbd: {len(errors)} requests failed ({errors[0]})")
    return done / elapsed


# -- gateways ---------------------------------------------------------------------------


@dataclass
class Gateway:
    proc: subprocess.Popen[str]
    port: int
    log: Path
    metrics: str = ""  # http://HOST:PORT/metrics (serve --metrics)

    def url(self) -> str:
        return f"iscsi://127.0.0.1:{self.port}/{IQN}/0"

    def commands_and_merged(self) -> tuple[float, float]:
        """READ and WRITE commands served so far, and how many of them went to librbd
        merged into an adjacent one (server/metrics.py)."""
        with urllib.request.urlopen(self.metrics, timeout=10) as rsp:
            text = rsp.read().decode()
        got = {
            s.name: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name.startswith("iscsi_vmtarget_lun_") and "le" not in s.labels
        }
        lun = "iscsi_vmtarget_lun_"
        return (
            got.get(f"{lun}read_commands_total", 0) + got.get(f"{lun}write_commands_total", 0),
            got.get(f"{lun}merged_reads_total", 0) + got.get(f"{lun}merged_writes_total", 0),
        )

    def stop(self) -> None:
        self.proc.terminate()  # a clean stop hands the image's lock over at once
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_gateway(work: Path, tpgt: int, spec: RbdImageSpec, conf: str, port: int = 0) -> Gateway:
    work.mkdir(parents=True, exist_ok=True)
    (work / "target.toml").write_text(gateway_config(IQN, tpgt, spec, conf))
    log = work / "target.log"
    cmd = [sys.executable, "-m", "iscsi_vmtarget", "serve", "--portal", f"127.0.0.1:{port}",
           "--config", str(work / "target.toml"), "--state-dir", str(work / "state"),
           "--metrics", "127.0.0.1:0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=open(log, "w"),
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    bound, metrics = port, ""
    for line in proc.stdout:
        if line.startswith("listening on "):
            bound = int(line.split()[-1].rpartition(":")[2])
        elif line.startswith("metrics on "):
            metrics = line.split()[-1]
        elif line.startswith("ready"):
            return Gateway(proc, bound, log, metrics)
    raise BenchError(f"gateway did not start:\n{log.read_text()[-2000:]}")


def gateway_run(gw: Gateway, size: int, req: int, rand: bool, write: bool,
                seconds: float, cpu: list[dict[str, float]]) -> float:
    """Requests per second through the gateway: iscsi-perf reads (time-bound),
    qemu-img bench writes (count-bound, the count taken from a short first run); where
    the CPU went in the measured run is appended to CPU (a read's request count from
    its rate over the whole run, login included: a slight underestimate of CPU)."""
    if not write:
        cmd = ["iscsi-perf", "-i", CLIENT_IQN, "-t", str(int(seconds)), "-m", str(QD),
               "-b", str(req // 512)] + (["-r"] if rand else []) + [gw.url()]
        meter = CpuMeter(gw.proc.pid)
        counts = gw.commands_and_merged()
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
        m = PERF_RE.findall(out.stdout + out.stderr)
        if out.returncode or not m:
            raise BenchError(f"iscsi-perf: {out.stdout[-500:]}{out.stderr[-500:]}")
        cpu.append(meter.stop(float(m[-1][0]) * (time.perf_counter() - t0)))
        cpu[-1]["merged"] = _merged_share(counts, gw.commands_and_merged())
        return float(m[-1][0])
    opts = (f"driver=iscsi,transport=tcp,portal=127.0.0.1:{gw.port},target={IQN},lun=0,"
            f"initiator-name={CLIENT_IQN}")
    count = max(QD * 4, int(seconds * 200))
    for _ in range(2):
        cmd = ["qemu-img", "bench", "-w", "-t", "none", "-c", str(count), "-d", str(QD),
               "-s", str(req), "--image-opts", opts]
        meter = CpuMeter(gw.proc.pid)
        counts = gw.commands_and_merged()
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        m = QEMU_RE.search(out.stdout)
        if out.returncode or not m:
            raise BenchError(f"qemu-img bench: {out.stdout[-500:]}{out.stderr[-500:]}")
        rate = count / max(float(m.group(1)), 1e-6)
        if float(m.group(1)) >= seconds * 0.5:
            cpu.append(meter.stop(count))
            cpu[-1]["merged"] = _merged_share(counts, gw.commands_and_merged())
            return rate
        count = max(QD * 4, int(rate * seconds))
    return rate


def _merged_share(before: tuple[float, float], after: tuple[float, float]) -> float:
    """Of the commands between two readings of :meth:`Gateway.commands_and_merged`,
    the share that went to librbd merged into an adjacent one."""
    commands = after[0] - before[0]
    return (after[1] - before[1]) / commands if commands > 0 else 0.0


# -- failover ---------------------------------------------------------------------------


def failover_times(work: Path, spec: RbdImageSpec, conf: str, rounds: int) -> list[float]:
    """Seconds from SIGKILL of the owner to the first WRITE completed through the other
    gateway, ROUNDS times (the killed one restarted each time as the new standby)."""
    owner = start_gateway(work / "g1-0", 1, spec, conf)
    standby = start_gateway(work / "g2-0", 2, spec, conf)
    times = []
    block = b"f" * 512
    try:
        for n in range(rounds):
            ini = Initiator(port=standby.port, initiator_name=CLIENT_IQN, target_name=IQN)
            ini.login()
            cdb = struct.pack(">BBIBHB", 0x2A, 0x08, n, 0, 1, 0)
            t0 = time.monotonic()
            owner.proc.kill()
            owner.proc.wait()
            while True:
                r = ini.command(cdb, data_out=block)
                if r.status == 0:
                    break
                if time.monotonic() - t0 > 120:
                    raise BenchError(f"no takeover in 120 s:\n{standby.log.read_text()[-2000:]}")
                time.sleep(0.05)
            times.append(time.monotonic() - t0)
            ini.close()
            tpgt = 1 if n % 2 else 2  # the killed gateway's group comes back standby
            owner, standby = standby, start_gateway(work / f"g{3 - tpgt}-{n + 1}",
                                                    3 - tpgt, spec, conf)
    finally:
        owner.stop()
        standby.stop()
    return times


# -- where the CPU goes -----------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle (all cores; /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / _TICK  # minus idle and iowait


def _process_seconds(pids: list[int]) -> float:
    """CPU seconds the processes PIDS have used so far (those gone count nothing)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def _osd_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-x", "ceph-osd"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


class CpuMeter:
    """Machine and per-process CPU over one run: the machine's busy share (of all its
    cores), and the OSDs' and the gateway's CPU seconds per request."""

    def __init__(self, gateway: int | None = None) -> None:
        self.osds, self.gateway = _osd_pids(), gateway
        self._t0 = time.perf_counter()
        self._busy0 = _busy_seconds()
        self._osd0 = _process_seconds(self.osds)
        self._gw0 = _process_seconds([gateway]) if gateway else 0.0

    def stop(self, requests: float) -> dict[str, float]:
        wall = time.perf_counter() - self._t0
        busy = _busy_seconds() - self._busy0
        osd = _process_seconds(self.osds) - self._osd0
        gw = (_process_seconds([self.gateway]) - self._gw0) if self.gateway else 0.0
        per = 1e6 / max(requests, 1)
        return {"machine_busy": busy / wall / (os.cpu_count() or 1),
                "machine_us": busy * per, "osd_us": osd * per, "gateway_us": gw * per}


# -- main -------------------------------------------------------------------------------


def _medians(samples: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def fill(spec: RbdImageSpec, size: int) -> None:
    backend = open_image(spec, None)
    chunk = os.urandom(4 << 20)
    try:
        for offset in range(0, size, len(chunk)):
            backend.write(offset, chunk[: min(len(chunk), size - offset)])
    finally:
        backend.close()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="tools/bench --rbd", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rbd", action="store_true")
    ap.add_argument("--ceph-conf", help="an existing cluster's ceph.conf (pool 'rbd')")
    ap.add_argument("--size", default="256M", help="image size (default 256M)")
    ap.add_argument("--seconds", type=float, default=5, help="per run (default 5)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per row (default 3)")
    ap.add_argument("--failovers", type=int, default=5, help="failover rounds (default 5)")
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args(argv)
    size = int(args.size[:-1]) << {"K": 10, "M": 20, "G": 30}[args.size[-1].upper()] \
        if args.size[-1].isalpha() else int(args.size)
    work = Path(tempfile.mkdtemp(prefix="iscsi-vmtarget-bench-rbd-"))
    cluster: CephCluster | None = None
    shm = None
    gw: Gateway | None = None
    try:
        if args.ceph_conf:
            conf = args.ceph_conf
        else:
            shm = fast_directory()
            cluster = CephCluster(shm or work / "ceph").start()
            conf = cluster.conf
        cluster_view = CephCluster(Path(conf).parent)
        spec = cluster_view.image(size, prefix="bench")
        fill(spec, size)
        rows = []
        for name, req, rand, write in ROWS:
            direct, through = [], []
            cpu_direct: list[dict[str, float]] = []
            cpu_through: list[dict[str, float]] = []
            for _ in range(args.reps):  # alternate, so machine noise lands on both
                direct.append(librbd_run(spec, size, req, rand, write, args.seconds,
                                         cpu_direct))
                # the gateway holds the image's exclusive lock while it runs (managed:
                # a direct writer would be refused), so it runs only for its own turn
                gw = start_gateway(work / "gw", 1, spec, conf)
                through.append(gateway_run(gw, size, req, rand, write, args.seconds,
                                           cpu_through))
                gw.stop()
                gw = None
            d, g = statistics.median(direct), statistics.median(through)
            rows.append({"row": name, "librbd": d, "gateway": g, "ratio": g / d,
                         "goal": GOALS[name], "unit": "IOPS" if req <= 4096 else "MB/s",
                         "mb_s": [d * req / 1e6, g * req / 1e6],
                         "cpu": [_medians(cpu_direct), _medians(cpu_through)]})
        times = failover_times(work, spec, conf, args.failovers) if args.failovers else []
        print(f"{'row':22} {'librbd':>12} {'gateway':>12} {'ratio':>6} goal")
        for r in rows:
            if r["unit"] == "IOPS":
                a, b = f"{r['librbd']:.0f} IOPS", f"{r['gateway']:.0f} IOPS"
            else:
                a, b = f"{r['mb_s'][0]:.0f} MB/s", f"{r['mb_s'][1]:.0f} MB/s"
            ok = "ok" if r["ratio"] >= r["goal"] else "MISSED"
            print(f"{r['row']:22} {a:>12} {b:>12} {r['ratio']:6.2f} >={r['goal']} {ok}")
        print("\nCPU per request, medians (machine: all processes and the kernel; "
              "busy: share of all cores)")
        print(f"{'row':22} {'path':8} {'busy':>5} {'machine':>9} {'OSD':>8} {'gateway':>8} "
              f"{'merged':>7}")
        for r in rows:
            for path, c in zip(("librbd", "gateway"), r["cpu"], strict=True):
                gw_us = f"{c['gateway_us']:6.0f}us" if path == "gateway" else ""
                merged = f"{c['merged']:7.0%}" if path == "gateway" else ""
                print(f"{r['row']:22} {path:8} {c['machine_busy']:5.0%} "
                      f"{c['machine_us']:7.0f}us {c['osd_us']:6.0f}us {gw_us:>8} {merged}")
        print("(merged: the gateway's commands that went to librbd merged into an "
              "adjacent one)")
        if times:
            print(f"failover (kill to first write through the other gateway): median "
                  f"{statistics.median(times):.1f} s of {[round(t, 1) for t in times]}")
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": rows, "failover": times}, indent=1))
        return 0
    finally:
        if gw is not None:
            gw.stop()
        if cluster is not None:
            cluster.stop()
        if shm is not None:
            shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
