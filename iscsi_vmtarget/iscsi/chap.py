"""CHAP for iSCSI (RFC 1994 as profiled by RFC 7143 §12.1.3), both sides, pure.

The exchange, as RFC 7143 §12.1.3 lays it out (I = identifier, C = challenge,
R = response, N = name; the target's steps are :class:`TargetChap` stages):

1. initiator: ``CHAP_A=<A1,A2,...>``
2. target: ``CHAP_A=<A>, CHAP_I=<I>, CHAP_C=<C>`` (or ``CHAP_A=Reject``)
3. initiator: ``CHAP_N=<N>, CHAP_R=<R>`` and, for mutual CHAP, ``CHAP_I, CHAP_C``
4. target (mutual only): ``CHAP_N=<N>, CHAP_R=<R>``

R = MD5(I || secret || C) (RFC 1994 §4.1). Randomness is injected as
``random_bytes(n)``; nothing here reads a clock or ``os.urandom``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum

from ..errors import IscsiVmtargetError
from .directory import ChapSecret
from .text import TextFormatError, encode_hex, parse_binary, parse_list, parse_number

RandomBytes = Callable[[int], bytes]

CHAP_MD5 = 5  # RFC 7143 §12.1.3 / IANA PPP authentication algorithms: 5 = MD5

#: Supported CHAP algorithms: id -> (digest function, digest length).
ALGORITHMS: dict[int, tuple[Callable[[bytes], bytes], int]] = {
    CHAP_MD5: (lambda data: hashlib.md5(data).digest(), 16),
}

MAX_BINARY_LEN = 1024  # §12.1.3: C and R "MUST NOT exceed 1024 bytes"
MIN_CHALLENGE_LEN = 16  # our floor for challenges we accept (RFC 1994 §2.3: unpredictable)


class ChapError(IscsiVmtargetError):
    """CHAP failed: the login answers status 02/01, authentication failure (§11.13.5)."""


def chap_response(
    identifier: int, secret: bytes, challenge: bytes, algorithm: int = CHAP_MD5
) -> bytes:
    """RFC 1994 §4.1: the hash of Identifier (one octet) || secret || Challenge."""
    digest, _length = ALGORITHMS[algorithm]
    return digest(bytes((identifier,)) + secret + challenge)


def _binary(pairs: Mapping[str, str], key: str) -> bytes:
    try:
        value = parse_binary(pairs[key])
    except TextFormatError as exc:
        raise ChapError(f"{key}: {exc}") from exc
    if not value or len(value) > MAX_BINARY_LEN:
        raise ChapError(f"{key} of {len(value)} bytes (1..{MAX_BINARY_LEN})")
    return value


def _identifier(pairs: Mapping[str, str]) -> int:
    try:
        identifier = parse_number(pairs["CHAP_I"])
    except TextFormatError as exc:
        raise ChapError(f"CHAP_I: {exc}") from exc
    if identifier > 255:
        raise ChapError("CHAP_I is one octet (RFC 1994 §4.1)")
    return identifier


def _expect(pairs: Mapping[str, str], required: frozenset[str], optional: frozenset[str]) -> None:
    missing = required - pairs.keys()
    extra = pairs.keys() - required - optional
    if missing or extra:
        raise ChapError(f"CHAP keys: missing {sorted(missing)}, unexpected {sorted(extra)}")


class ChapStage(Enum):
    WAIT_ALGORITHM = "wait CHAP_A"
    WAIT_RESPONSE = "wait CHAP_N/CHAP_R"
    DONE = "done"
    REJECTED = "rejected"  # we answered CHAP_A=Reject: nothing can follow


_MUTUAL = frozenset({"CHAP_I", "CHAP_C"})
_RESPONSE = frozenset({"CHAP_N", "CHAP_R"})


@dataclass(frozen=True)
class _Step:
    """One row of the target's CHAP table: keys it needs, keys it allows, handler."""

    required: frozenset[str]
    optional: frozenset[str]
    handler: Callable[[TargetChap, Mapping[str, str]], list[tuple[str, str]]]


