"""The login phase, target side (RFC 7143 §6.3, §11.12-11.13, §13), one machine per connection.

Sans-I/O: :meth:`LoginMachine.receive` takes one decoded Login Request and returns the
one Login Response to send. The stage machine is the table :data:`TRANSITIONS`,
``(stage, request kind) -> Transition``; a pair that is not in it is a protocol error
answered with status 02/00 (initiator error); after any response with a non-zero
Status-Class the server closes the connection (§11.13.5).

Stages follow the CSG/NSG codes of §11.12.3: SecurityNegotiation (0) ->
LoginOperationalNegotiation (1) -> FullFeaturePhase (3); either of the first two may
be skipped when the request asks for it and the target has nothing to require there.
The ``*_SENDING`` stages hold a response longer than 8192 bytes that is being sent in
C=1 pieces, each acknowledged by an empty request (§6.5, §11.13.2).

Sequence numbers (§11.13.4, §4.2.2.1): the first response's StatSN is the ExpStatSN of
the first request (the value the initiator expects, so no randomness is spent); every
later response, failures included, carries the next one. ExpCmdSN is the CmdSN of the
login requests (they are immediate, so it does not advance) and MaxCmdSN is
``CmdSN + prefs.cmdsn_window - 1`` (window 1 by default: the first full-feature
response opens the real window).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum, IntEnum

from ..errors import IscsiVmtargetError
from .chap import ChapError, ChapStage, RandomBytes, TargetChap
from .directory import ChapSecret, Portal, TargetDirectory, TargetEntry
from .names import IscsiNameError, normalize_name
from .params import (
    MAX_ISCSI_NAME_LEN,
    NegotiationError,
    Negotiator,
    SessionParams,
    TargetPreferences,
)
from .pdu import LoginRequest, LoginResponse
from .serial import sn_add
from .text import TextFormatError, encode_text, parse_text

LOGIN_MAX_DATA = 8192  # §13.12: during login the initiator's MaxRecvDataSegmentLength is 8192
MAX_LOGIN_TEXT = 65536  # our cap on one request's text joined across C=1 PDUs
VERSION = 0x00  # §11.12.4: the only version defined


class LoginStatus(IntEnum):
    """Status-Class << 8 | Status-Detail (RFC 7143 §11.13.5)."""

    SUCCESS = 0x0000
    TARGET_MOVED_TEMPORARILY = 0x0101
    TARGET_MOVED_PERMANENTLY = 0x0102
    INITIATOR_ERROR = 0x0200
    AUTHENTICATION_FAILURE = 0x0201
    AUTHORIZATION_FAILURE = 0x0202
    NOT_FOUND = 0x0203
    TARGET_REMOVED = 0x0204
    UNSUPPORTED_VERSION = 0x0205
    TOO_MANY_CONNECTIONS = 0x0206
    MISSING_PARAMETER = 0x0207
    CANT_INCLUDE_IN_SESSION = 0x0208
    SESSION_TYPE_NOT_SUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300
    SERVICE_UNAVAILABLE = 0x0301
    OUT_OF_RESOURCES = 0x0302


class LoginFailure(IscsiVmtargetError):
    """Ends the login with a failure response carrying ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = LoginStatus(status)


# ---------------------------------------------------------------------------------------
# Session registry
# ---------------------------------------------------------------------------------------


class SessionTableFull(IscsiVmtargetError, RuntimeError):
    """Every TSIH is in use (login answers 03/02, out of resources)."""


@dataclass
class SessionRecord:
    """One live session as the login phase needs to know it (§4.4.3: I_T nexus + TSIH)."""

    tsih: int
    initiator_name: str
    isid: bytes
    target_name: str | None
    max_connections: int = 1
    cids: set[int] = field(default_factory=set)


def _session_key(
    initiator_name: str, isid: bytes, target_name: str | None
) -> tuple[str, bytes, str | None]:
    # iSCSI names compare case-insensitively (§4.2.7.2: they are normalized lowercase).
    return initiator_name.lower(), bytes(isid), target_name.lower() if target_name else None


