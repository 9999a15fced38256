"""Debian's tgtd (the C userspace target) on 127.0.0.1 for tests: one target with one
file-backed LUN, configured with tgtadm over a control port of its own so it never
meets a system tgtd. tgtd's LUN 0 is its controller: the file is LUN 1."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import IscsiVmtargetError

LUN = 1


class TgtdError(IscsiVmtargetError, RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Tgtd:
    workdir: Path
    backing: Path
    iqn: str = "iqn.2026-11.org.iscsi-vmtarget.test:tgtd"
    port: int = 0
    control: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"iscsi://127.0.0.1:{self.port}/{self.iqn}/{LUN}"

    def adm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = ["tgtadm", "-C", str(self.control), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if check and done.returncode:
            raise TgtdError(f"{' '.join(cmd)}: {done.stdout}{done.stderr}\n{self.log()}")
        return done

    def log(self) -> str:
        path = self.workdir / "tgtd.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def start(self) -> Tgtd:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        sockets = [f"{d}/tgtd/socket.{{}}" for d in ("/var/run", "/run")]
        self.control = next(
            n
            for n in (random.randint(20000, 29999) for _ in range(100))
            if not any(os.path.exists(s.format(n)) for s in sockets)
        )
        with open(self.workdir / "tgtd.log", "w") as log:
            self.proc = subprocess.Popen(
                ["tgtd", "-f", "--control-port", str(self.control),
                 "--iscsi", f"portal=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
            )  # fmt: skip
        deadline = time.monotonic() + 20
        while self.adm("--op", "show", "--mode", "sys", check=False).returncode:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise TgtdError(f"tgtd did not start:\n{self.log()}")
            time.sleep(0.2)
        iscsi = ("--lld", "iscsi")
        self.adm(*iscsi, "--op", "new", "--mode", "target", "--tid", "1", "-T", self.iqn)
        self.adm(*iscsi, "--op", "new", "--mode", "logicalunit", "--tid", "1",
                 "--lun", str(LUN), "-b", str(self.backing))  # fmt: skip
        self.adm(*iscsi, "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
        while True:  # it accepts connections a little after it answers tgtadm
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise TgtdError(f"tgtd portal not reachable:\n{self.log()}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        """tgtd ignores SIGTERM: offline, delete the target and the system, then wait."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.adm("--op", "update", "--mode", "sys", "--name", "State", "-v", "offline",
                     check=False)  # fmt: skip
            self.adm("--lld", "iscsi", "--op", "delete", "--mode", "target", "--tid", "1",
                     "--force", check=False)  # fmt: skip
            self.adm("--op", "delete", "--mode", "system", check=False)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        for d in ("/var/run", "/run"):
            for suffix in ("", ".lock"):
                try:
                    os.unlink(f"{d}/tgtd/socket.{self.control}{suffix}")
                except OSError:
                    pass
