"""The API's routes: one table (:data:`ROUTES`) from which the server dispatches,
checks roles and request bodies, and generates its OpenAPI 3.0 document
(:func:`openapi`).

Every route runs admin requests (``Run``: :meth:`~..admin.AdminServer.run`), the
operations and actions the CLI and the admin socket use (``vm.*`` actions,
``acl.add``/``acl.remove``/``acl.list``, ``grant.*``, ``status``); a route that
the CLI does in two steps (delete a VM, then drop its grants; clone, then copy
the grants) makes the same two requests.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ... import __version__
from ...errors import IscsiVmtargetError

Run = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
#: ``(run, path parameters, query, body) -> JSON result``
Handler = Callable[[Run, dict[str, str], dict[str, str], dict[str, Any]], Awaitable[Any]]

_TYPES = {"integer": int, "string": str, "boolean": bool, "array": list, "object": dict}


@dataclass(frozen=True)
class Field:
    """A request body member: its JSON type, whether it must be there, what it is."""

    kind: str
    doc: str
    required: bool = False
    items: str | None = None  # the element type of an array


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    role: str
    summary: str
    handler: Handler
    body: dict[str, Field] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)  # name -> description
    status: int = 200  # of success


class BadRequest(IscsiVmtargetError, ValueError):
    """A request body that does not fit the route (HTTP 400)."""


def check_body(route: Route, body: Any) -> dict[str, Any]:
    """The body as a dict, if its members have the route's types; else BadRequest."""
    if not route.body:
        return {}
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - set(route.body))
    if unknown:
        raise BadRequest(f"unknown member(s) {', '.join(unknown)}; known: {', '.join(route.body)}")
    for name, spec in route.body.items():
        if name not in body or body[name] is None:
            if spec.required:
                raise BadRequest(f"missing member {name!r} ({spec.kind}: {spec.doc})")
            continue
        value = body[name]
        want = _TYPES[spec.kind]
        if (isinstance(value, bool) and want is int) or not isinstance(value, want):
            raise BadRequest(f"member {name!r} must be a JSON {spec.kind}")
        if spec.items and any(not isinstance(v, _TYPES[spec.items]) for v in value):
            raise BadRequest(f"member {name!r} must be an array of {spec.items}s")
    return body


# -- handlers ------------------------------------------------------------------------------


def _pick(body: dict[str, Any], *names: str) -> dict[str, Any]:
    return {n: body[n] for n in names if body.get(n) is not None}


async def _list_vms(run: Run, p: dict[str, str], q: dict[str, str], b: dict[str, Any]) -> Any:
    return (await run("vm.list", _pick(q, "pool")))["vms"]


async def _show_vm(run: Run, p: dict[str, str], q: dict[str, str], b: dict[str, Any]) -> Any:
    return await run("vm.show", {"name": p["name"]})


async def _create_vm(run: Run, p: dict[str, str], q: dict[str, str], b: dict[str, Any]) -> Any:
    return await run("vm.create", dict(b))


async def _delete_vm(run: Run, p: dict[str, str], q: dict[str, str], b: dict[str, Any]) -> Any:
    force = q.get("force", "").lower() in ("1", "true", "yes")
    result = await run("vm.delete", {"name": p["name"], "force": force})
    listing = await run("acl.list", {})
    if any(v["uuid"] == result["uuid"] for v in listing["vms"]):
        await run("grant.drop", {"uuid": result["uuid"]})
        result["grants_dropped"] = True
    return result


async def _resize(run: Run, p: dict[str, str], q: dict[str, str], b: dict[str, Any]) -> Any:
    request = {"name": p["name"], **_pick(b, "disk", "memory")}
    request["secondaries"] = {str(k): v for k, v in (b.get("secondaries") or {}).items()}
    return (await run("vm.resize", request))["vm"]


async def _snapshots(run: Run, p: dict[str, str], q: dict[str, str], b: dict[str, Any]) -> Any:
    return (await run("vm.snapshot.list", {"name": p["name"]}))["snapshots"]


async def _snapshot(run: Run, p: dict[str, str], q: dict[str, str], b: dict[str, Any]) -> Any:
    request = {"name": p["name"], "snapshot": b["snapshot"], **_pick(b, "description", "full")}
    return await run("vm.snapshot", request)


async def _snapshot_delete(
    run: Run, p: dict[str, str], q: dict[str, str], b: dict[str, Any]
) -> Any:
    return await run("vm.snapshot.delete", {"name": p["name"], "snapshot": p["snapshot"]})