class TargetChap:
    """The target side of one CHAP exchange (RFC 7143 §12.1.3).

    ``secret`` is what the initiator must prove; ``mutual`` is the target's own
    name/secret, used only when the initiator asks for mutual authentication.
    :meth:`receive` takes the CHAP_* keys of one login request and returns the keys to
    answer with, or raises :class:`ChapError`.
    """

    def __init__(
        self,
        secret: ChapSecret,
        mutual: ChapSecret | None,
        random_bytes: RandomBytes,
        challenge_length: int = MIN_CHALLENGE_LEN,
    ) -> None:
        self.secret = secret
        self.mutual = mutual
        self.random_bytes = random_bytes
        self.challenge_length = max(challenge_length, MIN_CHALLENGE_LEN)
        self.stage = ChapStage.WAIT_ALGORITHM
        self.algorithm = CHAP_MD5
        self.identifier = 0
        self.challenge = b""

    @property
    def done(self) -> bool:
        return self.stage is ChapStage.DONE

    def receive(self, pairs: Mapping[str, str]) -> list[tuple[str, str]]:
        step = _TARGET_STEPS.get(self.stage)
        if step is None:
            raise ChapError(f"CHAP keys after the exchange ({self.stage.value})")
        _expect(pairs, step.required, step.optional)
        try:
            return step.handler(self, pairs)
        except ChapError:
            self.stage = ChapStage.REJECTED
            raise

    def _select_algorithm(self, pairs: Mapping[str, str]) -> list[tuple[str, str]]:
        """Step 2: the first offered algorithm we support, an identifier and a challenge."""
        try:
            offered = parse_list(pairs["CHAP_A"])
        except TextFormatError as exc:
            raise ChapError(f"CHAP_A: {exc}") from exc
        for item in offered:
            try:
                algorithm = parse_number(item)
            except TextFormatError:
                continue
            if algorithm in ALGORITHMS:
                break
        else:
            # §12.1.3: "If the target cannot accept any of the proposed algorithms, it
            # answers: CHAP_A=Reject"; no exchange can follow.
            self.stage = ChapStage.REJECTED
            return [("CHAP_A", "Reject")]
        self.algorithm = algorithm
        self.identifier = self.random_bytes(1)[0]
        self.challenge = self.random_bytes(self.challenge_length)
        self.stage = ChapStage.WAIT_RESPONSE
        return [
            ("CHAP_A", str(algorithm)),
            ("CHAP_I", str(self.identifier)),
            ("CHAP_C", encode_hex(self.challenge)),
        ]

    def _verify(self, pairs: Mapping[str, str]) -> list[tuple[str, str]]:
        """Step 3 checked, step 4 answered (mutual CHAP)."""
        if pairs["CHAP_N"] != self.secret.user:
            raise ChapError("CHAP_N does not name the configured user")
        received = _binary(pairs, "CHAP_R")
        if self.mutual is not None:
            ours = chap_response(
                self.identifier, self.mutual.secret, self.challenge, self.algorithm
            )
            if hmac.compare_digest(received, ours):
                # §12.1.3: a response equal to the one we would have generated ourselves
                # MUST be treated as an authentication failure. This also refuses a
                # mutual secret configured equal to the initiator's (§12.1.3: a secret
                # MUST NOT serve both directions).
                raise ChapError("CHAP_R made with the target's own secret")
        expected = chap_response(
            self.identifier, self.secret.secret, self.challenge, self.algorithm
        )
        if not hmac.compare_digest(received, expected):
            raise ChapError("CHAP_R does not match")
        wants_mutual = _MUTUAL & pairs.keys()
        if not wants_mutual:
            self.stage = ChapStage.DONE
            return []
        if wants_mutual != _MUTUAL:
            raise ChapError("mutual CHAP needs both CHAP_I and CHAP_C")
        if self.mutual is None:
            raise ChapError("mutual CHAP requested but no target secret is configured")
        identifier = _identifier(pairs)
        challenge = _binary(pairs, "CHAP_C")
        if challenge == self.challenge:
            # §12.1.3: an originator MUST NOT reuse the responder's challenge; responders
            # MUST check for it (reflection attack).
            raise ChapError("initiator reflected our CHAP_C")
        response = chap_response(identifier, self.mutual.secret, challenge, self.algorithm)
        self.stage = ChapStage.DONE
        return [("CHAP_N", self.mutual.user), ("CHAP_R", encode_hex(response))]


