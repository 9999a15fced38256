"""``vm receive`` cut short by a power cut (found by tools/powercut-test, scenario
``receive``): its three steps - the replica file, the receiving target, LUN 0 on the
file - leave, cut between two, a file without its target or a target without its LUN,
and ``vm receive`` again used to refuse ("already receiving") for good. It now undoes
the leftover and receives afresh; a whole receive and a replica that rounds reached
are still refused."""

from __future__ import annotations

import io

from iscsi_vmtarget.cli.vm_replicate import replica_path, replica_target
from iscsi_vmtarget.server.admin import call
from iscsi_vmtarget.server.persist import ConfigStore
from iscsi_vmtarget.storage import FileBackend
from iscsi_vmtarget.storage.file import create_sparse_file
from iscsi_vmtarget.testing.powercut_replica import round_into
from iscsi_vmtarget.vm import StateDir, VmManager
from tests.vm.test_cli import Cli, cli  # noqa: F401 - the fixture

SIZE = 4 << 20


def whole(cli: Cli, name: str) -> bool:  # noqa: F811
    """The receiving target exists with LUN 0 on the replica file, of SIZE bytes."""
    spec = ConfigStore(str(cli.state)).load().target(replica_target(name))
    path = replica_path(str(cli.state), name)
    return (
        spec is not None
        and [(lun.number, lun.path, lun.size) for lun in spec.luns] == [(0, path, SIZE)]
        and FileBackend(path, read_only=True).size == SIZE
    )


def receive(cli: Cli, name: str) -> tuple[int, str, str]:  # noqa: F811
    return cli("vm", "receive", name, "--size", str(SIZE))


def test_a_file_left_without_its_target_is_received_again(cli: Cli) -> None:  # noqa: F811
    path = replica_path(str(cli.state), "r")
    (cli.state / "replicas").mkdir(parents=True)
    create_sparse_file(path, 0)  # cut inside the file's creation: still empty
    code, out, err = receive(cli, "r")
    assert code == 0, err
    assert f"undid a receive cut short: removed {path}" in out
    assert whole(cli, "r")


def test_a_target_left_without_its_lun_is_received_again(cli: Cli) -> None:  # noqa: F811
    path = replica_path(str(cli.state), "r")
    (cli.state / "replicas").mkdir(parents=True)
    create_sparse_file(path, SIZE)
    call(str(cli.state), "target.create", {"name": replica_target("r")})  # cut before lun.map
    code, out, err = receive(cli, "r")
    assert code == 0, err
    assert f"removed target {replica_target('r')} and {path}" in out
    assert whole(cli, "r")


def test_a_whole_receive_and_a_written_replica_are_refused(cli: Cli) -> None:  # noqa: F811
    assert receive(cli, "r")[0] == 0
    code, _out, err = receive(cli, "r")
    assert code == 1 and "already receiving VM r" in err
    # a replica that a round reached, whose target a promote cut short deleted
    assert cli("vm", "create", "r2", "--disk", "2M", "--memory", "1M")[0] == 0
    path = replica_path(str(cli.state), "r2")
    create_sparse_file(path, 64 << 20)
    with VmManager(StateDir.at(str(cli.state))) as manager:
        manager.write_state("r2", io.BytesIO(b"s" * 4096), 4096)
        round_into(manager, "r2", cli.state / "replicas" / "r2.replica")
    code, _out, err = receive(cli, "r2")
    assert code == 1 and "'vm promote r2' resumes the VM from it" in err
