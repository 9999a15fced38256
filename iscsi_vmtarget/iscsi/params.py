"""Login key negotiation (RFC 7143 §6.2, §13): one table of keys and the target's Negotiator.

Every key is one :class:`KeyRow` in :data:`KEY_TABLE` (default, type, admissible range
or values, result function, phase, scope, who may send it, when it is irrelevant), in
the style of SPDK ``param.c`` and LIO ``iscsi_target_parameters.c``. The
:class:`Negotiator` never special-cases a key by name: it reads the row.

Answers follow RFC 7143 §6.2:

* unknown keys, including ``X-`` / ``X#`` private keys (§13.22), get ``NotUnderstood``;
* a key that does not apply (§6.2: e.g. FirstBurstLength when InitialR2T=Yes and
  ImmediateData=No, §13.14; the data-transfer keys of a discovery session; leading-only
  keys on a non-leading connection) gets ``Irrelevant``;
* a value that is not admissible (bad syntax, out of range, no acceptable list member)
  gets ``Reject`` and the key keeps its current value;
* a protocol violation (a key offered twice, unless it is a declaration restated with
  the same value; a target-only key from the initiator; a full-feature-only key in
  login) raises :class:`NegotiationError` carrying the login
  status (02/00, "initiator error", §11.13.5) the caller must answer with.

The Negotiator is one-sided: it answers what the initiator offers and makes no offers
of its own except the declarations a target owes (:meth:`Negotiator.declare`). So a
limit the target cannot live with at the RFC default could never be enforced; the
preferences are checked against the table for that (:meth:`TargetPreferences.check`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum, Flag

from ..errors import IscsiVmtargetError
from .text import (
    TextFormatError,
    encode_boolean,
    parse_boolean,
    parse_list,
    parse_number,
)

STATUS_INITIATOR_ERROR = 0x0200  # RFC 7143 §11.13.5: class 2, detail 0
MAX_ISCSI_NAME_LEN = 223  # RFC 7143 §4.2.7.1


class KeyType(Enum):
    """How a value is written and answered (RFC 7143 §6.1-6.2)."""

    BOOLEAN = "boolean"  # Yes/No, answered with the result function
    NUMERIC = "numeric"  # numerical-value in [low, high], answered with Min/Max
    LIST = "list"  # list-of-values, answered with the first acceptable member
    DECLARATIVE = "declarative"  # stated by the sender, not answered (§6.2)
    OBSOLETE = "obsolete"  # §13.25: answered with Reject, never NotUnderstood


class ResultFunction(Enum):
    """The outcome rule of a key (RFC 7143 §6.2.1-6.2.2)."""

    AND = "AND"
    OR = "OR"
    MIN = "Min"
    MAX = "Max"
    CHOICE = "first acceptable of the offerer's list"
    NONE = "declared"


class Phase(Enum):
    """When a key may be sent (the "Use" line of each RFC 7143 §13 key)."""

    LEADING_ONLY = "LO"  # login of the leading connection only
    LOGIN = "IO"  # login of every connection ("initialize only")
    ALL = "ALL"  # login and full feature phase
    FFP = "FFP"  # full feature phase only


class Scope(Enum):
    SESSION = "SW"
    CONNECTION = "CO"


class Sender(Flag):
    INITIATOR = 1
    TARGET = 2
    BOTH = 3


@dataclass(frozen=True)
class KeyRow:
    """One negotiable key of RFC 7143 §13."""

    name: str
    section: str
    type: KeyType
    result: ResultFunction
    phase: Phase
    scope: Scope
    senders: Sender
    default: str | None = None
    low: int = 0
    high: int = 0
    values: tuple[str, ...] = ()  # admissible values of LIST / enumerated keys
    ours: str | None = None  # TargetPreferences attribute holding the target's value
    irrelevant_when: tuple[str, ...] = ()  # names in IRRELEVANCE_RULES
    at_most: str | None = None  # integrity rule: value <= that key's value (§13.14)


_MAX_SEGMENT = (1 << 24) - 1
_DIGESTS = ("None", "CRC32C")

_B, _N, _L, _D, _O = (
    KeyType.BOOLEAN,
    KeyType.NUMERIC,
    KeyType.LIST,
    KeyType.DECLARATIVE,
    KeyType.OBSOLETE,
)
_LO, _IO, _ALL, _FFP = Phase.LEADING_ONLY, Phase.LOGIN, Phase.ALL, Phase.FFP
_SW, _CO = Scope.SESSION, Scope.CONNECTION
_I, _T, _IT = Sender.INITIATOR, Sender.TARGET, Sender.BOTH
_R = ResultFunction

#: Every key, in evaluation order: the keys of one PDU are evaluated in table order,
#: so the keys others depend on (SessionType, InitialR2T, ImmediateData,
#: MaxBurstLength) are settled first; answers keep the order of the request.
# fmt: off
KEY_TABLE: tuple[KeyRow, ...] = (
    KeyRow("SessionType", "§13.21", _D, _R.NONE, _LO, _SW, _I, "Normal",
           values=("Discovery", "Normal")),
    KeyRow("InitiatorName", "§13.5", _D, _R.NONE, _IO, _SW, _I),
    KeyRow("TargetName", "§13.4", _D, _R.NONE, _IO, _SW, _IT),
    KeyRow("InitiatorAlias", "§13.7", _D, _R.NONE, _ALL, _SW, _I),
    KeyRow("TargetAlias", "§13.6", _D, _R.NONE, _ALL, _SW, _T),
    KeyRow("TargetAddress", "§13.8", _D, _R.NONE, _ALL, _SW, _T),
    KeyRow("TargetPortalGroupTag", "§13.9", _D, _R.NONE, _IO, _SW, _T, low=0, high=65535),
    KeyRow("SendTargets", "§13.3", _D, _R.NONE, _FFP, _SW, _I),
    KeyRow("AuthMethod", "§12.1", _L, _R.CHOICE, _IO, _CO, _IT, "None",
           values=("KRB5", "SPKM1", "SPKM2", "SRP", "CHAP", "None"), ours="auth_methods"),
    KeyRow("HeaderDigest", "§13.1", _L, _R.CHOICE, _IO, _CO, _IT, "None",
           values=_DIGESTS, ours="header_digests"),
    KeyRow("DataDigest", "§13.1", _L, _R.CHOICE, _IO, _CO, _IT, "None",
           values=_DIGESTS, ours="data_digests"),
    KeyRow("MaxRecvDataSegmentLength", "§13.12", _D, _R.NONE, _ALL, _CO, _IT, "8192",
           low=512, high=_MAX_SEGMENT, ours="max_recv_data_segment_length"),
    KeyRow("MaxConnections", "§13.2", _N, _R.MIN, _LO, _SW, _IT, "1", low=1, high=65535,
           ours="max_connections", irrelevant_when=("discovery",)),
    KeyRow("InitialR2T", "§13.10", _B, _R.OR, _LO, _SW, _IT, "Yes",
           ours="initial_r2t", irrelevant_when=("discovery",)),
    KeyRow("ImmediateData", "§13.11", _B, _R.AND, _LO, _SW, _IT, "Yes",
           ours="immediate_data", irrelevant_when=("discovery",)),
    KeyRow("MaxBurstLength", "§13.13", _N, _R.MIN, _LO, _SW, _IT, "262144",
           low=512, high=_MAX_SEGMENT, ours="max_burst_length",
           irrelevant_when=("discovery",)),
    KeyRow("FirstBurstLength", "§13.14", _N, _R.MIN, _LO, _SW, _IT, "65536",
           low=512, high=_MAX_SEGMENT, ours="first_burst_length",
           irrelevant_when=("discovery", "no_unsolicited_data"), at_most="MaxBurstLength"),
    KeyRow("DefaultTime2Wait", "§13.15", _N, _R.MAX, _LO, _SW, _IT, "2", low=0, high=3600,
           ours="default_time2wait"),
    KeyRow("DefaultTime2Retain", "§13.16", _N, _R.MIN, _LO, _SW, _IT, "20", low=0, high=3600,
           ours="default_time2retain"),
    KeyRow("MaxOutstandingR2T", "§13.17", _N, _R.MIN, _LO, _SW, _IT, "1", low=1, high=65535,
           ours="max_outstanding_r2t", irrelevant_when=("discovery",)),
    KeyRow("DataPDUInOrder", "§13.18", _B, _R.OR, _LO, _SW, _IT, "Yes",
           ours="data_pdu_in_order", irrelevant_when=("discovery",)),
    KeyRow("DataSequenceInOrder", "§13.19", _B, _R.OR, _LO, _SW, _IT, "Yes",
           ours="data_sequence_in_order", irrelevant_when=("discovery",)),
    KeyRow("ErrorRecoveryLevel", "§13.20", _N, _R.MIN, _LO, _SW, _IT, "0", low=0, high=2,
           ours="error_recovery_level"),
    KeyRow("TaskReporting", "§13.23", _L, _R.CHOICE, _LO, _SW, _IT, "RFC3720",
           values=("RFC3720", "ResponseFence", "FastAbort"), ours="task_reporting"),
    KeyRow("iSCSIProtocolLevel", "§13.24", _N, _R.MIN, _LO, _SW, _IT, "1", low=0, high=31,
           ours="protocol_level"),
    KeyRow("IFMarker", "§13.25", _O, _R.NONE, _IO, _CO, _IT),
    KeyRow("OFMarker", "§13.25", _O, _R.NONE, _IO, _CO, _IT),
    KeyRow("IFMarkInt", "§13.25", _O, _R.NONE, _IO, _CO, _IT),
    KeyRow("OFMarkInt", "§13.25", _O, _R.NONE, _IO, _CO, _IT),
)
# fmt: on

KEYS: dict[str, KeyRow] = {row.name: row for row in KEY_TABLE}
_ORDER: dict[str, int] = {row.name: i for i, row in enumerate(KEY_TABLE)}

#: Conditions under which a key is Irrelevant (RFC 7143 §6.2), evaluated on the values
#: settled so far.
IRRELEVANCE_RULES: dict[str, Callable[[Negotiator], bool]] = {
    # §13.10-13.19: "Irrelevant when: SessionType=Discovery"
    "discovery": lambda n: n.value("SessionType") == "Discovery",
    # §13.14: "Irrelevant when: (InitialR2T=Yes and ImmediateData=No)"
    "no_unsolicited_data": lambda n: (
        n.value("InitialR2T") == "Yes" and n.value("ImmediateData") == "No"
    ),
}


class NegotiationError(IscsiVmtargetError):
    """The initiator broke the negotiation rules; ``status`` is the login status to send
    (class << 8 | detail, RFC 7143 §11.13.5)."""

    def __init__(self, message: str, status: int = STATUS_INITIATOR_ERROR) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TargetPreferences:
    """What the target offers or accepts (the ``ours`` column of :data:`KEY_TABLE`).

    Lists are the values we accept, in no order: the initiator's order decides
    (§6.2.1). ``cmdsn_window`` and ``chap_challenge_length`` are not negotiated: login
    responses carry MaxCmdSN = CmdSN + cmdsn_window - 1 (§11.13.4), CHAP challenges are
    that many random bytes (§12.1.3).
    """

    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 1048576
    first_burst_length: int = 262144
    max_outstanding_r2t: int = 1
    immediate_data: bool = True
    initial_r2t: bool = False
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0
    max_connections: int = 1
    default_time2wait: int = 2
    default_time2retain: int = 20
    header_digests: tuple[str, ...] = ("None", "CRC32C")
    data_digests: tuple[str, ...] = ("None", "CRC32C")
    task_reporting: tuple[str, ...] = ("RFC3720",)
    protocol_level: int = 1
    cmdsn_window: int = 1
    chap_challenge_length: int = 16

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse preferences the table says we could not honour (raises ValueError).

        A Min key whose default exceeds our limit (or a Max key whose default is below
        ours) would need a target-originated offer to be enforced when the initiator
        stays silent; the Negotiator makes none, so such a preference is refused here.
        """
        for row in KEY_TABLE:
            if row.ours is None or not hasattr(self, row.ours):
                continue
            ours = getattr(self, row.ours)
            if row.type is KeyType.LIST:
                if not ours or any(v not in row.values for v in ours):
                    raise ValueError(f"{row.ours} must be a subset of {row.values}")
            elif isinstance(ours, int) and not isinstance(ours, bool):
                if not row.low <= ours <= row.high:
                    raise ValueError(f"{row.ours}={ours} outside {row.low}..{row.high}")
                default = int(row.default or 0)
                if row.result is ResultFunction.MIN and ours < default:
                    raise ValueError(f"{row.ours}={ours} is below the RFC default {default}")
                if row.result is ResultFunction.MAX and ours > default:
                    raise ValueError(f"{row.ours}={ours} is above the RFC default {default}")
        if self.first_burst_length > self.max_burst_length:
            raise ValueError("first_burst_length exceeds max_burst_length (§13.14)")
        if self.cmdsn_window < 1 or not 16 <= self.chap_challenge_length <= 1024:
            raise ValueError("cmdsn_window >= 1 and 16 <= chap_challenge_length <= 1024")