async def _revert(run: Run, p: dict[str, str], q: dict[str, str], b: dict[str, Any]) -> Any:
    return await run("vm.revert", {"name": p["name"], "snapshot": p["snapshot"]})


async def _export(run: Run, p: dict[str, str], q: dict[str, str], b: dict[str, Any]) -> Any:
    request = {"name": p["name"], "snapshot": p["snapshot"], "stop": bool(b.get("stop"))}
    return await run("vm.snapshot.export", request)


async def _clone(run: Run, p: dict[str, str], q: dict[str, str], b: dict[str, Any]) -> Any:
    request = {"src": p["name"], "dst": b["dst"], **_pick(b, "from_snapshot", "full")}
    result = await run("vm.clone", request)
    # as 'vm clone' does: the clone starts with the source's grants (or none)
    source = await _uuid(run, p["name"])
    clone = await _uuid(run, str(b["dst"]))
    if b.get("no_grants"):
        await run("grant.drop", {"uuid": clone})
    else:
        await run("grant.copy", {"from": source, "to": clone, "name": b["dst"]})
    return result


async def _uuid(run: Run, name: str) -> str:
    """The identity of VM ``name`` (its base unit's UUID), which its grants are kept by."""
    vm = await run("vm.show", {"name": name})
    return str(vm["luns"][0]["uuid"])


async def _grants(run: Run, p: dict[str, str], q: dict[str, str], b: dict[str, Any]) -> Any:
    key = await _uuid(run, p["name"])
    listing = await run("acl.list", {})
    for vm in listing["vms"]:
        if vm["uuid"] == key:
            return {"allow_all": vm["allow_all"], "grants": vm["grants"]}
    return {"allow_all": False, "grants": []}


async def _grant(run: Run, p: dict[str, str], q: dict[str, str], b: dict[str, Any]) -> Any:
    request = {"vm": p["name"], "initiator": p["initiator"], "sources": [], **b}
    return await run("acl.add", request)


async def _revoke(run: Run, p: dict[str, str], q: dict[str, str], b: dict[str, Any]) -> Any:
    return await run("acl.remove", {"vm": p["name"], "initiator": p["initiator"]})


async def _status(run: Run, p: dict[str, str], q: dict[str, str], b: dict[str, Any]) -> Any:
    return await run("status", {})


async def _sessions(run: Run, p: dict[str, str], q: dict[str, str], b: dict[str, Any]) -> Any:
    return (await run("status", {}))["sessions"]


# -- the table -----------------------------------------------------------------------------

