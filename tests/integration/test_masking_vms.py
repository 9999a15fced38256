"""The enumeration attack on VM-derived exports, against the real server.

VM ``a`` (two disks) is granted to GOOD (LUN 0 only), VM ``b`` to OTHER, VM ``c`` to
nobody; ``vm receive`` waits for REPLICATOR. After each kind of derived export comes
to exist - a snapshot exported, a clone (of a snapshot, and live), a moved VM, a
reverted VM, a promoted replica, a restart - every
target the daemon exports is attacked by a stranger and by the initiator granted only
on the other VM: SendTargets lists none of them, every login is refused 02/02, so no
LUN is read. The granted initiator's own session answers only its mapped LUN numbers: LUN 0..255 in
every addressing method (SAM-5 §4.7.7: peripheral, flat, logical unit, extended flat
3- and 5-byte) is LOGICAL UNIT NOT SUPPORTED (25h/00h) for every other number.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from iscsi_vmtarget.client import Initiator, InitiatorError, LoginFailed
from iscsi_vmtarget.server.vm_luns import DEFAULT_BASE_IQN
from iscsi_vmtarget.vm import StateDir, VmManager
from tests.conftest import RunningTarget, start_with_config
from tests.integration.test_masking_names import login
from tests.integration.test_vm_move_live import ivt

MIB = 1 << 20
GOOD = "iqn.2026-11.test:good"
OTHER = "iqn.2026-11.test:other"
STRANGER = "iqn.2026-11.test:evil"
REPLICATOR = "iqn.2026-11.test:replicator"
READ10 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0])  # LBA 0, one block
NOT_SUPPORTED = (2, 5, (0x25, 0x00))  # CHECK CONDITION, ILLEGAL REQUEST, 25h/00h


def addresses(n: int) -> Iterator[bytes]:
    """LUN ``n`` in every single-level address method that can name it (SAM-5 §4.7.7)."""
    yield bytes([0x00, n]) + bytes(6)  # peripheral device, bus 0
    yield bytes([0x40 | n >> 8, n & 0xFF]) + bytes(6)  # flat space
    if n < 32:
        yield bytes([0x80, n]) + bytes(6)  # logical unit: target 0, bus 0
    yield bytes([0xD2]) + n.to_bytes(3, "big") + bytes(4)  # extended flat, 3 bytes
    yield bytes([0xE2]) + n.to_bytes(5, "big") + bytes(2)  # extended flat, 5 bytes


def owner(target: str) -> str | None:
    """Who is granted a target: the initiator of the VM it derives from."""
    suffix = target.rpartition(":")[2]
    if suffix.startswith(("vm.a.", "vm.a2")) or suffix == "vm.a":
        return GOOD
    if suffix.startswith(("vm.b.", "vm.b2")) or suffix in ("vm.b", "vm.r"):
        return OTHER
    if suffix == "replica.r":
        return REPLICATOR
    return None


class Attack:
    """The enumeration, round after round, against one running daemon."""

    def __init__(self, target: RunningTarget) -> None:
        self.target = target
        self.swept: set[str] = set()

    def session(self, initiator: str, target: str | None) -> Initiator:
        return login(self.target, initiator, target)

    def listed(self, initiator: str, value: str = "All") -> list[str]:
        with self.session(initiator, None) as discovery:
            return [v for k, v in discovery.send_targets(value) if k == "TargetName"]

    def round(self, *expected: str) -> None:
        """Every exported target (they must be ``expected`` exactly) attacked by each
        initiator: only the owner lists it and logs in; its own session is swept."""
        exported = sorted(self.listed(GOOD) + self.listed(OTHER) + self.listed(REPLICATOR))
        assert exported == sorted(f"{DEFAULT_BASE_IQN}:{e}" for e in expected)
        assert self.listed(STRANGER) == []
        for name in exported:
            for who in (STRANGER, GOOD, OTHER, REPLICATOR):
                if who == owner(name):
                    continue
                assert self.listed(who, name) == []  # SendTargets=<name> (RFC 7143 App. C)
                try:
                    self.session(who, name).close()
                except LoginFailed as exc:
                    assert (exc.status_class, exc.status_detail) == (2, 2), (who, name)
                else:
                    raise AssertionError(f"{who} logged into {name}")
            if name not in self.swept and owner(name) != REPLICATOR:
                one_disk = owner(name) == GOOD or name.endswith(":vm.r")
                self.sweep(name, {0} if one_disk else {0, 1})
                self.swept.add(name)

    def sweep(self, name: str, mapped: set[int], who: str | None = None) -> None:
        """The owner's (or ``who``'s) session: LUN 0..255 in every method; only
        ``mapped`` answer."""
        with self.session(who or owner(name) or "", name) as ini:
            for n in mapped:
                ini.command(bytes(6), lun=n)  # the power-on unit attention
            for n in range(256):
                for raw in addresses(n):
                    rsp = ini.command(READ10, lun_raw=raw, read_length=512)
                    if n in mapped:
                        assert rsp.status == 0 and len(rsp.data) == 512, (name, raw.hex())
                    else:
                        got = (rsp.status, rsp.sense_key, rsp.asc_ascq)
                        assert got == NOT_SUPPORTED and not rsp.data, (name, raw.hex(), got)


def test_no_export_of_a_vm_reaches_an_initiator_it_is_not_granted_to(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with VmManager(StateDir.at(str(state))) as manager:
        manager.catalog.create_directory("p2", None)
        manager.create("a", disk=2 * MIB, memory=MIB, secondaries=(2 * MIB,))
        manager.create("b", disk=2 * MIB, memory=MIB, secondaries=(2 * MIB,))
        manager.create("c", disk=2 * MIB, memory=MIB)  # granted to nobody: seen by nobody
    source = tmp_path / "source"  # another site, replicating its VM r here
    with VmManager(StateDir.at(str(source))) as manager:
        manager.create("r", disk=2 * MIB, memory=MIB)
    ivt(state, "acl", "add", "--vm", "a", GOOD, "--luns", "0")  # offline: saved
    ivt(state, "acl", "add", f"{DEFAULT_BASE_IQN}:vm.b", OTHER)  # a VM target: b's grant
    config = f'state_dir = "{state}"\nexport_vms = true\n'  # no demo target: VMs only
    target = start_with_config(tmp_path / "serve", config, "--state-dir", str(state))
    attack = Attack(target)
    try:
        ivt(state, "vm", "receive", "r", "--size", "47M", "--initiator", REPLICATOR)
        attack.round("vm.a", "vm.b", "replica.r")

        for vm in ("a", "b"):  # snapshot exports (through the daemon)
            ivt(state, "vm", "snapshot", vm, "s1")
            ivt(state, "vm", "snapshot", "export", vm, "s1")
        attack.round("vm.a", "vm.b", "vm.a.snap.s1", "vm.b.snap.s1", "replica.r")

        out = ivt(state, "vm", "clone", "a", "a2", "--from-snapshot", "s1").stdout
        assert "grants copied from a: 1 initiator" in out
        derived = ("vm.a", "vm.a2", "vm.b", "vm.a.snap.s1", "vm.b.snap.s1", "replica.r")
        attack.round(*derived)

        out = ivt(state, "vm", "clone", "b", "b2").stdout  # live: snapshot + linked clone
        assert "grants copied from b: 1 initiator" in out and "served by the running" in out
        derived = (*derived, "vm.b2")
        attack.round(*derived)

        ivt(state, "vm", "move", "b", "--pool", "p2")  # live, through the daemon
        ivt(state, "vm", "revert", "a", "s1")
        attack.round(*derived)

        replica = f"iscsi://127.0.0.1:{target.port}/{DEFAULT_BASE_IQN}:replica.r/0"
        ivt(source, "vm", "replicate", "r", "--to", replica, "--initiator-name", REPLICATOR)
        key = str(source / "master.key")
        out = ivt(state, "vm", "promote", "r", "--source-key", key, "--grant", OTHER).stdout
        assert f"VM r granted to {OTHER}" in out
        derived = (*(d for d in derived if d != "replica.r"), "vm.r")
        attack.round(*derived)  # the promoted replica: its --grant only
        listed = json.loads(ivt(state, "acl", "list", "--json").stdout)
        assert {v["vm"]: [g["initiator"] for g in v["grants"]] for v in listed["vms"]} == {
            "a": [GOOD],
            "a2": [GOOD],
            "b": [OTHER],
            "b2": [OTHER],
            "r": [OTHER],
        }
    finally:
        target.stop()
    again = start_with_config(tmp_path / "again", config, "--state-dir", str(state))
    try:  # the grants are restored with the VMs; the sweeps are done
        Attack(again).round(*derived)
    finally:
        again.stop()


def test_grants_apply_live_and_revoking_logs_the_session_out(tmp_path: Path) -> None:
    """``acl add --vm``/``acl default add`` open a served VM and its snapshot export at
    once; ``acl remove`` logs the session out; an old ``config apply`` document (no
    grants in it) keeps them."""
    state = tmp_path / "state"
    with VmManager(StateDir.at(str(state))) as manager:
        manager.create("a", disk=2 * MIB, memory=MIB)
    config = f'state_dir = "{state}"\nexport_vms = true\n'
    target = start_with_config(tmp_path / "serve", config, "--state-dir", str(state))
    attack = Attack(target)
    own, snap = f"{DEFAULT_BASE_IQN}:vm.a", f"{DEFAULT_BASE_IQN}:vm.a.snap.s1"
    try:
        ivt(state, "vm", "snapshot", "a", "s1")
        ivt(state, "vm", "snapshot", "export", "a", "s1")
        assert attack.listed(GOOD) == []
        out = ivt(state, "acl", "add", "--vm", "a", GOOD).stdout
        assert f"+ grant a {GOOD}" in out and "saved for the next start" not in out
        assert attack.listed(GOOD) == [own, snap]
        session = attack.session(GOOD, own)
        assert session.command(bytes(6)).status in (0, 2)  # GOOD (or its unit attention)
        ivt(state, "acl", "remove", "--vm", "a", GOOD)
        assert attack.listed(GOOD) == []
        with session, pytest.raises(InitiatorError, match="connection closed"):
            session.command(bytes(6))  # the daemon logged the session out
        ivt(state, "acl", "default", "add", OTHER)  # every VM, every export of it
        assert attack.listed(OTHER) == [own, snap] and attack.listed(STRANGER) == []
        old = tmp_path / "old.json"  # a document from before grants: no vms key
        old.write_text(json.dumps({"version": 1, "targets": []}))
        ivt(state, "config", "apply", str(old))
        assert attack.listed(OTHER) == [own, snap]
    finally:
        target.stop()
