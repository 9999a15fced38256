"""A short fuzzing campaign against the real target (``tools/fuzz-campaign`` runs it for
as long as asked): mutated login, Text/SendTargets and full-feature PDUs, with and
without digests, beside a session verifying its own writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from iscsi_vmtarget.testing.fuzz_campaign import mutate, run_campaign

pytest.importorskip("scapy")


def test_mutations_keep_a_pdu_framed_mostly() -> None:
    import random

    rng = random.Random(1)
    raw = bytes(48) + b"SendTargets=All\0"
    honest = sum(
        int.from_bytes(m[5:8], "big") == len(m) - 48 - m[4] * 4
        for m in (mutate(raw, rng) for _ in range(500))
    )
    assert 400 <= honest < 500  # mostly past the framing, sometimes lengths that lie


@pytest.mark.slow
def test_a_short_campaign_leaves_the_target_and_the_good_session_whole(tmp_path: Path) -> None:
    seconds = float(os.environ.get("ISCSI_FUZZ_SECONDS", "8"))
    stats = run_campaign(tmp_path, seconds, fuzzers=2, seed=5)
    assert stats.ok, stats.summary()
    assert stats.pdus > 1000 and all(stats.connections.values()), stats.summary()
    assert stats.digests > 0 and stats.good_ops > 10, stats.summary()
