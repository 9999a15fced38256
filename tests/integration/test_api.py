"""The HTTPS management API (``serve --api``), driven with real ``curl --cacert`` on
127.0.0.1: every route, the OpenAPI document, tokens and roles (401, 403),
malformed requests (400), unknown VMs (404), and a request flood that stays
bounded while iSCSI I/O goes on."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from iscsi_vmtarget.client.initiator import Initiator
from iscsi_vmtarget.server.vm_luns import DEFAULT_BASE_IQN
from tests.conftest import INITIATOR, RunningTarget, need_tool, start_target
from tests.integration.test_snapshot_serve import _read, ivt

MiB = 1 << 20
#: What the flood may cost iSCSI: no READ slower than this while it goes on.
FLOOD_READ_LIMIT = 1.0


class Api:
    """curl against one daemon's API, with its self-signed certificate pinned."""

    def __init__(self, target: RunningTarget, cacert: Path, tokens: dict[str, str]) -> None:
        self.target = target
        self.cacert = cacert
        self.tokens = tokens
        self.used: set[tuple[str, str]] = set()  # (method, route template) called

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = "admin",
        raw: str | None = None,
        route: str | None = None,
    ) -> tuple[int, Any]:
        cmd = [need_tool("curl"), "-sS", "--cacert", str(self.cacert), "-X", method]
        cmd += ["-w", "\n%{http_code}"]
        if token is not None:
            secret = self.tokens.get(token, token)
            cmd += ["-H", f"Authorization: Bearer {secret}"]
        if raw is not None or body is not None:
            data = raw if raw is not None else json.dumps(body)
            cmd += ["-H", "Content-Type: application/json", "--data-binary", data]
        proc = subprocess.run(
            [*cmd, self.target.api + path], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        text, _, code = proc.stdout.rpartition("\n")
        self.used.add((method, route or path))
        return int(code), json.loads(text) if text else None

    def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        status, result = self.call(method, path, body, **kw)
        assert status in (200, 201), (status, result)
        return result


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    work = tmp_path_factory.mktemp("api")
    state = work / "state"
    tokens = {
        role: ivt(state, "api", "token", "create", f"{role}-tok", "--role", role).strip()
        for role in ("read", "operate", "admin")
    }
    target = start_target(work / "serve", "--state-dir", str(state), "--api", "127.0.0.1:0")
    try:
        assert target.api.startswith("https://127.0.0.1:")
        yield Api(target, state / "conf" / "api-cert.pem", tokens)
    finally:
        target.stop()


def test_every_route(api: Api) -> None:
    """Each route of the OpenAPI document, as an orchestrator would use it."""
    status, doc = api.call("GET", "/openapi.json", token=None)  # public: no secrets in it
    assert status == 200 and doc["openapi"].startswith("3.")
    vm = api.ok(
        "POST",
        "/v1/vms",
        {"name": "web", "disk": 16 * MiB, "memory": MiB, "secondaries": [8 * MiB]},
        route="/v1/vms",
    )
    assert vm["target"] == f"{DEFAULT_BASE_IQN}:vm.web" and len(vm["luns"]) == 2
    assert "web" in [v["name"] for v in api.ok("GET", "/v1/vms", token="read")]
    shown = api.ok("GET", "/v1/vms/web", token="read", route="/v1/vms/{name}")
    assert shown["disk_bytes"] == 16 * MiB

    grant = f"/v1/vms/web/grants/{INITIATOR}"
    tmpl = "/v1/vms/{name}/grants/{initiator}"
    assert api.ok("PUT", grant, {}, route=tmpl)["applied"] is True
    grants = api.ok("GET", "/v1/vms/web/grants", token="read", route="/v1/vms/{name}/grants")
    assert [g["initiator"] for g in grants["grants"]] == [INITIATOR]

    # the granted initiator logs in and writes while the API works on the VM
    ini = Initiator(
        port=api.target.port, initiator_name=INITIATOR, target_name=f"{DEFAULT_BASE_IQN}:vm.web"
    )
    ini.login()
    ini.command(bytes(6))  # the power-on unit attention
    write = bytes([0x2A, 0x08]) + (3).to_bytes(4, "big") + b"\x00\x00\x01\x00"
    assert ini.command(write, data_out=b"A" * 512).status == 0
    sessions = api.ok("GET", "/v1/sessions", token="read")
    assert [s["initiator"] for s in sessions] == [INITIATOR]
    assert api.ok("GET", "/v1/status", token="read")["initiators"] == [INITIATOR]

    snaps = "/v1/vms/{name}/snapshots"
    taken = api.ok(
        "POST", "/v1/vms/web/snapshots", {"snapshot": "s1"}, token="operate", route=snaps
    )
    assert taken["snapshot"]["name"] == "s1"
    assert ini.command(write, data_out=b"B" * 512).status == 0
    listed = api.ok("GET", "/v1/vms/web/snapshots", token="read", route=snaps)
    assert [s["name"] for s in listed] == ["s1"]

    exported = api.ok(
        "POST",
        "/v1/vms/web/snapshots/s1/export",
        {},
        token="operate",
        route=snaps + "/{snapshot}/export",
    )
    assert exported["target"] == f"{DEFAULT_BASE_IQN}:vm.web.snap.s1"
    api.ok(
        "POST",
        "/v1/vms/web/snapshots/s1/export",
        {"stop": True},
        token="operate",
        route=snaps + "/{snapshot}/export",
    )

    clone = api.ok(
        "POST",
        "/v1/vms/web/clones",
        {"dst": "copy", "from_snapshot": "s1"},
        token="operate",
        route="/v1/vms/{name}/clones",
    )
    assert clone["target"] == f"{DEFAULT_BASE_IQN}:vm.copy"
    copied = api.ok("GET", "/v1/vms/copy/grants", token="read", route="/v1/vms/{name}/grants")
    assert [g["initiator"] for g in copied["grants"]] == [INITIATOR]  # as 'vm clone'

    resized = api.ok(
        "POST",
        "/v1/vms/web/resize",
        {"disk": 32 * MiB},
        token="operate",
        route="/v1/vms/{name}/resize",
    )
    assert resized["disk_bytes"] == 32 * MiB

    ini.logout()
    ini.close()
    api.ok(
        "POST",
        "/v1/vms/web/snapshots/s1/revert",
        token="operate",
        route=snaps + "/{snapshot}/revert",
    )
    ini = Initiator(
        port=api.target.port, initiator_name=INITIATOR, target_name=f"{DEFAULT_BASE_IQN}:vm.web"
    )
    ini.login()
    ini.command(bytes(6))
    assert _read(ini, 3) == b"A" * 512  # the snapshot's data again
    ini.logout()
    ini.close()

    api.ok("DELETE", "/v1/vms/copy", route="/v1/vms/{name}")
    api.ok("DELETE", "/v1/vms/web/snapshots/s1", token="operate", route=snaps + "/{snapshot}")
    api.ok("DELETE", grant, route=tmpl)
    assert api.ok("GET", "/v1/vms/web/grants", token="read")["grants"] == []
    deleted = api.ok("DELETE", "/v1/vms/web", route="/v1/vms/{name}")
    assert deleted["units"] == 2
    assert "web" not in [v["name"] for v in api.ok("GET", "/v1/vms", token="read")]

    routes = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert routes <= api.used, f"routes not called: {sorted(routes - api.used)}"
    log = api.target.log()
    assert "api admin-tok POST /v1/vms -> 201" in log  # every call, with the token's name
    assert "api read-tok GET /v1/vms -> 200" in log


@pytest.mark.slow
def test_tokens_and_roles(api: Api, tmp_path: Path) -> None:
    assert api.call("GET", "/v1/vms", token=None)[0] == 401
    status, body = api.call("GET", "/v1/vms", token="ivt_not-a-token")
    assert status == 401 and "token" in body["error"]
    for method, path, body in (
        ("POST", "/v1/vms", {"name": "x", "disk": MiB, "memory": MiB}),
        ("POST", "/v1/vms/demo/snapshots", {"snapshot": "s"}),
        ("DELETE", "/v1/vms/demo", None),
        ("PUT", f"/v1/vms/demo/grants/{INITIATOR}", {}),
    ):
        status, answer = api.call(method, path, body, token="read")
        assert status == 403, (method, path)
        assert "role read" in answer["error"]
    assert api.call("DELETE", "/v1/vms/demo", token="operate")[0] == 403  # admin only
    # a revoked token is refused at once, without restarting the daemon
    state = api.cacert.parent.parent
    extra = ivt(state, "api", "token", "create", "short-lived", "--role", "read").strip()
    assert api.call("GET", "/v1/status", token=extra)[0] == 200
    listed = ivt(state, "api", "token", "list")
    assert "short-lived" in listed and extra not in listed  # never the secret
    ivt(state, "api", "token", "revoke", "short-lived")
    assert api.call("GET", "/v1/status", token=extra)[0] == 401
    stored = (state / "conf" / "api-tokens.json").read_text()
    assert all(secret not in stored for secret in api.tokens.values())  # hashed


def test_bad_requests(api: Api) -> None:
    status, body = api.call("POST", "/v1/vms", raw='{"name": "x", "disk": ')
    assert status == 400 and body["error"].startswith("malformed JSON")
    status, body = api.call("POST", "/v1/vms", {"name": "x", "memory": MiB})
    assert status == 400 and "missing member 'disk'" in body["error"]
    status, body = api.call("POST", "/v1/vms", {"name": "x", "disk": "big", "memory": MiB})
    assert status == 400 and "'disk' must be a JSON integer" in body["error"]
    status, body = api.call("POST", "/v1/vms", {"name": "x", "disk": MiB, "memory": 1, "y": 1})
    assert status == 400 and "unknown member(s) y" in body["error"]
    status, body = api.call("POST", "/v1/vms", {"name": "x", "disk": 1000, "memory": MiB})
    assert status == 400 and body["error"]  # refused by the VM layer, said why
    for method, path, body in (
        ("GET", "/v1/vms/nosuch", None),
        ("GET", "/v1/vms/nosuch/snapshots", None),
        ("POST", "/v1/vms/nosuch/snapshots", {"snapshot": "s"}),
        ("POST", "/v1/vms/nosuch/resize", {"disk": 32 * MiB}),
        ("DELETE", "/v1/vms/nosuch", None),
    ):
        status, answer = api.call(method, path, body)
        assert status == 404, (method, path, answer)
        assert "nosuch" in answer["error"]


def test_flood_is_bounded_and_iscsi_goes_on(api: Api) -> None:
    """300 requests at once (one curl, 100 connections in parallel): each is answered
    (200, or 503 past the queue), and READs on the demo LUN meanwhile stay under
    :data:`FLOOD_READ_LIMIT`."""
    ini = Initiator(
        port=api.target.port, initiator_name=INITIATOR, target_name=f"{DEFAULT_BASE_IQN}:demo"
    )
    ini.login()
    ini.command(bytes(6))
    slowest = [0.0]
    reads = [0]
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            started = time.monotonic()
            _read(ini, reads[0] % 1000)
            slowest[0] = max(slowest[0], time.monotonic() - started)
            reads[0] += 1

    thread = threading.Thread(target=reader)
    thread.start()
    urls = [api.target.api + "/v1/status"] * 300
    cmd = [
        need_tool("curl"),
        "-s",
        "--cacert",
        str(api.cacert),
        "--parallel",
        "--parallel-max",
        "100",
        "-H",
        f"Authorization: Bearer {api.tokens['read']}",
        "-w",
        "%{http_code}\n",
    ]
    for url in urls:
        cmd += ["-o", "/dev/null", url]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        stop.set()
        thread.join()
    ini.logout()
    ini.close()
    codes = proc.stdout.split()
    assert len(codes) == 300 and set(codes) <= {"200", "503"}, sorted(set(codes))
    assert codes.count("200") >= 68  # at least what runs plus what queues
    assert reads[0] > 0 and slowest[0] < FLOOD_READ_LIMIT, (reads[0], slowest[0])
