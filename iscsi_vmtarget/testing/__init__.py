"""Test support shared by the test suite and ``tools/``: never imported by the target.

* :mod:`.core` - a sans-I/O harness: a real :class:`~iscsi_vmtarget.iscsi.connection.
  TargetConnection` with a real login machine, driven by bytes, whose SCSI commands run
  on a real :class:`~iscsi_vmtarget.scsi.ScsiTarget` over a memory backend.
* :mod:`.pdu_strategies` - hypothesis strategies that generate and mutate PDUs.
* :mod:`.scapy_iscsi` - an iSCSI layer for scapy (BHS and every opcode's fields).
* :mod:`.process` - RSS and liveness of a target process.
* :mod:`.snapshot_chain` - a VM disk behind a chain of snapshots (the benchmarks).
"""