class SessionTable:
    """Pure registry of live sessions, shared by all connections of a server.

    The login machine :meth:`add`\\ s a session (or :meth:`attach`\\ es a connection) when
    it sends the final login response; the server :meth:`detach`\\ es connections and
    :meth:`remove`\\ s sessions when they end, including a session that a login
    reinstated (``LoginResult.reinstated_tsih``). :meth:`remove` is idempotent.
    """

    def __init__(self) -> None:
        self._by_tsih: dict[int, SessionRecord] = {}
        self._by_key: dict[tuple[str, bytes, str | None], int] = {}
        self._next = 1

    def find(self, initiator_name: str, isid: bytes, target_name: str | None) -> int | None:
        """The TSIH of the live session of this I_T nexus (InitiatorName+ISID, target)."""
        return self._by_key.get(_session_key(initiator_name, isid, target_name))

    def exists(self, tsih: int) -> bool:
        return tsih in self._by_tsih

    def get(self, tsih: int) -> SessionRecord | None:
        return self._by_tsih.get(tsih)

    def allocate_tsih(self) -> int:
        """A TSIH that is nonzero and unused by any live session (§11.12.6)."""
        for _ in range(0xFFFF):
            tsih = self._next
            self._next = self._next % 0xFFFF + 1
            if tsih not in self._by_tsih:
                return tsih
        raise SessionTableFull("all 65535 TSIHs are in use")

    def add(
        self,
        tsih: int,
        initiator_name: str,
        isid: bytes,
        target_name: str | None,
        *,
        cid: int | None = None,
        max_connections: int = 1,
    ) -> None:
        """Register a session; it replaces any older session of the same I_T nexus in
        :meth:`find` (session reinstatement, §6.3.5)."""
        record = SessionRecord(tsih, initiator_name, bytes(isid), target_name, max_connections)
        if cid is not None:
            record.cids.add(cid)
        self._by_tsih[tsih] = record
        self._by_key[_session_key(initiator_name, isid, target_name)] = tsih

    def remove(self, tsih: int) -> None:
        record = self._by_tsih.pop(tsih, None)
        if record is None:
            return
        key = _session_key(record.initiator_name, record.isid, record.target_name)
        if self._by_key.get(key) == tsih:
            del self._by_key[key]

    def attach(self, tsih: int, cid: int) -> None:
        self._by_tsih[tsih].cids.add(cid)

    def detach(self, tsih: int, cid: int) -> None:
        record = self._by_tsih.get(tsih)
        if record is not None:
            record.cids.discard(cid)


# ---------------------------------------------------------------------------------------
# Failed-login throttle
# ---------------------------------------------------------------------------------------


