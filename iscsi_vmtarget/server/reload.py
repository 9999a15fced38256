"""``SIGHUP`` (``systemctl reload``): re-read the configuration without dropping
sessions.

The managed configuration ``<state-dir>/conf/config.json`` is read from disk again
and made the daemon's configuration through the admin layer (``config.apply``, as
``iscsi-vmtarget config apply`` does): targets, LUNs, ACLs, grants and portals that
changed are applied live; sessions whose access did not change keep running, those
that lost it are logged out, exactly as for any other configuration change. Then
every VM the pools hold that the daemon does not serve yet (a pool added, a unit
copied in) is served (``vm.serve``). The ``serve --config`` TOML file and the
command line are read at start only: changing them needs a restart.
"""

from __future__ import annotations

import logging
from typing import Any

from .admin import AdminError, AdminServer
from .persist import PersistError

log = logging.getLogger("iscsi_vmtarget")


async def reload(admin: AdminServer) -> dict[str, Any]:
    """Reload (module docstring); returns the changes and the VMs newly served.
    AdminError or PersistError: the file cannot be used; nothing changed."""
    store = admin.manager.store
    document = store.load().to_dict()
    result = await admin.run("config.apply", {"document": document, "base": store.state_dir})
    served = []
    for vm in (await admin.run("vm.list", {}))["vms"]:
        try:
            if not (await admin.run("vm.serve", {"name": vm["name"]}))["was_served"]:
                served.append(vm["name"])
        except AdminError as exc:
            log.warning("reload: VM %s not served: %s", vm["name"], exc)
    return {"changes": result["changes"], "served": served}


async def reload_logged(admin: AdminServer) -> None:
    """:func:`reload` for a signal handler: its outcome is logged, never raised."""
    try:
        result = await reload(admin)
    except (AdminError, PersistError, OSError) as exc:
        log.error("reload failed, configuration unchanged: %s", exc)
        return
    log.warning(
        "reloaded: %d change(s)%s",
        len(result["changes"]),
        f"; now serving VM(s) {', '.join(result['served'])}" if result["served"] else "",
    )
