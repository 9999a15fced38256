"""Shared fixtures: the real target, started as a subprocess on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import settings
from prometheus_client.parser import text_string_to_metric_families

from iscsi_vmtarget.storage.rbd import close_connections
from iscsi_vmtarget.testing import ceph
from iscsi_vmtarget.testing.ceph import CephCluster

# No per-example deadline: on the 2 CI cores shared with servers, Ceph and guests, an
# example's first run can take 100x its usual time (a lazy import, a busy core), and
# hypothesis then reports a flaky deadline, not a fault of the code under test.
settings.register_profile("shared-cores", deadline=None)
settings.load_profile("shared-cores")

INITIATOR = "iqn.2026-11.org.iscsi-vmtarget.test:host1"


@dataclass
class RunningTarget:
    """A target process and what it printed at start."""

    proc: subprocess.Popen[str]
    host: str
    port: int
    targets: dict[str, dict[int, int]] = field(default_factory=dict)  # iqn -> lun -> bytes
    log_path: Path | None = None
    ports: list[int] = field(default_factory=list)
    api: str = ""  # https://HOST:PORT of ``serve --api``
    metrics: str = ""  # http://HOST:PORT/metrics of ``serve --metrics``

    @property
    def portal(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, iqn: str, lun: int = 0) -> str:
        return f"iscsi://{self.portal}/{iqn}/{lun}"

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_target(
    workdir: Path, *extra: str, nop_interval: float = 0, command: list[str] | None = None
) -> RunningTarget:
    """Start ``iscsi-vmtarget serve`` on an ephemeral port and wait until it listens.
    ``command``: how to run ``iscsi-vmtarget`` (default: this checkout's package)."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "target.log"
    program = command or [sys.executable, "-m", "iscsi_vmtarget"]
    args = [*program, "-v", "serve", "--portal", "127.0.0.1:0"]
    if "--state-dir" not in extra:
        args += ["--state-dir", str(workdir / "state")]
    args += ["--nop-interval", str(nop_interval), *extra]
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=open(log_path, "w"),
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    running = RunningTarget(proc, "127.0.0.1", 0, log_path=log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"target exited early:\n{running.log()}")
        words = line.split()
        if line.startswith("listening on "):
            running.ports.append(int(words[-1].rpartition(":")[2]))
            running.port = running.ports[0]
        elif line.startswith("target "):
            running.targets.setdefault(words[1], {})[int(words[3])] = int(words[4])
        elif line.startswith("metrics on "):
            running.metrics = words[-1]
        elif line.startswith("api on "):
            running.api = words[-1]
        elif line.startswith("ready"):
            return running
    proc.kill()
    raise RuntimeError("target did not become ready")


def start_with_config(
    workdir: Path, config: str, *extra: str, nop_interval: float = 0
) -> RunningTarget:
    """``start_target`` with ``--config``: CONFIG (TOML text) is written to
    WORKDIR/target.toml and the target runs in WORKDIR/run."""
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "target.toml"
    conf.write_text(config)
    return start_target(workdir / "run", "--config", str(conf), *extra, nop_interval=nop_interval)


def lun_counters(target: RunningTarget) -> dict[str, float]:
    """The counters of the target's LUN (one LUN; ``serve --metrics``) by series name,
    ``iscsi_vmtarget_lun_`` and ``_total`` left off (``read_commands``,
    ``nowait_fallbacks``, ``fast_lane_commands``, ...)."""
    with urllib.request.urlopen(target.metrics, timeout=10) as rsp:
        text = rsp.read().decode()
    return {
        sample.name.removeprefix("iscsi_vmtarget_lun_").removesuffix("_total"): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("iscsi_vmtarget_lun_") and "le" not in sample.labels
    }


def file_luns(name: str, *sizes: str) -> str:
    """``[[target.lun]]`` tables for a test config: LUN n a file ``{d}/NAME<n>.img`` of
    ``sizes[n]`` (``{d}`` is left for the config's ``.format(d=...)``)."""
    return "".join(
        f'[[target.lun]]\nnumber = {n}\npath = "{{d}}/{name}{n}.img"\nsize = "{size}"\n'
        for n, size in enumerate(sizes)
    )


#: The initiator names this suite's clients log in with: INITIATOR, our initiator's
#: default, libiscsi's test tools' two defaults, and QEMU's (qemu-img, no VM name).
CLIENTS = (
    INITIATOR,
    "iqn.2026-11.org.iscsi-vmtarget:initiator",
    "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test",
    "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2",
    "iqn.2008-11.org.linux-kvm",
)


def grant_vms(state: Path, *initiators: str) -> None:
    """Grant ``initiators`` (default: :data:`CLIENTS`) every VM of state directory
    ``state`` (``acl default add``: the running daemon's at once, else from the next
    start). VM targets admit no initiator until granted: a test that logs into one
    says who it is with this."""
    from iscsi_vmtarget.server.admin import call

    for initiator in initiators or CLIENTS:
        call(str(state), "acl.default.add", {"initiator": initiator})


@pytest.fixture
def demo_target(tmp_path: Path) -> Iterator[RunningTarget]:
    """The default `serve` (demo target, one 1 GiB LUN) on an ephemeral port."""
    t = start_target(tmp_path)
    yield t
    t.stop()


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """One real Ceph cluster (tools/ceph-cluster: a monitor, one bluestore OSD, pool
    ``rbd``) for the whole test session, in /dev/shm where bluestore can run there,
    stopped and removed at its end. Skipped where Ceph is not installed, unless the
    run must have it (CI: tools/run-tests installs it)."""
    why = ceph.missing()
    if why is not None:
        if ceph.required():
            pytest.fail(why)
        pytest.skip(why)
    shm = ceph.fast_directory()
    cluster = CephCluster(shm or tmp_path_factory.mktemp("ceph"))
    try:
        yield cluster.start()
    finally:
        close_connections()
        cluster.stop()
        if shm is not None:
            shutil.rmtree(shm, ignore_errors=True)


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (tools/install-deps --test installs it)")
    return path


def host_naa_matches(iscsi_inq_stdout: bytes, naa: bytes) -> bool:
    """Does iscsi-inq's VPD 0x83 output show the NAA designator NAA?

    libiscsi 1.19 prints binary designators raw with ``%s``: the bytes stop at the first
    NUL, so compare that prefix (and that the rest really starts with a NUL)."""
    marker = b"Designator Type:(3) NAA\nDesignator:["
    at = iscsi_inq_stdout.index(marker) + len(marker)
    shown = naa.split(b"\0", 1)[0]
    return iscsi_inq_stdout[at : at + len(shown) + 2] == shown + b"]\n"


def run_tool(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run an external client (iscsi-inq, qemu-img, ...). Output is read as bytes and
    decoded as latin-1 by hand: iscsi-inq prints binary designators (NAA) raw, and
    text mode would turn a \\r inside one into \\n. check: fail showing its output."""
    need_tool(args[0])
    raw = subprocess.run(args, capture_output=True, timeout=timeout)
    proc = subprocess.CompletedProcess(
        raw.args, raw.returncode, raw.stdout.decode("latin-1"), raw.stderr.decode("latin-1")
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
            f"stderr:\n{proc.stderr}"
        )
    return proc
