"""Test equipment shared by the test suite and ``tools/``: never imported by the target.

Shipped in the package on purpose (README "Tools"): ``tools/`` and ``tests/`` import
these harnesses by one name, and an installed copy keeps the crash, load and fuzz
harnesses an operator runs through ``tools/`` importable, to check that very build.
``tests/test_house_plan.py`` checks that no product module imports this package; its
only extra needs (hypothesis, scapy) come with the ``[test]`` extra.

* :mod:`.core` - a sans-I/O harness: a real :class:`~iscsi_vmtarget.iscsi.connection.
  TargetConnection` with a real login machine, driven by bytes, whose SCSI commands run
  on a real :class:`~iscsi_vmtarget.scsi.ScsiTarget` over a memory backend.
* :mod:`.pdu_strategies` - hypothesis strategies that generate and mutate PDUs.
* :mod:`.scapy_iscsi` - an iSCSI layer for scapy (BHS and every opcode's fields).
* :mod:`.crash`, :mod:`.vm_crash` - kill -9 cycles against a served LUN and a served VM
  under admin operations (``tools/crash-test``).
* :mod:`.fsrecord`, :mod:`.powercut`, :mod:`.powercut_ops`, :mod:`.powercut_io` - the
  power-cut simulator: record a process's file-system mutations, rebuild what a power
  cut leaves at each of them (ext4 model), check admin operations and the data path
  (``tools/powercut-test``).
* :mod:`.fuzz_campaign` - fuzzing the running target over TCP beside a verifying
  session (``tools/fuzz-campaign``).
* :mod:`.soak` - verifying sessions on served VMs under admin churn (``tools/soak``).
* :mod:`.load` - many concurrent sessions checking their own blocks (``tools/load-test``).
* :mod:`.process` - RSS and liveness of a target process.
* :mod:`.snapshot_chain` - a VM disk behind a chain of snapshots (the benchmarks).
* :mod:`.tgtd` - Debian's tgtd on 127.0.0.1, the baseline target for tests.
* :mod:`.ceph` - a Ceph cluster of our own (``tools/ceph-cluster``) for RBD tests.
"""
