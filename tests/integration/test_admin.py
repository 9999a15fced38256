"""The management plane against the real daemon: admin socket, live changes that keep
unaffected sessions, restart that keeps every target, ACL, LUN map and secret,
idempotent ``config apply``, concurrent commands, metrics."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from iscsi_vmtarget.cli.main import main
from iscsi_vmtarget.client import Initiator, InitiatorError, LoginFailed
from iscsi_vmtarget.server.admin import call_daemon
from tests.conftest import RunningTarget, start_target

DB = "iqn.2026-11.org.example:db"
H1 = "iqn.2026-11.org.example:host1"
H2 = "iqn.2026-11.org.example:host2"
SECRET = "host1-secret-0001"
MUTUAL = "db-target-secret-1"


def cli(capsys: pytest.CaptureFixture[str], state: Path, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([*argv, "--state-dir", str(state)])
    out = capsys.readouterr()
    return rc, out.out + out.err


def serve(tmp_path: Path, state: Path, *extra: str) -> RunningTarget:
    return start_target(tmp_path / "run", "--state-dir", str(state), *extra)


def login(t: RunningTarget, initiator: str, target: str | None, **kw: object) -> Initiator:
    ini = Initiator(port=t.port, initiator_name=initiator, target_name=target, **kw)  # type: ignore[arg-type]
    ini.login()
    return ini


def report_luns(ini: Initiator) -> list[int]:
    cdb = bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0])
    for _ in range(4):  # unit attentions first (power on, LUN inventory changes)
        rsp = ini.command(cdb, read_length=256)
        if rsp.status == 0:
            break
    n = int.from_bytes(rsp.data[:4], "big") // 8
    return [int.from_bytes(rsp.data[8 + 8 * i : 10 + 8 * i], "big") & 0x3FFF for i in range(n)]


def provision(capsys: pytest.CaptureFixture[str], state: Path, tmp_path: Path) -> None:
    """An offline setup: target, two LUNs, host1 with CHAP (mutual) seeing LUN 1 as 0."""
    steps = [
        ("target", "create", DB, "--alias", "db"),
        ("lun", "map", DB, "0", str(tmp_path / "db0.img"), "--size", "4M"),
        ("lun", "map", DB, "1", str(tmp_path / "db1.img"), "--size", "8M"),
        ("acl", "add", DB, H1, "--luns", "0=1", "--chap-user", "host1", "--chap-secret", SECRET)
        + ("--mutual-user", "db", "--mutual-secret", MUTUAL),
    ]
    for argv in steps:
        rc, out = cli(capsys, state, *argv)
        assert rc == 0, out
        assert "saved for the next start" in out


def test_offline_changes_survive_restart_with_every_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    provision(capsys, state, tmp_path)
    conf = state / "conf" / "config.json"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "conf").stat().st_mode) == 0o700
    for round_ in range(2):  # the second start must bring back what the first changed
        t = serve(tmp_path, state)
        try:
            assert stat.S_IMODE((state / "admin.sock").stat().st_mode) == 0o600
            assert t.targets[DB] == {0: 4 << 20, 1: 8 << 20}
            ini = login(
                t,
                H1,
                DB,
                chap_user="host1",
                chap_secret=SECRET.encode(),
                mutual_secret=MUTUAL.encode(),
            )
            assert report_luns(ini) == [0]
            with pytest.raises(LoginFailed) as info:
                login(t, H1, DB, chap_user="host1", chap_secret=b"wrong-secret-0001")
            assert (info.value.status_class, info.value.status_detail) == (2, 1)
            if round_ == 0:
                with pytest.raises(LoginFailed) as info:
                    login(t, H2, DB)
                assert (info.value.status_class, info.value.status_detail) == (2, 2)
                rc, out = cli(capsys, state, "acl", "add", DB, H2, "--luns", "0,1:ro")
                assert rc == 0 and out.strip() == f"+ acl {DB} {H2}", out
            else:
                assert report_luns(login(t, H2, DB)) == [0, 1]
            assert SECRET not in t.log() and MUTUAL not in t.log()
        finally:
            t.stop()


def test_live_changes_keep_unaffected_sessions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    provision(capsys, state, tmp_path)
    cli(capsys, state, "acl", "add", DB, H2, "--luns", "0,1")
    t = serve(tmp_path, state)
    try:
        h1 = login(
            t,
            H1,
            DB,
            chap_user="host1",
            chap_secret=SECRET.encode(),
            isid=bytes.fromhex("400001370b01"),
        )
        h2 = login(t, H2, DB, isid=bytes.fromhex("400001370b02"))
        assert report_luns(h2) == [0, 1]
        # change host2's map live: same session, new LUN set
        rc, out = cli(capsys, state, "acl", "add", DB, H2, "--luns", "7=0")
        assert rc == 0 and out.strip() == f"~ acl {DB} {H2}"
        assert report_luns(h2) == [7]
        assert h1.nop(b"untouched") == b"untouched"
        # removing host2's ACL logs its session out; host1 stays
        rc, out = cli(capsys, state, "acl", "remove", DB, H2)
        assert rc == 0
        with pytest.raises((InitiatorError, OSError)):
            h2.nop(b"gone")
        assert h1.nop(b"still") == b"still"
        # a new target, a new LUN, a new portal: live
        rc, out = cli(capsys, state, "target", "create", "iqn.2026-11.org.example:new")
        assert rc == 0 and "(no daemon" not in out
        rc, out = cli(
            capsys,
            state,
            "lun",
            "map",
            "iqn.2026-11.org.example:new",
            "0",
            str(tmp_path / "new0.img"),
            "--size",
            "2M",
        )
        assert rc == 0, out
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        rc, out = cli(capsys, state, "portal", "add", f"127.0.0.1:{free}")
        assert rc == 0, out
        ini = Initiator(port=free, initiator_name=H2, target_name="iqn.2026-11.org.example:new")
        ini.login()
        assert report_luns(ini) == [0]
        # a bad backing path is refused before anything changes
        rc, out = cli(capsys, state, "lun", "map", DB, "5", str(tmp_path / "nope.img"))
        assert rc == 1 and "does not exist" in out
        # status sees the sessions
        rc, out = cli(capsys, state, "status", "--json")
        status = json.loads(out)
        assert {s["initiator"] for s in status["sessions"]} >= {H1, H2}
        assert h1.nop(b"end") == b"end"
        rc, out = cli(capsys, state, "target", "delete", "iqn.2026-11.org.example:new")
        assert rc == 0
        with pytest.raises((InitiatorError, OSError)):
            ini.nop(b"deleted")
    finally:
        t.stop()


def test_config_apply_is_declarative_and_idempotent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    desired = tmp_path / "desired.toml"
    desired.write_text(
        f"""
