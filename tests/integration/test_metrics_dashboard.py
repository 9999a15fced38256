"""The Grafana dashboard (``conf/grafana-dashboard.json``) queries metric names that
``serve --metrics`` reports, once a session did I/O (histograms show their
``_bucket`` series only once observed)."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from iscsi_vmtarget.client.initiator import Initiator
from iscsi_vmtarget.server.vm_luns import DEFAULT_BASE_IQN
from tests.conftest import INITIATOR, grant_vms, start_target
from tests.integration.test_snapshot_serve import _read

DASHBOARD = Path(__file__).resolve().parents[2] / "conf" / "grafana-dashboard.json"


def _queried_names() -> set[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in doc["templating"]["list"] if "definition" in v]
    return {n for e in exprs for n in re.findall(r"\biscsi_vmtarget_\w+", e)}


@pytest.mark.slow
def test_dashboard_queries_exist_in_metrics(tmp_path: Path) -> None:
    state = tmp_path / "state"
    grant_vms(state, INITIATOR)
    target = start_target(tmp_path, "--state-dir", str(state), "--metrics", "127.0.0.1:0")
    try:
        ini = Initiator(
            port=target.port, initiator_name=INITIATOR, target_name=f"{DEFAULT_BASE_IQN}:vm.demo"
        )
        ini.login()
        ini.command(bytes(6))
        _read(ini, 0)
        write = bytes([0x2A, 0]) + (0).to_bytes(4, "big") + b"\x00\x00\x01\x00"
        assert ini.command(write, data_out=bytes(512)).status == 0
        with urllib.request.urlopen(target.metrics, timeout=10) as rsp:
            text = rsp.read().decode()
        ini.logout()
        ini.close()
    finally:
        target.stop()
    families = list(text_string_to_metric_families(text))
    reported = {s.name for f in families for s in f.samples}
    queried = _queried_names()
    assert len(queried) >= 10
    assert queried <= reported, sorted(queried - reported)
    # the p99-per-VM panels group by the vm label: it must be there, with the VM's name
    vms = {
        s.labels["vm"]
        for f in families
        for s in f.samples
        if s.name == "iscsi_vmtarget_lun_latency_seconds_bucket"
    }
    assert "demo" in vms
