"""I/O counters per LUN and per session, in the Prometheus text format.

The server counts every SCSI command it completes (:meth:`Metrics.record`): per
target LUN (the target's own LUN number, whatever number an ACL shows it under) and
per session (TSIH, RFC 7143 §11.12.6). ``serve --metrics HOST:PORT`` answers
``GET /metrics`` with the text exposition format 0.0.4; ``iscsi-vmtarget status``
shows the same numbers. Latencies are sums of seconds with their command counts, the
Prometheus way to get averages (``rate(x_seconds_total) / rate(x_total)``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

log = logging.getLogger("iscsi_vmtarget")

#: READ(6/10/12/16) and the WRITE family incl. WRITE AND VERIFY (SBC-3 §5).
READ_OPCODES = frozenset({0x08, 0x28, 0xA8, 0x88})
WRITE_OPCODES = frozenset({0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0xAE, 0x8E})
PREFIX = "iscsi_vmtarget"


@dataclass
class IoCounters:
    """Commands, bytes and seconds spent, by kind."""

    reads: int = 0
    writes: int = 0
    others: int = 0
    errors: int = 0  # commands that ended with a status other than GOOD
    read_bytes: int = 0
    write_bytes: int = 0
    read_seconds: float = 0.0
    write_seconds: float = 0.0
    other_seconds: float = 0.0

    def add(self, opcode: int, good: bool, nbytes: int, seconds: float) -> None:
        if opcode in READ_OPCODES:
            self.reads += 1
            self.read_bytes += nbytes
            self.read_seconds += seconds
        elif opcode in WRITE_OPCODES:
            self.writes += 1
            self.write_bytes += nbytes
            self.write_seconds += seconds
        else:
            self.others += 1
            self.other_seconds += seconds
        if not good:
            self.errors += 1

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = asdict(self)
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

    def session_started(self, info: SessionInfo) -> None:
        self.logins += 1
        self.sessions[info.tsih] = info

    def session_ended(self, tsih: int) -> None:
        self.sessions.pop(tsih, None)

    def record(
        self, target: str, lun: int, tsih: int, opcode: int, good: bool, nbytes: int, seconds: float
    ) -> None:
        key = (target, lun)
        counters = self.luns.get(key)
        if counters is None:
            counters = self.luns[key] = IoCounters()
        counters.add(opcode, good, nbytes, seconds)
        session = self.sessions.get(tsih)
        if session is not None:
            session.io.add(opcode, good, nbytes, seconds)

    def forget_target(self, target: str) -> None:
        for key in [k for k in self.luns if k[0] == target]:
            del self.luns[key]

    # -- Prometheus text exposition format 0.0.4 ------------------------------------------

    def render(self) -> str:
        lines: list[str] = []
        series: list[tuple[str, str, str, Callable[[IoCounters], float]]] = [
            ("read_commands_total", "counter", "READ commands", lambda c: c.reads),
            ("write_commands_total", "counter", "WRITE commands", lambda c: c.writes),
            ("other_commands_total", "counter", "other SCSI commands", lambda c: c.others),
            ("errors_total", "counter", "commands ending in a non-GOOD status", lambda c: c.errors),
            ("read_bytes_total", "counter", "bytes read", lambda c: c.read_bytes),
            ("write_bytes_total", "counter", "bytes written", lambda c: c.write_bytes),
            ("read_seconds_total", "counter", "time spent in READs", lambda c: c.read_seconds),
            ("write_seconds_total", "counter", "time spent in WRITEs", lambda c: c.write_seconds),
        ]
        for scope, items in (
            ("lun", [({"target": t, "lun": str(n)}, c) for (t, n), c in sorted(self.luns.items())]),
            (
                "session",
                [
                    (
                        {
                            "target": s.target,
                            "initiator": s.initiator,
                            "isid": s.isid,
                            "tsih": str(s.tsih),
                        },
                        s.io,
                    )
                    for s in sorted(self.sessions.values(), key=lambda s: s.tsih)
                ],
            ),
        ):
            for name, kind, help_text, get in series:
                metric = f"{PREFIX}_{scope}_{name}"
                lines.append(f"# HELP {metric} {help_text} per {scope}")
                lines.append(f"# TYPE {metric} {kind}")
                lines += [f"{metric}{_labels(labels)} {_number(get(c))}" for labels, c in items]
        per_target: dict[str, int] = {}
        for s in self.sessions.values():
            if s.target:
                per_target[s.target] = per_target.get(s.target, 0) + 1
        lines.append(f"# HELP {PREFIX}_sessions live normal sessions per target")
        lines.append(f"# TYPE {PREFIX}_sessions gauge")
        lines += [
            f"{PREFIX}_sessions{_labels({'target': t})} {n}" for t, n in sorted(per_target.items())
        ]
        lines.append(f"# HELP {PREFIX}_logins_total successful logins")
        lines.append(f"# TYPE {PREFIX}_logins_total counter")
        lines.append(f"{PREFIX}_logins_total {self.logins}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class MetricsServer:
    """A tiny HTTP/1.0 responder: ``GET /metrics`` -> the exposition, else 404."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 10)
            for _ in range(100):  # headers, ignored
                line = await asyncio.wait_for(reader.readline(), 10)
                if line in (b"\r\n", b"\n", b""):
                    break
            parts = request.decode("latin-1").split()
            wanted = len(parts) >= 2 and parts[1].split("?")[0] == "/metrics"
            if wanted and parts[0] in ("GET", "HEAD"):
                body = self.metrics.render().encode()
                head = "200 OK"
                ctype = "text/plain; version=0.0.4; charset=utf-8"
            else:
                body, head, ctype = b"not found\n", "404 Not Found", "text/plain"
            writer.write(
                f"HTTP/1.0 {head}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            )
            if parts and parts[0] != "HEAD":
                writer.write(body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError) as exc:
            log.debug("metrics request failed: %r", exc)
        finally:
            writer.close()