[[target]]
name = "{DB}"
[[target.lun]]
number = 0
path = "db0.img"
size = "4M"
[[target.acl]]
initiator = "{H1}"
luns = [{{number = 3, lun = 0, read_only = true}}]
[target.acl.chap]
user = "host1"
secret = "{SECRET}"
"""
    )
    t = serve(tmp_path, state)
    try:
        rc, out = cli(capsys, state, "config", "apply", str(desired), "--dry-run")
        assert rc == 0 and f"+ target {DB}" in out
        assert DB not in [x["name"] for x in call_daemon(str(state), "target.list", {})["targets"]]
        rc, out = cli(capsys, state, "config", "apply", str(desired))
        assert rc == 0
        assert out.splitlines() == [
            f"+ target {DB}",
            f"+ lun {DB} 0 {tmp_path}/db0.img",
            f"+ acl {DB} {H1}",
        ]
        assert SECRET not in out
        rc, out = cli(capsys, state, "config", "apply", str(desired))
        assert rc == 0 and out.strip() == "no change"
        ini = login(t, H1, DB, chap_user="host1", chap_secret=SECRET.encode())
        assert report_luns(ini) == [3]
        # export, then apply the export: still nothing to do
        rc, exported = cli(capsys, state, "config", "export")
        (tmp_path / "exported.json").write_text(exported)
        rc, out = cli(capsys, state, "config", "apply", str(tmp_path / "exported.json"))
        assert out.strip() == "no change"
        rc, redacted = cli(capsys, state, "config", "export", "--redact")
        assert SECRET not in redacted and SECRET in exported
        # an empty document removes it all (and logs the session out)
        (tmp_path / "empty.json").write_text("{}")
        rc, out = cli(capsys, state, "config", "apply", str(tmp_path / "empty.json"))
        assert out.strip() == f"- target {DB}"
        with pytest.raises((InitiatorError, OSError)):
            ini.nop(b"x")
    finally:
        t.stop()


def test_concurrent_admin_commands_do_not_corrupt_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    cli(capsys, state, "target", "create", DB)
    # offline: processes racing on the files
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "iscsi_vmtarget",
                "acl",
                "add",
                DB,
                f"iqn.2026-11.org.example:offline{n}",
                "--state-dir",
                str(state),
            ],
            stdout=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        )
        for n in range(12)
    ]
    assert [p.wait(60) for p in procs] == [0] * 12
    t = serve(tmp_path, state)
    try:
        errors: list[str] = []

        def add(n: int) -> None:
            try:
                call_daemon(str(state), "acl.add", {"target": DB, "initiator": f"{H2}-{n}"})
            except Exception as exc:
                errors.append(repr(exc))

        threads = [threading.Thread(target=add, args=(n,)) for n in range(24)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert errors == []
    finally:
        t.stop()
    doc = json.loads((state / "conf" / "config.json").read_text())
    names = {a["initiator"] for a in doc["targets"][0]["acls"]}
    assert len(names) == 36
    assert not [p for p in (state / "conf").iterdir() if p.name.endswith(".tmp")]


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of a /metrics page: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_endpoint_counts_io_per_lun_and_session(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    provision(capsys, state, tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = serve(tmp_path, state, "--metrics", f"127.0.0.1:{port}")
    try:
        ini = login(t, H1, DB, chap_user="host1", chap_secret=SECRET.encode())
        ini.command(bytes(6))
        for _ in range(3):
            rsp = ini.command(bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0]), read_length=4096)
            assert rsp.status == 0
        assert (
            ini.command(bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]), data_out=bytes(512)).status == 0
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as rsp:
            assert rsp.headers["Content-Type"].startswith("text/plain; version=")
            samples = scrape(rsp.read().decode())
        lun = (("lun", "1"), ("target", DB))  # the target's LUN 1, shown to host1 as 0
        assert samples["iscsi_vmtarget_lun_read_commands_total", lun] == 3
        assert samples["iscsi_vmtarget_lun_read_bytes_total", lun] == 12288
        assert samples["iscsi_vmtarget_lun_write_bytes_total", lun] == 512
        session = [k for k in samples if k[0] == "iscsi_vmtarget_session_read_commands_total"]
        assert [dict(k[1])["initiator"] for k in session] == [H1]
        assert samples["iscsi_vmtarget_sessions", (("target", DB),)] == 1
        # the latency histogram: every READ in a bucket, cumulative up to +Inf
        reads = {**dict(lun), "vm": "", "op": "read"}
        key = (
            "iscsi_vmtarget_lun_latency_seconds_bucket",
            tuple(sorted({**reads, "le": "+Inf"}.items())),
        )
        assert samples[key] == 3
        assert (
            samples["iscsi_vmtarget_lun_latency_seconds_count", tuple(sorted(reads.items()))] == 3
        )
        _, out = cli(capsys, state, "status")
        assert f"lun {DB}/1: reads 3 (12288 B" in out
    finally:
        t.stop()
