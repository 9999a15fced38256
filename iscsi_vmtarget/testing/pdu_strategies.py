"""Hypothesis strategies: initiator PDUs (plausible and hostile) and byte mutations.

The plausible ones stay near a session's state (CmdSN around ExpCmdSN, a few ITTs and
TTTs, real CDBs) so the fuzzer reaches deep states - R2T bookkeeping, text
continuation, task management - instead of bouncing off the first check.
"""

from __future__ import annotations

import itertools

from hypothesis import strategies as st

from ..iscsi import pdu as P
from ..iscsi.text import encode_text

U32 = st.integers(0, 0xFFFFFFFF)
SMALL_TAG = st.sampled_from([0, 1, 2, 3, 0x7FFFFFFF, 0xFFFFFFFF])
LUN0 = bytes(8)
EXT_CDB_AHS = b"\x00\x05\x01\x00" + bytes(4)  # Extended CDB AHS (§11.2.2.3), 4 CDB bytes
LUNS = st.one_of(st.just(LUN0), st.binary(min_size=8, max_size=8), st.just(b"\x00\x01" + bytes(6)))

# Known negotiation keys plus garbage; values from each key's domain plus garbage.
KEYS = [
    "InitiatorName", "TargetName", "SessionType", "AuthMethod", "HeaderDigest",
    "DataDigest", "MaxRecvDataSegmentLength", "MaxBurstLength", "FirstBurstLength",
    "InitialR2T", "ImmediateData", "MaxOutstandingR2T", "MaxConnections",
    "ErrorRecoveryLevel", "DefaultTime2Wait", "DefaultTime2Retain", "DataPDUInOrder",
    "DataSequenceInOrder", "CHAP_A", "CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C",
    "SendTargets", "TargetAlias", "InitiatorAlias", "TaskReporting", "X-com.example.Foo",
    "iSCSIProtocolLevel", "OFMarker", "IFMarkInt",
]  # fmt: skip
VALUES = [
    "None", "CRC32C", "CRC32C,None", "Yes", "No", "Normal", "Discovery", "CHAP", "CHAP,None",
    "0", "1", "512", "8192", "16777215", "16777216", "4294967296", "-1", "0x10", "0b",
    "All", "", "Irrelevant", "Reject", "NotUnderstood", "5", "7,5", "0xzz",
    "iqn.2026-11.org.iscsi-vmtarget:fuzz", "iqn.2026-11.org.iscsi-vmtarget.test:fuzzer",
    "1~2", "x" * 300,
]  # fmt: skip

text_pairs = st.lists(
    st.tuples(
        st.one_of(st.sampled_from(KEYS), st.text("ABCXYZabc_-.:=", min_size=0, max_size=70)),
        st.one_of(st.sampled_from(VALUES), st.text(max_size=40)),
    ),
    max_size=12,
)


