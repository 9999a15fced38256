"""``iscsi-vmtarget serve``: run the target until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from ..server.config import (
    ConfigError,
    ServeConfig,
    build_registry,
    demo_config,
    load_config,
    parse_portal,
)
from ..server.portal import TargetServer

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
        type=float,
        metavar="SECONDS",
        help="send a NOP-In ping after this much idle time (0 = never; default 30)",
    )
    p.set_defaults(func=run)


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
    try:
        cfg = _load(args)
        os.makedirs(cfg.state_dir, exist_ok=True)
        registry = build_registry(cfg)
    except ConfigError as exc:
        print(f"iscsi-vmtarget: {exc}", file=sys.stderr)
        return 1
    return _run_loop(TargetServer(registry, cfg.negotiation, nop_interval=cfg.nop_interval))


def _run_loop(server: TargetServer) -> int:
    try:
        import uvloop  # optional: a faster event loop (libuv)

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        return runner(_serve(server))
    except OSError as exc:
        print(f"iscsi-vmtarget: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1


async def _serve(server: TargetServer) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    portals = await server.start()
    for portal in portals:
        host = f"[{portal.host}]" if ":" in portal.host else portal.host
        print(f"listening on {host}:{portal.port}", flush=True)
    for target in server.registry.targets.values():
        for number, lu in sorted(target.scsi.luns.items()):
            print(f"target {target.name} lun {number} {lu.backend.size} bytes", flush=True)
    print("ready", flush=True)
    await stop.wait()
    log.info("stopping")
    await server.stop()
    print("stopped", flush=True)
    return 0
