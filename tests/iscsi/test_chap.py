"""CHAP (RFC 1994, RFC 7143 §12.1.3): MD5 vectors, both sides, refusals."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iscsi_vmtarget.iscsi.chap import (
    CHAP_MD5,
    ChapError,
    ChapStage,
    InitiatorChap,
    TargetChap,
    chap_response,
)
from iscsi_vmtarget.iscsi.directory import ChapSecret
from iscsi_vmtarget.iscsi.text import encode_base64, encode_hex, parse_binary

USER = ChapSecret("alice", b"initiator-secret-16")
TARGET = ChapSecret("iqn.2024-01.org.example:t", b"target-secret-1234")


def counter_random(start: int = 0) -> Callable[[int], bytes]:
    counter = itertools.count(start)
    return lambda n: bytes(next(counter) % 256 for _ in range(n))


# RFC 1321 §A.5 test suite: MD5(id || secret || challenge) is MD5 of the concatenation, so
# splitting each message into (first octet, middle, rest) must give the published digest.
@pytest.mark.parametrize(
    ("message", "digest"),
    [
        (b"abc", "900150983cd24fb0d6963f7d28e17f72"),
        (b"message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
        (b"abcdefghijklmnopqrstuvwxyz", "c3fcd3d76192e4007dfb496cca67e13b"),
        (
            b"12345678901234567890123456789012345678901234567890123456789012345678901234567890",
            "57edf4a22be3c955ac49da2e2107b67a",
        ),
    ],
)
def test_md5_vectors(message: bytes, digest: str) -> None:
    identifier, secret, challenge = message[0], message[1:5], message[5:]
    assert chap_response(identifier, secret, challenge, CHAP_MD5).hex() == digest


def test_md5_vector_from_md5sum() -> None:
    # printf '\x07secret\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f\x10' | md5sum
    challenge = bytes(range(1, 17))
    assert chap_response(7, b"secret", challenge).hex() == "9202454b727fb7e4d68ee20d80d9a59b"


def exchange(
    target: TargetChap, initiator: InitiatorChap
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    challenge = target.receive(dict(initiator.offer()))
    reply = initiator.respond(dict(challenge))
    final = target.receive(dict(reply))
    initiator.verify(dict(final))
    return challenge, final


def test_one_way() -> None:
    target = TargetChap(USER, None, counter_random(), 16)
    challenge, final = exchange(target, InitiatorChap(USER))
    expected_c = encode_hex(bytes(range(1, 17)))
    assert challenge == [("CHAP_A", "5"), ("CHAP_I", "0"), ("CHAP_C", expected_c)]
    assert final == [] and target.done


def test_mutual() -> None:
    target = TargetChap(USER, TARGET, counter_random(), 16)
    initiator = InitiatorChap(USER, TARGET, counter_random(100))
    _, final = exchange(target, initiator)
    assert [k for k, _ in final] == ["CHAP_N", "CHAP_R"]
    assert dict(final)["CHAP_N"] == TARGET.user
    assert target.done


def test_challenge_length_has_a_floor() -> None:
    target = TargetChap(USER, None, counter_random(), 4)
    challenge = dict(target.receive({"CHAP_A": "5"}))
    assert len(parse_binary(challenge["CHAP_C"])) == 16


def test_algorithm_choice_and_reject() -> None:
    target = TargetChap(USER, None, counter_random())
    assert target.receive({"CHAP_A": "7,6,5"})[0] == ("CHAP_A", "5")
    target = TargetChap(USER, None, counter_random())
    assert target.receive({"CHAP_A": "7,x"}) == [("CHAP_A", "Reject")]
    assert target.stage is ChapStage.REJECTED
    with pytest.raises(ChapError):
        target.receive({"CHAP_N": "alice", "CHAP_R": "0x00"})


def _challenged(mutual: ChapSecret | None = None) -> tuple[TargetChap, dict[str, str]]:
    target = TargetChap(USER, mutual, counter_random())
    return target, dict(target.receive({"CHAP_A": "5"}))


def _response(challenge: dict[str, str], secret: bytes = USER.secret) -> bytes:
    return chap_response(int(challenge["CHAP_I"]), secret, parse_binary(challenge["CHAP_C"]))


@given(st.booleans())
def test_base64_and_hex_responses_both_accepted(b64: bool) -> None:
    target, challenge = _challenged()
    raw = _response(challenge)
    encoded = encode_base64(raw) if b64 else encode_hex(raw).upper().replace("0X", "0x")
    assert target.receive({"CHAP_N": USER.user, "CHAP_R": encoded}) == []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c, r: {"CHAP_N": "mallory", "CHAP_R": encode_hex(r)},
        lambda c, r: {"CHAP_N": USER.user, "CHAP_R": encode_hex(bytes(16))},
        lambda c, r: {"CHAP_N": USER.user, "CHAP_R": "junk"},
        lambda c, r: {"CHAP_N": USER.user, "CHAP_R": encode_hex(r[:8])},
        lambda c, r: {"CHAP_N": USER.user},
        lambda c, r: {"CHAP_N": USER.user, "CHAP_R": encode_hex(r), "CHAP_X": "1"},
        lambda c, r: {"CHAP_N": USER.user, "CHAP_R": encode_hex(r), "CHAP_I": "1"},
    ],
)
def test_bad_responses_fail(mutate: Callable[[dict[str, str], bytes], dict[str, str]]) -> None:
    target, challenge = _challenged(TARGET)
    with pytest.raises(ChapError):
        target.receive(mutate(challenge, _response(challenge)))
    assert not target.done


def test_wrong_secret_fails() -> None:
    target, challenge = _challenged()
    with pytest.raises(ChapError):
        target.receive({"CHAP_N": USER.user, "CHAP_R": encode_hex(_response(challenge, b"x"))})


def test_reflected_challenge_refused() -> None:
    target, challenge = _challenged(TARGET)
    reply = {
        "CHAP_N": USER.user,
        "CHAP_R": encode_hex(_response(challenge)),
        "CHAP_I": "9",
        "CHAP_C": challenge["CHAP_C"],  # our own challenge sent back
    }
    with pytest.raises(ChapError, match="reflected"):
        target.receive(reply)


def test_response_made_with_the_targets_own_secret_refused() -> None:
    target, challenge = _challenged(TARGET)
    raw = _response(challenge, TARGET.secret)
    with pytest.raises(ChapError):
        target.receive({"CHAP_N": USER.user, "CHAP_R": encode_hex(raw)})


def test_mutual_secret_equal_to_initiator_secret_refused() -> None:
    same = ChapSecret("target", USER.secret)
    target, challenge = _challenged(same)
    initiator = InitiatorChap(USER, same, counter_random(50))
    # refused either as "the target's own secret" (§12.1.3) or as equal secrets
    with pytest.raises(ChapError):
        target.receive(dict(initiator.respond(challenge)))


def test_mutual_requested_without_target_secret() -> None:
    target, challenge = _challenged(None)
    initiator = InitiatorChap(USER, TARGET, counter_random(50))
    with pytest.raises(ChapError, match="no target secret"):
        target.receive(dict(initiator.respond(challenge)))


@pytest.mark.parametrize(("ident", "chal"), [("256", "0x01"), ("1", "0x"), ("x", "0x01")])
def test_bad_mutual_challenge(ident: str, chal: str) -> None:
    target, challenge = _challenged(TARGET)
    reply = {"CHAP_N": USER.user, "CHAP_R": encode_hex(_response(challenge))}
    with pytest.raises(ChapError):
        target.receive({**reply, "CHAP_I": ident, "CHAP_C": chal})


def test_initiator_side_checks_the_target() -> None:
    target = TargetChap(USER, ChapSecret(TARGET.user, b"another-secret-xx"), counter_random())
    initiator = InitiatorChap(USER, TARGET, counter_random(50))
    reply = initiator.respond(dict(target.receive(dict(initiator.offer()))))
    with pytest.raises(ChapError):
        initiator.verify(dict(target.receive(dict(reply))))


def test_initiator_refuses_to_reuse_target_challenge() -> None:
    initiator = InitiatorChap(USER, TARGET, counter_random(1))  # yields 01..10 = the challenge
    with pytest.raises(ChapError):
        initiator.respond({"CHAP_A": "5", "CHAP_I": "0", "CHAP_C": encode_hex(bytes(range(2, 18)))})


def test_keys_after_done_fail() -> None:
    target = TargetChap(USER, None, counter_random())
    exchange(target, InitiatorChap(USER))
    with pytest.raises(ChapError):
        target.receive({"CHAP_A": "5"})