@st.composite
def text_data(draw: st.DrawFn) -> bytes:
    """key=value\\0 text, sometimes raw garbage, sometimes huge or repeated keys."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=300))
    if kind == 1:  # one key repeated (a classic crash in peers' text parsers)
        key = draw(st.sampled_from(KEYS))
        return encode_text([(key, draw(st.sampled_from(VALUES)))] * draw(st.integers(2, 200)))
    if kind == 2:  # a huge key or value
        return b"A" * draw(st.integers(60, 9000)) + b"=" + b"v" * draw(st.integers(0, 300)) + b"\0"
    pairs = draw(text_pairs)
    try:
        data = encode_text(pairs)
    except Exception:
        data = b"".join(f"{k}={v}".encode(errors="replace") + b"\0" for k, v in pairs)
    if data and draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]  # cut mid key (no NUL at the end)
    return data


CDBS = [
    bytes(6),  # TEST UNIT READY
    bytes([0x12, 0, 0, 0, 96, 0]),  # INQUIRY
    bytes([0x25]) + bytes(9),  # READ CAPACITY(10)
    bytes([0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0]),  # READ(10) lba 8, 8 blocks
    bytes([0x2A, 0, 0, 0, 0, 16, 0, 0, 64, 0]),  # WRITE(10) lba 16, 64 blocks (32 KiB)
    bytes([0x2A, 0x08, 0, 0, 0, 1, 0, 0, 1, 0]),  # WRITE(10) FUA, 1 block
    bytes([0x35]) + bytes(9),  # SYNCHRONIZE CACHE(10)
    bytes([0x88, 0]) + (2040).to_bytes(8, "big") + (16).to_bytes(4, "big") + bytes(2),
    bytes([0x8A, 0]) + (0xFFFFFFFFFFFFFFF0).to_bytes(8, "big") + (32).to_bytes(4, "big") + bytes(2),
    bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]),  # REPORT LUNS
]


@st.composite
def cdbs(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(min_size=1, max_size=16))
    cdb = bytearray(draw(st.sampled_from(CDBS)))
    if draw(st.booleans()):
        cdb[draw(st.integers(0, len(cdb) - 1))] = draw(st.integers(0, 255))
    return bytes(cdb)


@st.composite
def full_feature_pdu(draw: st.DrawFn, cmdsn: int, r2t_tags: list[int]) -> P.Pdu:
    """One initiator PDU for a session whose next CmdSN is ``cmdsn``."""
    sn = (cmdsn + draw(st.sampled_from([0, 0, 0, 1, 2, -1, 100, 1 << 31]))) & 0xFFFFFFFF
    itt = draw(SMALL_TAG)
    imm = draw(st.booleans())
    kind = draw(st.integers(0, 9))
    if kind <= 2:
        write = draw(st.booleans())
        edtl = draw(st.sampled_from([0, 512, 4096, 32768, 65536, 1 << 20, 1 << 25, 0xFFFFFFFF]))
        data = b"\x5a" * draw(st.sampled_from([0, 0, 512, 4096, 8192, 8193])) if write else b""
        return P.ScsiCommand(
            itt=itt, immediate=imm, final=draw(st.booleans()) or True, read=draw(st.booleans()),
            write=write, lun=draw(LUNS), expected_length=edtl, cmdsn=sn, cdb=draw(cdbs()),
            data=data, ahs=draw(st.sampled_from([b"", b"", bytes(4), EXT_CDB_AHS])),
        )  # fmt: skip
    if kind <= 4:
        ttt = draw(st.one_of(st.sampled_from(r2t_tags or [1]), SMALL_TAG))
        return P.DataOut(
            itt=itt, ttt=ttt, final=draw(st.booleans()), lun=draw(LUNS),
            datasn=draw(st.sampled_from([0, 0, 1, 2, 0xFFFFFFFF])),
            buffer_offset=draw(st.sampled_from([0, 512, 8192, 16384, 65536, 0xFFFFFE00])),
            data=b"\xa5" * draw(st.sampled_from([0, 512, 8192, 8193])),
        )  # fmt: skip
    if kind == 5:
        return P.NopOut(
            itt=itt, immediate=imm, ttt=draw(SMALL_TAG), cmdsn=sn, data=draw(st.binary(max_size=64))
        )
    if kind == 6:
        cont = draw(st.booleans())
        return P.TextRequest(
            itt=itt, immediate=imm, final=draw(st.booleans()), cont=cont,
            ttt=draw(SMALL_TAG), cmdsn=sn, data=draw(text_data()),
        )  # fmt: skip
    if kind == 7:
        return P.TaskMgmtRequest(
            itt=itt, immediate=imm, function=draw(st.integers(0, 0x7F)), lun=draw(LUNS),
            referenced_task_tag=draw(SMALL_TAG), cmdsn=sn,
            refcmdsn=(cmdsn + draw(st.integers(-2, 3))) & 0xFFFFFFFF,
        )  # fmt: skip
    if kind == 8:
        if draw(st.integers(0, 5)) == 0:
            return P.LogoutRequest(itt=itt, immediate=imm, reason=draw(st.integers(0, 3)), cmdsn=sn)
        return P.SnackRequest(itt=itt, snack_type=draw(st.integers(0, 15)))
    return draw(any_pdu())


@st.composite
def login_pdu(draw: st.DrawFn) -> P.LoginRequest:
    """A Login Request with arbitrary stages, flags, versions and negotiation text."""
    return P.LoginRequest(
        itt=draw(SMALL_TAG), transit=draw(st.booleans()), cont=draw(st.booleans()),
        csg=draw(st.integers(0, 3)), nsg=draw(st.integers(0, 3)),
        version_max=draw(st.sampled_from([0, 0, 1, 255])),
        version_min=draw(st.sampled_from([0, 0, 1])),
        isid=draw(st.sampled_from([bytes.fromhex("400001370000"), bytes(6)])),
        tsih=draw(st.sampled_from([0, 0, 1, 0xFFFF])), cid=draw(st.sampled_from([0, 1])),
        cmdsn=draw(st.sampled_from([1, 0, 0xFFFFFFFF])), data=draw(text_data()),
    )  # fmt: skip


@st.composite
def any_pdu(draw: st.DrawFn) -> P.Pdu:
    """Any PDU type (target-side opcodes included) with arbitrary field values."""
    cls = draw(st.sampled_from(list(P.PDU_TYPES.values())))
    kwargs: dict[str, object] = {}
    for name, _offset, width in cls.FIELDS:
        if width == P.U8:
            kwargs[name] = draw(st.integers(0, 0xFF))
        elif width == P.U16:
            kwargs[name] = draw(st.integers(0, 0xFFFF))
        elif width == P.U32:
            kwargs[name] = draw(U32)
        else:
            kwargs[name] = draw(st.binary(min_size=P._WIDTH[width], max_size=P._WIDTH[width]))
    for name, mask in cls.BITS:
        kwargs[name] = (
            draw(st.booleans())
            if mask & (mask - 1) == 0
            else draw(st.integers(0, mask >> ((mask & -mask).bit_length() - 1)))
        )
    pdu = cls(**kwargs)  # type: ignore[arg-type]
    pdu.immediate = draw(st.booleans())
    pdu.data = draw(st.binary(max_size=600))
    return pdu


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few byte-level mutations: bit flips, overwrites, cuts, inserts,
    and rewritten length fields (TotalAHSLength, DataSegmentLength)."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 6))
        if not buf:
            buf += draw(st.binary(min_size=1, max_size=64))
            continue
        i = draw(st.integers(0, len(buf) - 1))
        if op == 0:
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == 1:
            buf[i] = draw(st.integers(0, 255))
        elif op == 2:
            del buf[i:]
        elif op == 3:
            buf[i:i] = draw(st.binary(min_size=1, max_size=32))
        elif op == 4 and len(buf) >= 8:
            buf[4] = draw(st.integers(0, 255))  # TotalAHSLength (§11.2.1.5)
        elif op == 5 and len(buf) >= 8:
            buf[5:8] = draw(st.integers(0, 0xFFFFFF)).to_bytes(3, "big")  # DataSegmentLength
        else:
            buf[0] = (buf[0] & 0xC0) | draw(st.integers(0, 0x3F))  # opcode
    return bytes(buf)


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at arbitrary points, as TCP may deliver it."""
    if not data or draw(st.booleans()):
        return [data]
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    points = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]
