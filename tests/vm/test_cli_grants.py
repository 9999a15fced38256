"""Grants through the CLI, offline (no daemon): ``acl add --vm``, ``acl default``,
``acl list``; a clone starts with its source's grants (or none), a deleted VM's
grants go with it."""

from __future__ import annotations

from iscsi_vmtarget.server.vm_luns import DEFAULT_BASE_IQN
from tests.vm.test_cli import MIB, Cli, cli  # noqa: F401  (cli: the fixture)

GOOD = "iqn.2026-11.test:good"
RAW = "iqn.2026-11.test:backup"
HYPERVISOR = "iqn.2026-11.test:hypervisor"


def grants(run: Cli) -> dict[str, list[str]]:
    listed = run.json("acl", "list")
    return {v["vm"]: [g["initiator"] for g in v["grants"]] for v in listed["vms"]}  # type: ignore[index]


def test_grants_follow_the_vm_through_clone_and_delete(cli: Cli) -> None:  # noqa: F811
    assert cli("vm", "create", "web", "--disk", str(2 * MIB), "--memory", str(MIB))[0] == 0
    code, out, _ = cli("acl", "add", "--vm", "web", GOOD, "--luns", "0")
    assert code == 0 and f"+ grant web {GOOD}" in out and "saved for the next start" in out
    assert cli("acl", "add", f"{DEFAULT_BASE_IQN}:vm.web", RAW, "--view", "raw")[0] == 0
    assert cli("acl", "default", "add", HYPERVISOR)[0] == 0
    code, out, _ = cli("acl", "list")
    assert code == 0
    assert f"vm web  {GOOD} luns 0=0" in out and f"vm web  {RAW} luns all" in out
    assert f"default (every VM)  {HYPERVISOR} luns all" in out
    assert cli("acl", "default", "list")[1].strip() == f"default (every VM)  {HYPERVISOR} luns all"

    assert cli("vm", "snapshot", "web", "s1")[0] == 0
    code, out, _ = cli("vm", "clone", "web", "copy", "--from-snapshot", "s1")
    assert code == 0 and "grants copied from web: 2 initiators" in out
    code, out, _ = cli("vm", "clone", "web", "bare", "--from-snapshot", "s1", "--no-grants")
    assert code == 0 and "VM bare starts with no grants" in out
    assert grants(cli) == {"web": [RAW, GOOD], "copy": [RAW, GOOD]}

    code, out, _ = cli("vm", "delete", "copy")
    assert code == 0 and "dropped the grants of VM copy (2 initiators)" in out
    assert grants(cli) == {"web": [RAW, GOOD]}

    assert cli("acl", "remove", "--vm", "web", GOOD)[0] == 0
    code, _, err = cli("acl", "remove", "--vm", "web", GOOD)
    assert code == 1 and f"VM web has no grant for {GOOD}" in err
    code, _, err = cli("acl", "remove", "--vm", "web", HYPERVISOR)
    assert code == 1 and "it is a default grant" in err
    code, _, err = cli("acl", "add", "--vm", "web", "iqn.x:a", "iqn.x:b")
    assert code == 2 and "give --vm NAME INITIATOR" in err
    code, _, err = cli("acl", "add", "--vm", "nope", GOOD)
    assert code == 1 and "no VM named 'nope'" in err
