"""I/O counters and latency histograms per LUN and per session, for Prometheus.

The server counts every SCSI command it completes (:meth:`Metrics.record`, the one
place on the data path that observes latency): per target LUN (the target's own LUN
number, whatever number an ACL shows it under) and per session (TSIH, RFC 7143
§11.12.6). ``serve --metrics HOST:PORT`` answers ``GET /metrics`` with what
:class:`Collector` reports, in the format the scraper asks for, written by the
``prometheus-client`` library; ``iscsi-vmtarget status`` shows the same numbers.

The data path keeps plain integers (a few additions and one :func:`bisect.bisect_left`
per command, no lock and no label lookup); the library's metric families are built
from them only when scraped. Series (``iscsi_vmtarget_`` prefix; ``lun_`` with
labels target, lun; ``session_`` with target, initiator, isid, tsih):

* ``{lun,session}_{read,write,other}_commands_total``, ``..._errors_total``,
  ``..._{read,write}_bytes_total``, ``..._{read,write}_seconds_total``,
  ``..._nowait_fallbacks_total`` (READs and WRITEs not servable inline without
  blocking, run again in a worker thread: storage/nowait.py),
  ``..._fast_lane_commands_total`` (READs and WRITEs the fast lane served: issue 18,
  server/fast_lane.py) (counters);
* ``{lun,session}_latency_seconds`` (histogram; also labels ``vm``, the VM the target
  is derived from or "", and ``op``: read, write or other; buckets :data:`BOUNDS`);
* ``lun_merged_{reads,writes}_total``: READs and WRITEs the LU's backend sent on
  merged into an adjacent one, as iostat's rrqm and wrqm count (RBD:
  storage/rbd_aio.py; only for LUs whose backend merges); read from the backends
  when scraped (:attr:`Metrics.merge_source`);
* ``sessions`` per target (gauge), ``logins_total``.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from .vm_luns import vm_of_target

log = logging.getLogger("iscsi_vmtarget")

#: READ(6/10/12/16) and the WRITE family incl. WRITE AND VERIFY (SBC-3 §5).
READ_OPCODES = frozenset({0x08, 0x28, 0xA8, 0x88})
WRITE_OPCODES = frozenset({0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0xAE, 0x8E})
PREFIX = "iscsi_vmtarget"
#: Latency bucket upper bounds in seconds: a command on a page-cached file takes tens
#: of microseconds, one that waits for a disk flush milliseconds, a stalled one more.
BOUNDS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)  # fmt: skip
OPS = ("read", "write", "other")
READ, WRITE, OTHER = range(3)


def _buckets() -> list[list[int]]:
    return [[0] * (len(BOUNDS) + 1) for _ in OPS]


@dataclass
class IoCounters:
    """Commands, bytes and seconds spent, by kind, and each kind's latency buckets."""

    reads: int = 0
    writes: int = 0
    others: int = 0
    errors: int = 0  # commands that ended with a status other than GOOD
    read_bytes: int = 0
    write_bytes: int = 0
    read_seconds: float = 0.0
    write_seconds: float = 0.0
    other_seconds: float = 0.0
    #: READs and WRITEs the kernel would have blocked inline (not in the page cache,
    #: a throttled write): run again in a worker thread (storage/nowait.py)
    nowait_fallbacks: int = 0
    #: READs and WRITEs served by the fast lane (server/fast_lane.py), not the full path
    fast_lane_commands: int = 0
    #: per kind (READ, WRITE, OTHER): commands by bucket of BOUNDS (last: over all)
    latency: list[list[int]] = field(default_factory=_buckets)

    def add(self, opcode: int, good: bool, nbytes: int, seconds: float, lane: bool = False) -> None:
        if lane:
            self.fast_lane_commands += 1
        if opcode in READ_OPCODES:
            self.reads += 1
            self.read_bytes += nbytes
            self.read_seconds += seconds
            kind = READ
        elif opcode in WRITE_OPCODES:
            self.writes += 1
            self.write_bytes += nbytes
            self.write_seconds += seconds
            kind = WRITE
        else:
            self.others += 1
            self.other_seconds += seconds
            kind = OTHER
        self.latency[kind][bisect_left(BOUNDS, seconds)] += 1
        if not good:
            self.errors += 1

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {k: v for k, v in vars(self).items() if k != "latency"}
        out["read_latency_ms"] = 1000 * self.read_seconds / self.reads if self.reads else 0.0
        out["write_latency_ms"] = 1000 * self.write_seconds / self.writes if self.writes else 0.0
        return out


@dataclass
class SessionInfo:
    """Labels of one session and its counters."""

    tsih: int
    initiator: str
    isid: str
    target: str
    peer: str
    io: IoCounters = field(default_factory=IoCounters)


