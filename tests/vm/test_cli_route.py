"""One router decides "daemon or offline" for every CLI verb (``cli/route.py``)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from iscsi_vmtarget.cli.route import VM_VERBS
from iscsi_vmtarget.server.actions import ACTIONS
from iscsi_vmtarget.server.actions.served import NOT_EXPORTED
from iscsi_vmtarget.server.admin import socket_path
from tests.vm.test_cli import Cli, cli  # noqa: F401 - the fixture

MIB = 1 << 20


def test_every_daemon_action_is_routed() -> None:
    """A VM verb with a daemon action is routed to it; no action goes unused
    (``vm.serve`` is the notice after a VM is made: ``Router.serve_now``; the catalog
    actions serve the HTTPS API, the CLI does them on the pools; ``vm delete --force``
    asks ``vm.delete`` of a running daemon, see test_vm_delete_live)."""
    routed = {op for op in VM_VERBS.values() if op is not None}
    catalog = {"vm.list", "vm.show", "vm.create", "vm.delete", "vm.snapshot.list"}
    assert routed | {"vm.serve"} | catalog == set(ACTIONS)
    assert not routed & catalog


@pytest.fixture
def daemon(cli: Cli) -> Iterator[list[dict[str, object]]]:  # noqa: F811
    """A stand-in daemon on the admin socket that exports no VM: it records each
    request and refuses every VM action as the real one does for a VM it does not
    serve."""
    cli.state.mkdir(parents=True, exist_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(socket_path(str(cli.state)))
    server.listen()
    requests: list[dict[str, object]] = []

    def answer() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as stream:
                for line in stream:
                    request = json.loads(line)
                    requests.append(request)
                    name = request["args"].get("name")
                    reply = {"ok": False, "error": f"{NOT_EXPORTED} {name!r}"}
                    stream.write(json.dumps(reply).encode() + b"\n")
                    stream.flush()

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    yield requests
    server.close()
    thread.join(5)


def test_a_vm_the_daemon_does_not_serve_is_changed_offline(
    cli: Cli,  # noqa: F811
    daemon: list[dict[str, object]],
    tmp_path: Path,
) -> None:
    assert cli("vm", "create", "db", "--disk", "4M", "--memory", "2M")[0] == 0
    code, out, err = cli("vm", "resize", "db", "--disk", "8M")
    assert code == 0, err
    assert "resized VM db:" in out  # the offline path, after the daemon said no
    assert [r["op"] for r in daemon][-1] == "vm.resize"
    image = tmp_path / "state.img"
    image.write_bytes(b"s" * 4096)
    asked = len(daemon)
    code, out, err = cli("vm", "state", "write", "db", str(image))
    assert code == 0, err
    assert "stored 4096 bytes" in out
    code, _out, err = cli("vm", "config", "set", "db", "cpus=2")
    assert code == 0, err
    assert len(daemon) == asked  # neither has a daemon action: never asked
