"""``iscsi-vmtarget serve``: run the target until SIGINT/SIGTERM; SIGHUP reloads
(:mod:`iscsi_vmtarget.server.reload`), and systemd hears of readiness (sd_notify)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import signal
import sys
from typing import TYPE_CHECKING

from ..buffers import keep_freed_memory
from ..server import sd_notify
from ..server.admin import AdminError, AdminServer, Manager
from ..server.config import (
    ConfigError,
    ServeConfig,
    build_registry,
    demo_config,
    load_config,
)
from ..server.listener import TargetServer
from ..server.metrics import MetricsServer
from ..server.model import parse_portal
from ..server.ownership import keep_leases
from ..server.persist import ConfigStore, PersistError
from ..server.reload import reload_logged
from ..server.runtime import Runtime
from ..vm.units.device_lease import LeaseKeeper
from ..vm.units.device_lease import keeper as lease_keeper
from ..vm.units.lease import DEFAULT_SECONDS
from ..vm.units.locks import hold_state_dir
from ..vm.vm_errors import InUseError

if TYPE_CHECKING:
    from ..server.api.app import ApiServer

log = logging.getLogger("iscsi_vmtarget")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve",
        help="run the target",
        description="Serve targets over iSCSI. With no --config: a demo target with one "
        "1 GiB sparse LUN in the default pool of --state-dir, on 127.0.0.1:3260.",
    )
    p.add_argument("--config", metavar="FILE", help="TOML file with portals, targets and LUNs")
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where pools and state live (default ./var/iscsi-vmtarget)",
    )
    p.add_argument(
        "--portal",
        metavar="HOST:PORT",
        action="append",
        type=_portal_arg,
        help="listen address, repeatable (port 0 picks a free port); default 127.0.0.1:3260",
    )
    p.add_argument(
        "--nop-interval",
        type=_nop_seconds,
        metavar="SECONDS",
        help="send a NOP-In ping after this much idle time (0 = never; default 30)",
    )
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        type=_portal_arg,
        help="serve per-LUN and per-session counters in the Prometheus text format "
        "on http://HOST:PORT/metrics",
    )
    p.add_argument(
        "--api",
        metavar="HOST:PORT",
        type=_portal_arg,
        help="serve the management API (JSON over HTTPS, bearer tokens: 'api token "
        "create') on https://HOST:PORT/v1/..., its OpenAPI document at /openapi.json",
    )
    p.add_argument(
        "--api-cert",
        metavar="PEM",
        help="the API's TLS certificate (chain); default: a self-signed one made in "
        "<state-dir>/conf/api-cert.pem on first use",
    )
    p.add_argument("--api-key", metavar="PEM", help="the private key of --api-cert")
    p.add_argument(
        "--lease-seconds",
        type=_lease_seconds,
        default=DEFAULT_SECONDS,
        metavar="N",
        help="unit lease duration for VMs in device pools: renewed every N/4 s; another "
        f"daemon takes a unit over N s after its last renewal (default {DEFAULT_SECONDS:g})",
    )
    p.set_defaults(func=run)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    return value


def _nop_seconds(text: str) -> float:
    value = _seconds(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"NOP-In interval {text} is negative (0 = never)")
    return value


def _lease_seconds(text: str) -> float:
    value = _seconds(text)
    if not 0.5 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"lease seconds {text} out of range (0.5 to 3600)")
    return value


def _portal_arg(text: str) -> str:
    try:
        parse_portal(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def _load(args: argparse.Namespace) -> ServeConfig:
    if args.config:
        cfg = load_config(args.config)
        if args.state_dir:
            cfg.state_dir = args.state_dir
    else:
        cfg = demo_config(args.state_dir or ServeConfig().state_dir)
    if args.portal:
        cfg.portals = [parse_portal(p) for p in args.portal]
    if args.nop_interval is not None:
        cfg.nop_interval = args.nop_interval
    return cfg


def run(args: argparse.Namespace) -> int:
    """Targets come from ``--config`` (or the demo), VMs found in the pools, and the
    managed configuration ``<state-dir>/conf/config.json`` (the management commands);
    portals from ``--portal``, else the managed configuration, else the file."""
    keep_freed_memory()  # every command's buffer reused, not faulted in again
    try:
        cfg = _load(args)
        os.makedirs(cfg.state_dir, exist_ok=True)
        hold_state_dir(cfg.state_dir)  # before anything is exported; held until exit
    except (ConfigError, InUseError) as exc:
        print(f"iscsi-vmtarget: {exc}", file=sys.stderr)
        return 1
    leases = lease_keeper(cfg.state_dir, args.lease_seconds)
    try:
        return _run(args, cfg, leases)
    finally:
        leases.close()  # released on every way out: another host may take the units at once


def _run(args: argparse.Namespace, cfg: ServeConfig, leases: LeaseKeeper) -> int:
    try:
        store = ConfigStore(cfg.state_dir)
        managed = store.load()
        registry = build_registry(cfg)
    except (ConfigError, PersistError) as exc:
        print(f"iscsi-vmtarget: {exc}", file=sys.stderr)
        return 1
    if not args.portal and managed.portals:
        registry.portals = list(managed.portals)
    server = TargetServer(registry, cfg.negotiation, nop_interval=cfg.nop_interval)
    manager = Manager(store, Runtime(registry, server))
    try:
        manager.start()
    except AdminError as exc:
        print(f"iscsi-vmtarget: {store.path}: {exc}", file=sys.stderr)
        return 1
    admin = AdminServer(manager, cfg.state_dir)
    metrics = None
    if args.metrics:
        portal = parse_portal(args.metrics)
        metrics = MetricsServer(server.metrics, portal.host, portal.port)
    api = None
    if args.api:
        if bool(args.api_cert) != bool(args.api_key):
            print("iscsi-vmtarget: give both --api-cert and --api-key, or neither", file=sys.stderr)
            return 1
        from ..server.api.app import ApiServer  # aiohttp only when asked for

        portal = parse_portal(args.api)
        try:
            api = ApiServer(
                admin, cfg.state_dir, portal.host, portal.port, args.api_cert, args.api_key
            )
        except (OSError, ValueError) as exc:
            print(f"iscsi-vmtarget: the API's certificate: {exc}", file=sys.stderr)
            return 1
    return _run_loop(server, admin, metrics, leases, api)


def _run_loop(
    server: TargetServer,
    admin: AdminServer | None = None,
    metrics: MetricsServer | None = None,
    leases: LeaseKeeper | None = None,
    api: ApiServer | None = None,
) -> int:
    try:
        import uvloop  # optional: a faster event loop (libuv)

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        return runner(_serve(server, admin, metrics, leases, api))
    except OSError as exc:
        print(f"iscsi-vmtarget: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1


async def _serve(
    server: TargetServer,
    admin: AdminServer | None,
    metrics: MetricsServer | None,
    leases: LeaseKeeper | None = None,
    api: ApiServer | None = None,
) -> int:
    stop = asyncio.Event()
    reloads: list[asyncio.Task[None]] = []  # held, so a running reload is not collected
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    portals = await server.start()
    if leases is not None and admin is not None and admin.manager.runtime is not None:
        keep_leases(leases, admin.manager.runtime, loop)
    for portal in portals:
        host = f"[{portal.host}]" if ":" in portal.host else portal.host
        print(f"listening on {host}:{portal.port}", flush=True)
    if admin is not None:
        await admin.start()
        print(f"admin socket {admin.path}", flush=True)
    if metrics is not None:
        port = await metrics.start()
        print(f"metrics on http://{metrics.host}:{port}/metrics", flush=True)
    if api is not None:
        port = await api.start()
        host = f"[{api.host}]" if ":" in api.host else api.host
        print(f"api on https://{host}:{port}", flush=True)
    for target in server.registry.targets.values():
        for number, lu in sorted(target.scsi.luns.items()):
            print(f"target {target.name} lun {number} {lu.backend.size} bytes", flush=True)
    if admin is not None:
        loop.add_signal_handler(
            signal.SIGHUP, lambda: reloads.append(loop.create_task(_reload(admin)))
        )
    print("ready", flush=True)
    sd_notify.notify("READY=1", f"STATUS=serving on {len(portals)} portal(s)")
    await stop.wait()
    sd_notify.notify("STOPPING=1")
    log.info("stopping")
    if admin is not None:
        await admin.stop()
    if metrics is not None:
        await metrics.stop()
    if api is not None:
        await api.stop()
    await server.stop()
    print("stopped", flush=True)
    return 0


async def _reload(admin: AdminServer) -> None:
    """SIGHUP: re-read the configuration (:mod:`iscsi_vmtarget.server.reload`), telling
    systemd (``RELOADING=1``, then ``READY=1``)."""
    sd_notify.reloading()
    await reload_logged(admin)
    sd_notify.notify("READY=1")