_SIZE = "bytes (a multiple of 512)"
ROUTES: list[Route] = [
    Route("GET", "/v1/status", "read", "Portals, targets, sessions and LUN counters", _status),
    Route("GET", "/v1/sessions", "read", "The sessions logged in", _sessions),
    Route("GET", "/v1/vms", "read", "List the VMs", _list_vms, query={"pool": "only this pool"}),
    Route(
        "POST",
        "/v1/vms",
        "operate",
        "Create a VM (served at once; no initiator sees it until granted)",
        _create_vm,
        body={
            "name": Field("string", "the VM's name", required=True),
            "disk": Field("integer", f"primary disk, {_SIZE}", required=True),
            "memory": Field("integer", "VM RAM in bytes", required=True),
            "secondaries": Field("array", f"secondary disks, {_SIZE}", items="integer"),
            "mode": Field("string", "concealment: truncate (default), offset or aligned"),
            "pool": Field("string", "pool to allocate from (default: default)"),
        },
        status=201,
    ),
    Route("GET", "/v1/vms/{name}", "read", "Show a VM: units, LUNs, snapshots", _show_vm),
    Route(
        "DELETE",
        "/v1/vms/{name}",
        "admin",
        "Delete a VM and its grants (refused while sessions are logged in)",
        _delete_vm,
        query={"force": "true: delete even with sessions logged in (they are logged out)"},
    ),
    Route(
        "POST",
        "/v1/vms/{name}/resize",
        "operate",
        "Grow a VM's disks or memory (live: initiators see CAPACITY DATA HAS CHANGED)",
        _resize,
        body={
            "disk": Field("integer", f"new primary disk size, {_SIZE}"),
            "memory": Field("integer", "new VM RAM in bytes"),
            "secondaries": Field("object", "LUN number -> new size in bytes"),
        },
    ),
    Route("GET", "/v1/vms/{name}/snapshots", "read", "List a VM's snapshots", _snapshots),
    Route(
        "POST",
        "/v1/vms/{name}/snapshots",
        "operate",
        "Take a snapshot (the VM's LUNs are quiesced)",
        _snapshot,
        body={
            "snapshot": Field("string", "the snapshot's name", required=True),
            "description": Field("string", "free text"),
            "full": Field("boolean", "copy every shared grain in: a full snapshot"),
        },
        status=201,
    ),
    Route(
        "DELETE",
        "/v1/vms/{name}/snapshots/{snapshot}",
        "operate",
        "Delete a snapshot",
        _snapshot_delete,
    ),
    Route(
        "POST",
        "/v1/vms/{name}/snapshots/{snapshot}/revert",
        "operate",
        "Revert the VM to a snapshot",
        _revert,
    ),
    Route(
        "POST",
        "/v1/vms/{name}/snapshots/{snapshot}/export",
        "operate",
        "Export a snapshot read-only as its own target (or stop)",
        _export,
        body={"stop": Field("boolean", "true: stop exporting it")},
    ),
    Route(
        "POST",
        "/v1/vms/{name}/clones",
        "operate",
        "Clone the VM (linked, or full); the clone gets the VM's grants",
        _clone,
        body={
            "dst": Field("string", "the clone's name", required=True),
            "from_snapshot": Field("string", "clone this snapshot, not the live disks"),
            "full": Field("boolean", "an independent copy, not a linked clone"),
            "no_grants": Field("boolean", "the clone starts without grants"),
        },
        status=201,
    ),
    Route("GET", "/v1/vms/{name}/grants", "read", "The VM's grants", _grants),
    Route(
        "PUT",
        "/v1/vms/{name}/grants/{initiator}",
        "admin",
        "Grant an initiator the VM (replaces its grant)",
        _grant,
        body={
            "luns": Field("array", "LUN map: [N, ...] or [{number, lun, read_only}]; default all"),
            "sources": Field("array", "only from these addresses/networks", items="string"),
            "view": Field("string", "guest (default) or raw"),
            "read_only": Field("boolean", "every mapped LUN read-only"),
            "chap_user": Field("string", "CHAP user name"),
            "chap_secret": Field("string", "CHAP secret (12-16 characters)"),
            "mutual_user": Field("string", "mutual CHAP user name"),
            "mutual_secret": Field("string", "mutual CHAP secret"),
        },
    ),
    Route(
        "DELETE",
        "/v1/vms/{name}/grants/{initiator}",
        "admin",
        "Revoke an initiator's grant (its sessions are logged out)",
        _revoke,
    ),
]


# -- OpenAPI -------------------------------------------------------------------------------


def _schema(spec: Field) -> dict[str, Any]:
    out: dict[str, Any] = {"type": spec.kind, "description": spec.doc}
    if spec.items:
        out["items"] = {"type": spec.items}
    return out


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.0 document of :data:`ROUTES`."""
    paths: dict[str, dict[str, Any]] = {}
    error = {"$ref": "#/components/schemas/Error"}
    for route in ROUTES:
        params = [
            {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
            for n in _path_names(route.path)
        ] + [
            {"name": n, "in": "query", "description": d, "schema": {"type": "string"}}
            for n, d in route.query.items()
        ]
        operation: dict[str, Any] = {
            "summary": route.summary,
            "operationId": re.sub(r"\W+", "_", f"{route.method.lower()}{route.path}").strip("_"),
            "x-role": route.role,
            "parameters": params,
            "responses": {
                str(route.status): {"description": "done", "content": _json({})},
                **{
                    str(code): {"description": text, "content": _json(error)}
                    for code, text in (
                        (400, "bad request or refused"),
                        (401, "no or unknown token"),
                        (403, "the token's role may not do this"),
                        (404, "no such VM or snapshot"),
                        (503, "too many requests in progress"),
                    )
                },
            },
        }
        if route.body:
            schema = {
                "type": "object",
                "additionalProperties": False,
                "properties": {n: _schema(f) for n, f in route.body.items()},
                "required": [n for n, f in route.body.items() if f.required],
            }
            if not schema["required"]:
                del schema["required"]
            operation["requestBody"] = {"required": True, "content": _json(schema)}
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.0.3",
        "info": {"title": "iscsi-vmtarget management API", "version": __version__},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {"error": {"type": "string"}},
                    "required": ["error"],
                }
            },
        },
        "security": [{"bearer": []}],
    }


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _path_names(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]