#: The target's CHAP state machine: stage -> the step it accepts next.
_TARGET_STEPS: dict[ChapStage, _Step] = {
    ChapStage.WAIT_ALGORITHM: _Step(
        frozenset({"CHAP_A"}), frozenset(), TargetChap._select_algorithm
    ),
    ChapStage.WAIT_RESPONSE: _Step(_RESPONSE, _MUTUAL, TargetChap._verify),
}


class InitiatorChap:
    """The initiator side (for our own client code and tests).

    ``target`` is the name/secret the target must prove for mutual CHAP (None: one-way).
    """

    def __init__(
        self,
        secret: ChapSecret,
        target: ChapSecret | None = None,
        random_bytes: RandomBytes | None = None,
        challenge_length: int = MIN_CHALLENGE_LEN,
    ) -> None:
        if target is not None and random_bytes is None:
            raise ValueError("mutual CHAP needs random_bytes for the challenge")
        self.secret = secret
        self.target = target
        self.random_bytes = random_bytes
        self.challenge_length = challenge_length
        self.algorithm = CHAP_MD5
        self.identifier = 0
        self.challenge = b""
        self.target_challenge = b""

    def offer(self) -> list[tuple[str, str]]:
        """Step 1."""
        return [("CHAP_A", ",".join(str(a) for a in ALGORITHMS))]

    def respond(self, pairs: Mapping[str, str]) -> list[tuple[str, str]]:
        """Step 3, from the target's step 2 keys."""
        _expect(pairs, frozenset({"CHAP_A", "CHAP_I", "CHAP_C"}), frozenset())
        try:
            algorithm = parse_number(pairs["CHAP_A"])
        except TextFormatError as exc:
            raise ChapError(f"target CHAP_A: {pairs['CHAP_A']!r}") from exc
        if algorithm not in ALGORITHMS:
            raise ChapError(f"target chose unsupported CHAP_A={algorithm}")
        self.algorithm = algorithm
        identifier = _identifier(pairs)
        self.target_challenge = _binary(pairs, "CHAP_C")
        response = chap_response(identifier, self.secret.secret, self.target_challenge, algorithm)
        out = [("CHAP_N", self.secret.user), ("CHAP_R", encode_hex(response))]
        if self.target is not None:
            assert self.random_bytes is not None
            self.identifier = self.random_bytes(1)[0]
            self.challenge = self.random_bytes(self.challenge_length)
            if self.challenge == self.target_challenge:
                raise ChapError("refusing to reuse the target's challenge (§12.1.3)")
            out += [("CHAP_I", str(self.identifier)), ("CHAP_C", encode_hex(self.challenge))]
        return out

    def verify(self, pairs: Mapping[str, str]) -> None:
        """Step 4: check the target's answer to our challenge (mutual CHAP)."""
        if self.target is None:
            if pairs:
                raise ChapError("unexpected CHAP keys from the target")
            return
        _expect(pairs, _RESPONSE, frozenset())
        if pairs["CHAP_N"] != self.target.user:
            raise ChapError("target CHAP_N does not match")
        expected = chap_response(
            self.identifier, self.target.secret, self.challenge, self.algorithm
        )
        if not hmac.compare_digest(_binary(pairs, "CHAP_R"), expected):
            raise ChapError("target CHAP_R does not match")