class LoginThrottle:
    """Rate limit of failed authentications per initiator name.

    After ``max_failures`` authentication failures (02/01) of one initiator name
    within ``window`` seconds, every login of that name fails with 02/01 for
    ``backoff`` seconds, before any CHAP exchange, so secrets cannot be guessed at
    line rate (RFC 7143 §12.1.3 asks for secrets that resist off-line guessing; this
    slows on-line guessing). Pure: the server injects ``clock`` (monotonic seconds).
    At most ``max_names`` names are tracked (initiator names are the attacker's
    choice); the oldest entries are forgotten first.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        max_failures: int = 5,
        window: float = 60.0,
        backoff: float = 60.0,
        max_names: int = 4096,
    ) -> None:
        self.clock = clock
        self.max_failures = max_failures
        self.window = window
        self.backoff = backoff
        self.max_names = max_names
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._blocked_until: dict[str, float] = {}

    def blocked(self, initiator_name: str) -> bool:
        key = initiator_name.lower()
        until = self._blocked_until.get(key)
        if until is None:
            return False
        if self.clock() < until:
            return True
        del self._blocked_until[key]
        return False

    def failed(self, initiator_name: str) -> None:
        key = initiator_name.lower()
        now = self.clock()
        times = self._failures.pop(key, None) or deque()
        times.append(now)
        while times and times[0] <= now - self.window:
            times.popleft()
        self._failures[key] = times
        if len(times) >= self.max_failures:
            self._blocked_until[key] = now + self.backoff
            times.clear()
        while len(self._failures) > self.max_names:
            self._failures.popitem(last=False)
        if len(self._blocked_until) > self.max_names:
            oldest = min(self._blocked_until, key=self._blocked_until.__getitem__)
            del self._blocked_until[oldest]

    def succeeded(self, initiator_name: str) -> None:
        self._failures.pop(initiator_name.lower(), None)


# ---------------------------------------------------------------------------------------
# The stage table
# ---------------------------------------------------------------------------------------


class Stage(Enum):
    START = "start"  # no request seen yet
    SECURITY = "security"  # CSG 0, SecurityNegotiation
    SECURITY_SENDING = "security, sending C=1 pieces"
    OPERATIONAL = "operational"  # CSG 1, LoginOperationalNegotiation
    OPERATIONAL_SENDING = "operational, sending C=1 pieces"
    FULL_FEATURE = "full feature"  # final response sent (T=1, NSG=3): done
    FAILED = "failed"  # a failure response was produced: close


class Kind(Enum):
    """A Login Request classified by its CSG, T, C and NSG fields (§11.12.1-11.12.3)."""

    SEC = "CSG=0"
    SEC_PARTIAL = "CSG=0 C=1"
    SEC_TO_OP = "CSG=0 T=1 NSG=1"
    SEC_TO_FFP = "CSG=0 T=1 NSG=3"
    OP = "CSG=1"
    OP_PARTIAL = "CSG=1 C=1"
    OP_TO_FFP = "CSG=1 T=1 NSG=3"
    INVALID = "invalid CSG/NSG/T/C"


class Action(Enum):
    NEGOTIATE = "answer the request's keys"
    GATHER = "keep text that continues in the next request, answer empty"
    SEND_MORE = "send the next piece of a long response"


@dataclass(frozen=True)
class Transition:
    """Run ``action`` in stage ``stay``; if the target agrees to the requested transit
    (§6.3: the target may answer T=0 when it needs more), move to ``transit``."""

    action: Action
    stay: Stage
    transit: Stage | None = None


_S, _SS, _O, _OS, _F = (
    Stage.SECURITY,
    Stage.SECURITY_SENDING,
    Stage.OPERATIONAL,
    Stage.OPERATIONAL_SENDING,
    Stage.FULL_FEATURE,
)
_NEG, _GATHER, _MORE = Action.NEGOTIATE, Action.GATHER, Action.SEND_MORE

_SECURITY_ROWS: dict[Kind, Transition] = {
    Kind.SEC: Transition(_NEG, _S),
    Kind.SEC_PARTIAL: Transition(_GATHER, _S),
    Kind.SEC_TO_OP: Transition(_NEG, _S, _O),
    Kind.SEC_TO_FFP: Transition(_NEG, _S, _F),
}
_OPERATIONAL_ROWS: dict[Kind, Transition] = {
    Kind.OP: Transition(_NEG, _O),
    Kind.OP_PARTIAL: Transition(_GATHER, _O),
    Kind.OP_TO_FFP: Transition(_NEG, _O, _F),
}

#: Every legal (stage, kind) pair. Missing pairs (going back to security, a CSG that
#: differs from the current stage, C=1 or data while we send C=1 pieces, anything after
#: the end) are initiator errors, 02/00.
TRANSITIONS: dict[tuple[Stage, Kind], Transition] = {
    **{(Stage.START, kind): row for kind, row in _SECURITY_ROWS.items()},
    **{(Stage.START, kind): row for kind, row in _OPERATIONAL_ROWS.items()},
    **{(Stage.SECURITY, kind): row for kind, row in _SECURITY_ROWS.items()},
    **{(Stage.OPERATIONAL, kind): row for kind, row in _OPERATIONAL_ROWS.items()},
    (Stage.SECURITY_SENDING, Kind.SEC): Transition(_MORE, _SS),
    (Stage.SECURITY_SENDING, Kind.SEC_TO_OP): Transition(_MORE, _SS),
    (Stage.SECURITY_SENDING, Kind.SEC_TO_FFP): Transition(_MORE, _SS),
    (Stage.OPERATIONAL_SENDING, Kind.OP): Transition(_MORE, _OS),
    (Stage.OPERATIONAL_SENDING, Kind.OP_TO_FFP): Transition(_MORE, _OS),
}

_SENDING = {_S: _SS, _O: _OS}
_CSG = {_S: 0, _SS: 0, _O: 1, _OS: 1}
_NSG = {_O: 1, _F: 3}


def classify(req: LoginRequest) -> Kind:
    """The request's kind from CSG, T, C and NSG (§11.12.1-11.12.3)."""
    if req.transit and req.cont:
        return Kind.INVALID  # §11.12.2: "If the C bit is 1, ... the T bit MUST be 0"
    table = {
        0: (Kind.SEC, Kind.SEC_PARTIAL, {1: Kind.SEC_TO_OP, 3: Kind.SEC_TO_FFP}),
        1: (Kind.OP, Kind.OP_PARTIAL, {3: Kind.OP_TO_FFP}),
    }
    if req.csg not in table:
        return Kind.INVALID  # 2 is reserved, 3 (FullFeaturePhase) is never a CSG in login
    stay, partial, transits = table[req.csg]
    if req.cont:
        return partial
    if not req.transit:
        return stay
    return transits.get(req.nsg, Kind.INVALID)


