"""iscsi_vmtarget: a pure-Python iSCSI target for virtual-machine storage units.

Layers (each a package): ``iscsi`` (sans-I/O protocol), ``scsi`` (SPC-4/SBC-3 device
server), ``storage`` (block backends), ``server`` (asyncio glue), ``cli``.
"""

__version__ = "0.1.0"
