"""What a target connection is told, not negotiated: its limits (RFC 7143 leaves
them to the implementation)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ConnectionSettings:
    """Target-side knobs that are not negotiated."""

    cmd_window: int = 128  # MaxCmdSN - ExpCmdSN + 1 (§4.2.2.1)
    max_text_response: int = 65536
    # Largest write buffer one command may make us allocate: twice the Block Limits
    # MAXIMUM TRANSFER LENGTH we advertise (8 MiB). Without it a single 48-byte PDU
    # with W=1 and EDTL=0xFFFFFFFF would allocate 4 GiB.
    max_data_out_length: int = 16 << 20
    # What one connection may hold for commands still collecting Data-Out; past it a
    # command ends at once with TASK SET FULL (SAM-5 §5.3), so memory stays bounded
    # even when an initiator sends commands and never their data.
    max_tasks: int = 512
    max_buffered_data_out: int = 128 << 20
    # Stop handling PDUs while this much output waits for data_to_send (see ``stalled``):
    # an initiator that sends READs and never reads the answers cannot make us queue
    # gigabytes of Data-In.
    max_queued_output: int = 1 << 20