class Metrics:
    """Counters of one daemon (touched only from the event loop thread)."""

    def __init__(self) -> None:
        self.luns: dict[tuple[str, int], IoCounters] = {}
        self.sessions: dict[int, SessionInfo] = {}
        self.logins = 0
        self.login_failures = 0
        #: (target, LUN) -> reads and writes its backend sent on merged, for the LUs
        #: whose backend merges (set by the server; asked when scraped)
        self.merge_source: Callable[[], dict[tuple[str, int], tuple[int, int]]] | None = None

    def merged(self) -> dict[tuple[str, int], tuple[int, int]]:
        """:attr:`merge_source`'s counts now (none without one)."""
        return self.merge_source() if self.merge_source is not None else {}

    def session_started(self, info: SessionInfo) -> None:
        self.logins += 1
        self.sessions[info.tsih] = info

    def session_ended(self, tsih: int) -> None:
        self.sessions.pop(tsih, None)

    def record(
        self, target: str, lun: int, tsih: int, opcode: int, good: bool, nbytes: int,
        seconds: float, lane: bool = False,
    ) -> None:  # fmt: skip
        """One completed command (``lane``: served by the fast lane)."""
        key = (target, lun)
        counters = self.luns.get(key)
        if counters is None:
            counters = self.luns[key] = IoCounters()
        counters.add(opcode, good, nbytes, seconds, lane)
        session = self.sessions.get(tsih)
        if session is not None:
            session.io.add(opcode, good, nbytes, seconds, lane)

    def nowait_fallback(self, target: str, lun: int, tsih: int) -> None:
        """One command moved to a worker thread because it would have blocked inline
        (counted besides :meth:`record`, which counts it once when it completes)."""
        counters = self.luns.get((target, lun))
        if counters is None:
            counters = self.luns[(target, lun)] = IoCounters()
        counters.nowait_fallbacks += 1
        session = self.sessions.get(tsih)
        if session is not None:
            session.io.nowait_fallbacks += 1

    def forget_target(self, target: str) -> None:
        for key in [k for k in self.luns if k[0] == target]:
            del self.luns[key]

    def registry(self) -> CollectorRegistry:
        """A prometheus-client registry that reports these metrics when scraped."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Collector(self))
        return registry


#: The counters of each scope: (name, help, value of IoCounters).
SERIES: list[tuple[str, str, Callable[[IoCounters], float]]] = [
    ("read_commands", "READ commands", lambda c: c.reads),
    ("write_commands", "WRITE commands", lambda c: c.writes),
    ("other_commands", "other SCSI commands", lambda c: c.others),
    ("errors", "commands ending in a non-GOOD status", lambda c: c.errors),
    ("read_bytes", "bytes read", lambda c: c.read_bytes),
    ("write_bytes", "bytes written", lambda c: c.write_bytes),
    ("read_seconds", "time spent in READs", lambda c: c.read_seconds),
    ("write_seconds", "time spent in WRITEs", lambda c: c.write_seconds),
    (
        "nowait_fallbacks",
        "READs and WRITEs that would have blocked inline, run in a worker thread",
        lambda c: c.nowait_fallbacks,
    ),
    ("fast_lane_commands", "READs and WRITEs the fast lane served", lambda c: c.fast_lane_commands),
]
_LE = [*(repr(b) for b in BOUNDS), "+Inf"]


class Collector:
    """A prometheus-client collector over :class:`Metrics` (module docstring)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        lun_labels = ["target", "lun"]
        session_labels = ["target", "initiator", "isid", "tsih"]
        luns = [([t, str(n)], c) for (t, n), c in sorted(m.luns.items())]
        sessions = [
            ([s.target, s.initiator, s.isid, str(s.tsih)], s.io)
            for s in sorted(m.sessions.values(), key=lambda s: s.tsih)
        ]
        for scope, labels, items in (
            ("lun", lun_labels, luns),
            ("session", session_labels, sessions),
        ):
            for name, help_text, get in SERIES:
                family = CounterMetricFamily(
                    f"{PREFIX}_{scope}_{name}", f"{help_text} per {scope}", labels=labels
                )
                for values, counters in items:
                    family.add_metric(values, get(counters))
                yield family
            yield _histogram(scope, labels, items)
        merged = sorted(m.merged().items())
        for index, kind in enumerate(("reads", "writes")):
            family = CounterMetricFamily(
                f"{PREFIX}_lun_merged_{kind}",
                f"{kind[:-1].upper()}s sent to the backend merged into an adjacent one",
                labels=lun_labels,
            )
            for (target, n), counts in merged:
                family.add_metric([target, str(n)], counts[index])
            yield family
        per_target: dict[str, int] = {}
        for s in m.sessions.values():
            if s.target:
                per_target[s.target] = per_target.get(s.target, 0) + 1
        gauge = GaugeMetricFamily(
            f"{PREFIX}_sessions", "live normal sessions per target", labels=["target"]
        )
        for target, count in sorted(per_target.items()):
            gauge.add_metric([target], count)
        yield gauge
        yield CounterMetricFamily(f"{PREFIX}_logins", "successful logins", value=m.logins)


def _histogram(
    scope: str, labels: list[str], items: list[tuple[list[str], IoCounters]]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(
        f"{PREFIX}_{scope}_latency_seconds",
        f"SCSI command latency per {scope}, by kind (read, write, other)",
        labels=[*labels, "vm", "op"],
    )
    for values, counters in items:
        vm = vm_of_target(values[0]) or ""
        sums = (counters.read_seconds, counters.write_seconds, counters.other_seconds)
        for kind, op in enumerate(OPS):
            running = 0
            buckets = []
            for le, count in zip(_LE, counters.latency[kind], strict=True):
                running += count
                buckets.append((le, running))
            family.add_metric([*values, vm, op], buckets, sum_value=sums[kind])
    return family


class MetricsServer:
    """``GET /metrics`` over HTTP on the daemon's event loop (aiohttp, as the API): the
    registry in the format the scraper's Accept header asks for (text or OpenMetrics)."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self.registry = metrics.registry()
        self.host = host
        self.port = port
        self._runner: Any = None

    async def start(self) -> int:
        from aiohttp import web  # only for a daemon serving metrics

        async def scrape(request: web.Request) -> web.Response:
            encode, content_type = choose_encoder(request.headers.get("Accept", ""))
            return web.Response(body=encode(self.registry), headers={"Content-Type": content_type})

        app = web.Application()
        app.router.add_get("/metrics", scrape)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