@dataclass(frozen=True)
class SessionParams:
    """The outcome of login negotiation (defaults are the RFC 7143 §13 defaults)."""

    header_digest: bool = False
    data_digest: bool = False
    max_recv_data_segment_length: int = 8192  # the initiator's: most WE may send per PDU
    target_max_recv_data_segment_length: int = 8192  # ours: most it may send us
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    initial_r2t: bool = True
    immediate_data: bool = True
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_connections: int = 1
    session_type: str = "Normal"
    initiator_name: str = ""
    initiator_alias: str | None = None
    target_name: str | None = None


class Negotiator:
    """Answers the keys one initiator offers during one login (RFC 7143 §6.2, §6.3).

    ``leading`` is False for a connection joining an existing session (TSIH != 0):
    leading-only keys are then Irrelevant. ``auth_methods`` is what this login accepts
    for AuthMethod (set by the login machine once it knows the target).
    """

    def __init__(
        self,
        prefs: TargetPreferences,
        *,
        leading: bool = True,
        auth_methods: Sequence[str] = ("None",),
    ) -> None:
        self.prefs = prefs
        self.leading = leading
        self.auth_methods = tuple(auth_methods)
        self._values: dict[str, str] = {}  # settled outcomes and declarations
        self._received: set[str] = set()  # every key the initiator sent (§6.3: once)
        self._declared: dict[str, str] = {}  # what we declared

    # -- queries -------------------------------------------------------------------
    def value(self, key: str) -> str | None:
        """The current value of a key: settled, else the table default."""
        if key in self._values:
            return self._values[key]
        row = KEYS.get(key)
        return row.default if row else None

    def number(self, key: str) -> int:
        value = self.value(key)
        assert value is not None, key
        return parse_number(value)

    def received(self, key: str) -> bool:
        return key in self._received

    @property
    def session_type(self) -> str:
        return self.value("SessionType") or "Normal"

    # -- negotiation -----------------------------------------------------------------
    def negotiate(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """Answer one request's keys (§6.2); raises NegotiationError on a violation."""
        answers: dict[int, tuple[str, str]] = {}
        order = sorted(range(len(pairs)), key=lambda i: _ORDER.get(pairs[i][0], len(_ORDER)))
        for i in order:
            key, value = pairs[i]
            answer = self._answer(key, value)
            if answer is not None:
                answers[i] = (key, answer)
        return [answers[i] for i in sorted(answers)]

    def _answer(self, key: str, value: str) -> str | None:
        row = KEYS.get(key)
        if key in self._received:
            if (
                row is not None
                and row.type is KeyType.DECLARATIVE
                and self._values.get(key) == value
            ):
                # Interoperability: libiscsi repeats InitiatorName, TargetName and
                # SessionType, unchanged, in its first operational-stage request after
                # CHAP. Restating the same declaration changes nothing; ignore it.
                return None
            # §6.3: an attempt to renegotiate or redeclare a key MUST be detected; "If
            # such an attempt is detected by the target, the target MUST respond with
            # Login reject (initiator error)".
            raise NegotiationError(f"{key} offered twice")
        self._received.add(key)
        if row is None:
            return "NotUnderstood"  # §6.2, including X- and X# keys (§13.22)
        if not row.senders & Sender.INITIATOR:
            raise NegotiationError(f"{key} may only be sent by a target")
        if row.phase is Phase.FFP:
            raise NegotiationError(f"{key} is not allowed during login")
        if row.phase is Phase.LEADING_ONLY and not self.leading:
            return "Irrelevant"
        if any(IRRELEVANCE_RULES[rule](self) for rule in row.irrelevant_when):
            return "Irrelevant"
        return _ANSWER_BY_TYPE[row.type](self, row, value)

    def _ours(self, row: KeyRow) -> object:
        assert row.ours is not None
        if row.ours == "auth_methods":
            return self.auth_methods
        return getattr(self.prefs, row.ours)

    def _boolean(self, row: KeyRow, value: str) -> str:
        """§6.2.2: AND / OR of the offer and what we would choose."""
        try:
            offered = parse_boolean(value)
        except TextFormatError:
            return "Reject"
        ours = bool(self._ours(row))
        outcome = offered and ours if row.result is ResultFunction.AND else offered or ours
        self._values[row.name] = encode_boolean(outcome)
        return self._values[row.name]

    def _numeric(self, row: KeyRow, value: str) -> str:
        """§6.2.2: Min / Max of the offer and ours, within the row's range."""
        try:
            offered = parse_number(value)
        except TextFormatError:
            return "Reject"
        if not row.low <= offered <= row.high:
            return "Reject"
        ours = self._ours(row)
        assert isinstance(ours, int)
        outcome = min(offered, ours) if row.result is ResultFunction.MIN else max(offered, ours)
        if row.at_most is not None:
            outcome = min(outcome, self.number(row.at_most))
        self._values[row.name] = str(outcome)
        return self._values[row.name]

    def _list(self, row: KeyRow, value: str) -> str:
        """§6.2.1: the first value of the offerer's list that we accept, else Reject."""
        try:
            offered = parse_list(value)
        except TextFormatError:
            return "Reject"
        ours = self._ours(row)
        assert isinstance(ours, tuple)
        for item in offered:
            if item in row.values and item in ours:
                self._values[row.name] = item
                return item
        return "Reject"

    def _declarative(self, row: KeyRow, value: str) -> str | None:
        """§6.2: a declaration is recorded, not answered; an inadmissible one is rejected."""
        if row.high:
            try:
                if not row.low <= parse_number(value) <= row.high:
                    return "Reject"
            except TextFormatError:
                return "Reject"
        elif row.values and value not in row.values:
            return "Reject"
        elif row.name.endswith("Name") and not 0 < len(value.encode()) <= MAX_ISCSI_NAME_LEN:
            return "Reject"
        self._values[row.name] = value
        return None

    def _obsolete(self, row: KeyRow, value: str) -> str:
        """§13.25: IFMarker/OFMarker SHOULD and IFMarkInt/OFMarkInt MUST get Reject."""
        return "Reject"

    # -- the target's own declarations ---------------------------------------------------
    def declare(self, key: str, value: str) -> tuple[str, str]:
        """Record a declaration the target sends (e.g. TargetPortalGroupTag, §13.9)."""
        if key in self._declared:
            raise ValueError(f"{key} already declared")  # §6.3: declare once
        self._declared[key] = value
        return key, value

    def declared(self, key: str) -> bool:
        return key in self._declared

    def operational_declarations(self) -> list[tuple[str, str]]:
        """Declarations owed once the operational keys are in play: our
        MaxRecvDataSegmentLength (§13.12), once per connection."""
        key = "MaxRecvDataSegmentLength"
        if key in self._declared:
            return []
        return [self.declare(key, str(self.prefs.max_recv_data_segment_length))]

    # -- outcome ---------------------------------------------------------------------
    def session_params(self) -> SessionParams:
        """The negotiated parameters (defaults where nothing was settled)."""
        max_burst = self.number("MaxBurstLength")
        ours_declared = self._declared.get("MaxRecvDataSegmentLength")
        discovery = self.session_type == "Discovery"
        return SessionParams(
            header_digest=self.value("HeaderDigest") == "CRC32C",
            data_digest=self.value("DataDigest") == "CRC32C",
            max_recv_data_segment_length=self.number("MaxRecvDataSegmentLength"),
            # Until we declare, the initiator assumes the default 8192 (§13.12).
            target_max_recv_data_segment_length=int(ours_declared or 8192),
            max_burst_length=max_burst,
            # §13.14: "FirstBurstLength MUST NOT exceed MaxBurstLength".
            first_burst_length=min(self.number("FirstBurstLength"), max_burst),
            initial_r2t=self.value("InitialR2T") == "Yes",
            immediate_data=self.value("ImmediateData") == "Yes",
            max_outstanding_r2t=self.number("MaxOutstandingR2T"),
            data_pdu_in_order=self.value("DataPDUInOrder") == "Yes",
            data_sequence_in_order=self.value("DataSequenceInOrder") == "Yes",
            error_recovery_level=self.number("ErrorRecoveryLevel"),
            default_time2wait=self.number("DefaultTime2Wait"),
            default_time2retain=self.number("DefaultTime2Retain"),
            max_connections=self.number("MaxConnections"),
            session_type=self.session_type,
            initiator_name=self.value("InitiatorName") or "",
            initiator_alias=self.value("InitiatorAlias"),
            target_name=None if discovery else self.value("TargetName"),
        )


_ANSWER_BY_TYPE: dict[KeyType, Callable[[Negotiator, KeyRow, str], str | None]] = {
    KeyType.BOOLEAN: Negotiator._boolean,
    KeyType.NUMERIC: Negotiator._numeric,
    KeyType.LIST: Negotiator._list,
    KeyType.DECLARATIVE: Negotiator._declarative,
    KeyType.OBSOLETE: Negotiator._obsolete,
}
