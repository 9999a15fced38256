"""The systemd readiness protocol, ``sd_notify(3)``: one datagram of ``KEY=VALUE``
lines to the AF_UNIX socket ``$NOTIFY_SOCKET`` names (``@`` for the abstract
namespace). A no-op when not started by systemd (no ``$NOTIFY_SOCKET``). A few lines
of our own rather than a dependency: the protocol is one ``sendto``.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("iscsi_vmtarget")


def notify(*lines: str) -> bool:
    """Send ``lines`` (``READY=1``, ``RELOADING=1``, ``STOPPING=1``, ``STATUS=...``);
    False if there is no socket to send to or the send failed (logged, never raised:
    a daemon must not stop serving because its supervisor went away)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), address)
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", path, exc)
        return False
    return True


def reloading() -> bool:
    """``RELOADING=1`` with the monotonic time systemd wants with it (systemd 253+)."""
    return notify(
        "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
    )