# ---------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoginResult:
    """What the server needs once the connection is in full feature phase."""

    params: SessionParams
    target: TargetEntry | None  # None for a discovery session
    isid: bytes
    tsih: int
    cid: int
    reinstated_tsih: int | None  # an older session of this I_T nexus: close it (§6.3.5)
    exp_cmdsn: int  # next CmdSN expected (= the login CmdSN, §4.2.2.1)
    statsn: int  # StatSN of the first full-feature response (§11.13.4)
    max_cmdsn: int = 0  # what the final login response advertised
    reinstated_cid: int | None = None  # same CID in a live session: connection reinstatement
    leading: bool = True  # False: this connection joined session ``tsih``; its
    # session-wide params are the session's, not ``params`` (§6.3: LO keys Irrelevant)


class LoginMachine:
    """The login phase of one connection, target side (RFC 7143 §6.3)."""

    def __init__(
        self,
        *,
        directory: TargetDirectory,
        sessions: SessionTable,
        portal: Portal,
        random_bytes: RandomBytes,
        prefs: TargetPreferences | None = None,
        source: str | None = None,
        throttle: LoginThrottle | None = None,
    ) -> None:
        self.directory = directory
        self.sessions = sessions
        self.portal = portal
        self.random_bytes = random_bytes
        self.prefs = prefs or TargetPreferences()
        self.source = source  # the initiator's IP address, for ACL source rules
        self.throttle = throttle
        self._throttled = False
        self.stage = Stage.START
        self.result: LoginResult | None = None
        self.failure_reason: str | None = None  # for the server's log
        self.negotiator = Negotiator(self.prefs)
        # fixed by the first request (§11.12: the same in every request of the login)
        self._first: LoginRequest | None = None
        self._statsn = 0
        # identity, settled by the first complete request
        self._identified = False
        self._target: TargetEntry | None = None
        self._initiator_name = ""
        self._chap_secrets: tuple[ChapSecret | None, ChapSecret | None] = (None, None)
        self._authenticated = False
        self._chap: TargetChap | None = None
        self._reinstated_tsih: int | None = None
        self._reinstated_cid: int | None = None
        # text in flight both ways
        self._gathered = b""
        self._outgoing = b""
        self._outgoing_transit: Stage | None = None
        self._after_sending = Stage.SECURITY

    @property
    def done(self) -> bool:
        """Full feature phase reached: the final response (T=1, NSG=3) was produced."""
        return self.stage is Stage.FULL_FEATURE

    @property
    def failed(self) -> bool:
        """A failure response was produced: send it, then close the connection."""
        return self.stage is Stage.FAILED

    # -- entry point -------------------------------------------------------------------
    def receive(self, req: LoginRequest) -> LoginResponse:
        """Answer one Login Request; never raises for anything the initiator sends."""
        try:
            return self._receive(req)
        except LoginFailure as failure:
            return self._fail(req, failure.status, str(failure))
        except Exception as exc:  # a directory or internal fault: 03/00, target error
            return self._fail(req, LoginStatus.TARGET_ERROR, f"{type(exc).__name__}: {exc}")

    def _receive(self, req: LoginRequest) -> LoginResponse:
        if self.stage in (Stage.FULL_FEATURE, Stage.FAILED):
            raise LoginFailure(LoginStatus.INITIATOR_ERROR, f"login request in {self.stage}")
        if req.version_min > VERSION or req.version_max < req.version_min:
            # §11.12.4: we only speak version 0x00
            raise LoginFailure(LoginStatus.UNSUPPORTED_VERSION, "unsupported version range")
        if self._first is None:
            self._first = req
            self._statsn = req.expstatsn
        elif (req.isid, req.tsih, req.cid) != (self._first.isid, self._first.tsih, self._first.cid):
            raise LoginFailure(LoginStatus.INITIATOR_ERROR, "ISID/TSIH/CID changed during login")
        kind = classify(req)
        transition = TRANSITIONS.get((self.stage, kind))
        if transition is None:
            raise LoginFailure(LoginStatus.INITIATOR_ERROR, f"{kind.value} in stage {self.stage}")
        return _ACTIONS[transition.action](self, req, transition)

    # -- actions -----------------------------------------------------------------------
    def _gather(self, req: LoginRequest, transition: Transition) -> LoginResponse:
        """§6.5: a request with C=1 gets an empty response (T=0) until the text is whole."""
        self._gathered += bytes(req.data)
        if len(self._gathered) > MAX_LOGIN_TEXT:
            raise LoginFailure(LoginStatus.INITIATOR_ERROR, "login text too long")
        self.stage = transition.stay
        return self._response(req)

    def _negotiate(self, req: LoginRequest, transition: Transition) -> LoginResponse:
        self.stage = transition.stay
        text, self._gathered = self._gathered + bytes(req.data), b""
        try:
            pairs = parse_text(text)
        except TextFormatError as exc:
            raise LoginFailure(LoginStatus.INITIATOR_ERROR, f"bad login text: {exc}") from exc
        answers: list[tuple[str, str]] = []
        if not self._identified:
            self._identify(dict(pairs), req)
            answers += self._first_declarations()
        chap_pairs = {k: v for k, v in pairs if k.startswith("CHAP_")}
        others = [(k, v) for k, v in pairs if not k.startswith("CHAP_")]
        security = transition.stay is Stage.SECURITY
        if not security:
            if chap_pairs or any(k == "AuthMethod" for k, _ in others):
                raise LoginFailure(LoginStatus.INITIATOR_ERROR, "security keys outside security")
            if not self._authenticated:  # skipping SecurityNegotiation (§6.3)
                raise LoginFailure(LoginStatus.AUTHENTICATION_FAILURE, "authentication required")
        try:
            answers += self.negotiator.negotiate(others)
        except NegotiationError as exc:
            raise LoginFailure(exc.status, str(exc)) from exc
        if security:
            answers += self._security(dict(answers), chap_pairs)
        agreed = transition.transit is not None and self._may_leave_security(
            security, bool(chap_pairs)
        )
        if not security:
            # Only in operational-stage responses: open-iscsi fails a login whose
            # security-stage response carries any key but TargetAlias, TargetAddress,
            # TargetPortalGroupTag and auth keys (usr/login.c get_security_text_keys).
            # After a direct SecurityNegotiation -> FullFeaturePhase transit nothing is
            # declared and both sides use the default 8192 (§13.12).
            answers += self.negotiator.operational_declarations()
        self._outgoing = encode_text(answers)
        self._outgoing_transit = transition.transit if agreed else None
        self._after_sending = transition.transit if agreed else transition.stay
        return self._send_piece(req, transition.stay)

    def _send_more(self, req: LoginRequest, transition: Transition) -> LoginResponse:
        """The acknowledgement of a C=1 piece must be empty (§6.5)."""
        if req.data:
            raise LoginFailure(LoginStatus.INITIATOR_ERROR, "data while we send C=1 pieces")
        return self._send_piece(
            req, Stage.SECURITY if transition.stay is _SS else Stage.OPERATIONAL
        )

    def _send_piece(self, req: LoginRequest, stage: Stage) -> LoginResponse:
        piece, self._outgoing = self._outgoing[:LOGIN_MAX_DATA], self._outgoing[LOGIN_MAX_DATA:]
        if self._outgoing:  # §11.13.2: C=1 forces T=0
            self.stage = _SENDING[stage]
            return self._response(req, data=piece, cont=True, csg=_CSG[stage])
        transit = self._outgoing_transit
        tsih = None
        if transit is Stage.FULL_FEATURE:
            tsih = self._finish(req)
            if self.throttle is not None:
                self.throttle.succeeded(self._initiator_name)
        response = self._response(
            req,
            data=piece,
            csg=_CSG[stage],
            transit=transit is not None,
            nsg=_NSG[transit] if transit else 0,
            tsih=tsih,
        )
        self.stage = self._after_sending
        if transit is Stage.FULL_FEATURE:
            assert self.result is not None
            self.result = replace(self.result, statsn=self._statsn)
        return response

    # -- pieces of negotiation -------------------------------------------------------
    def _identify(self, keys: dict[str, str], req: LoginRequest) -> None:
        """The first complete request (§6.3.1): who, which session type, which target."""
        self._identified = True
        raw_name = keys.get("InitiatorName")
        if not raw_name:
            raise LoginFailure(LoginStatus.MISSING_PARAMETER, "no InitiatorName")
        if len(raw_name.encode()) > MAX_ISCSI_NAME_LEN:
            raise LoginFailure(LoginStatus.INITIATOR_ERROR, "InitiatorName too long")
        try:
            # §4.2.7.2: one normal form for ACLs, sessions, reservations and logs; a
            # string with spaces or excluded characters names no node (names.py)
            name = normalize_name(raw_name)
        except IscsiNameError as exc:
            raise LoginFailure(
                LoginStatus.INITIATOR_ERROR, f"InitiatorName {raw_name!r} {exc}"
            ) from exc
        self._initiator_name = name
        if self.throttle is not None and self.throttle.blocked(name):
            self._throttled = True
            raise LoginFailure(LoginStatus.AUTHENTICATION_FAILURE, "too many failed logins")
        session_type = keys.get("SessionType", "Normal")
        if session_type == "Normal":
            target_name = keys.get("TargetName")
            if not target_name:
                raise LoginFailure(LoginStatus.MISSING_PARAMETER, "no TargetName")
            target = self.directory.lookup(target_name)
            if target is None:
                raise LoginFailure(LoginStatus.NOT_FOUND, f"no target {target_name}")
            grant = target.grant(name, self.source)
            if grant is None:  # no ACL of the target matches: 02/02 (§11.13.5)
                raise LoginFailure(LoginStatus.AUTHORIZATION_FAILURE, f"{name} not allowed")
            self._target = target
            self._chap_secrets = (grant.chap, grant.mutual_chap)
        elif session_type == "Discovery":
            self._chap_secrets = self.directory.discovery_chap()
        else:
            raise LoginFailure(LoginStatus.SESSION_TYPE_NOT_SUPPORTED, session_type)
        target_key = self._target.name if self._target else None
        if req.tsih:
            self._join_session(req, target_key)
        else:
            self._reinstated_tsih = self.sessions.find(name, req.isid, target_key)
        required = self._chap_secrets[0] is not None
        self._authenticated = not required
        self.negotiator.auth_methods = ("CHAP",) if required else ("None",)

    def _join_session(self, req: LoginRequest, target_name: str | None) -> None:
        """TSIH != 0: a connection for a live session (§6.3.1, §6.3.4)."""
        record = self.sessions.get(req.tsih)
        if record is None or (
            _session_key(record.initiator_name, record.isid, record.target_name)
            != _session_key(self._initiator_name, req.isid, target_name)
        ):
            raise LoginFailure(LoginStatus.SESSION_DOES_NOT_EXIST, f"no session {req.tsih}")
        if req.cid in record.cids:
            self._reinstated_cid = req.cid  # connection reinstatement (§6.3.4)
        elif len(record.cids) >= record.max_connections:
            raise LoginFailure(LoginStatus.TOO_MANY_CONNECTIONS, "MaxConnections reached")
        self.negotiator.leading = False

    def _first_declarations(self) -> list[tuple[str, str]]:
        """§13.9: TargetPortalGroupTag in the first response of a Normal session, with
        our TargetAlias (§13.6) when one is configured."""
        if self._target is None:
            return []
        out = [self.negotiator.declare("TargetPortalGroupTag", str(self.portal.tpgt))]
        if self._target.alias:
            out.append(self.negotiator.declare("TargetAlias", self._target.alias))
        return out

    def _security(
        self, answers: dict[str, str], chap_pairs: dict[str, str]
    ) -> list[tuple[str, str]]:
        """AuthMethod outcome and the CHAP exchange (§12.1)."""
        method = answers.get("AuthMethod")
        if method == "Reject":  # nothing acceptable was offered
            raise LoginFailure(LoginStatus.AUTHENTICATION_FAILURE, "no acceptable AuthMethod")
        if method == "CHAP":
            secret, mutual = self._chap_secrets
            assert secret is not None
            self._chap = TargetChap(
                secret, mutual, self.random_bytes, self.prefs.chap_challenge_length
            )
        if not chap_pairs:
            return []
        if self._chap is None:
            raise LoginFailure(LoginStatus.INITIATOR_ERROR, "CHAP keys without AuthMethod=CHAP")
        try:
            out = self._chap.receive(chap_pairs)
        except ChapError as exc:
            raise LoginFailure(LoginStatus.AUTHENTICATION_FAILURE, str(exc)) from exc
        self._authenticated = self._chap.done
        return out

    def _may_leave_security(self, security: bool, chap_now: bool) -> bool:
        """Agree to a transit? Out of security only once authenticated; while CHAP is
        under way we answer T=0 (§6.3: the target may need more). A CHAP_A=Reject
        answer goes out with T=0 too; whatever follows it fails (§12.1.3)."""
        if not security or self._authenticated:
            return True
        if self._chap is None or (self._chap.stage is ChapStage.REJECTED and not chap_now):
            raise LoginFailure(LoginStatus.AUTHENTICATION_FAILURE, "authentication required")
        return False

    def _finish(self, req: LoginRequest) -> int:
        """The final response goes out: register the session or the connection."""
        # the session knows the initiator by its normal form only (§4.2.7.2)
        params = replace(self.negotiator.session_params(), initiator_name=self._initiator_name)
        target_name = self._target.name if self._target else None
        leading = self.negotiator.leading
        if leading:
            try:
                tsih = self.sessions.allocate_tsih()
            except SessionTableFull as exc:
                raise LoginFailure(LoginStatus.OUT_OF_RESOURCES, str(exc)) from exc
            self.sessions.add(
                tsih,
                self._initiator_name,
                req.isid,
                target_name,
                cid=req.cid,
                max_connections=params.max_connections,
            )
        else:
            tsih = req.tsih
            self.sessions.attach(tsih, req.cid)
        assert self._first is not None
        self.result = LoginResult(
            params=params,
            target=self._target,
            isid=bytes(req.isid),
            tsih=tsih,
            cid=req.cid,
            reinstated_tsih=self._reinstated_tsih,
            exp_cmdsn=self._first.cmdsn,
            statsn=0,  # set once the final response has taken its StatSN
            max_cmdsn=self._max_cmdsn(),
            reinstated_cid=self._reinstated_cid,
            leading=leading,
        )
        return tsih

    # -- responses ---------------------------------------------------------------------
    def _max_cmdsn(self) -> int:
        assert self._first is not None
        return sn_add(self._first.cmdsn, self.prefs.cmdsn_window - 1)

    def _response(
        self,
        req: LoginRequest,
        *,
        data: bytes = b"",
        cont: bool = False,
        transit: bool = False,
        csg: int | None = None,
        nsg: int = 0,
        tsih: int | None = None,
        status: int = LoginStatus.SUCCESS,
    ) -> LoginResponse:
        """One Login Response (§11.13); each one takes the next StatSN (§11.13.4)."""
        first = self._first or req
        statsn = self._statsn
        self._statsn = sn_add(statsn, 1)
        return LoginResponse(
            itt=req.itt,
            transit=transit,
            cont=cont,
            csg=req.csg & 3 if csg is None else csg,
            nsg=nsg,
            version_max=VERSION,
            version_active=VERSION,
            isid=bytes(first.isid),
            tsih=first.tsih if tsih is None else tsih,
            statsn=statsn,
            expcmdsn=first.cmdsn,
            maxcmdsn=sn_add(first.cmdsn, self.prefs.cmdsn_window - 1),
            status_class=status >> 8,
            status_detail=status & 0xFF,
            data=data,
        )

    def _fail(self, req: LoginRequest, status: int, reason: str) -> LoginResponse:
        """A login reject (§11.13.5): T=0, no text; the server closes after sending it."""
        self.stage = Stage.FAILED
        self.failure_reason = reason
        self.result = None
        if (
            status == LoginStatus.AUTHENTICATION_FAILURE
            and self.throttle is not None
            and self._initiator_name
            and not self._throttled
        ):
            self.throttle.failed(self._initiator_name)
        if self._first is None:
            self._first = req
            self._statsn = req.expstatsn
        return self._response(req, status=status)


_ACTIONS: dict[Action, Callable[[LoginMachine, LoginRequest, Transition], LoginResponse]] = {
    Action.NEGOTIATE: LoginMachine._negotiate,
    Action.GATHER: LoginMachine._gather,
    Action.SEND_MORE: LoginMachine._send_more,
}
