"""Every metric a Grafana panel (or variable) queries is one the exporter actually exposes.

Checked against live expositions: a hard-routed Ray job, a hard-routed job with early exits and a
soft-routed (CondConv) job without Ray, and an exporter fed by a real CondConv network, over HTTP.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from condmoe.cluster.metrics import MetricsExporter

pytestmark = [pytest.mark.slow]

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy/grafana/condmoe-dashboard.json"
METRIC = re.compile(r"\bcondmoe_[a-z0-9_]+")


def _names(text: str) -> set[str]:
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_every_dashboard_metric_is_exposed(scraped_job, local_job, soft_local_job, soft_updates):
    exporter = MetricsExporter("softjob", "127.0.0.1", 0)
    try:
        exporter.start()
        for u in soft_updates[0]:
            exporter.update(u)
        with urllib.request.urlopen(exporter.url, timeout=10) as r:
            soft = r.read().decode()
    finally:
        exporter.stop()
    names = set().union(*(_names(t) for t in (scraped_job["exposition"], local_job["exposition"],
                                               soft_local_job["exposition"], soft)))
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    queried = {m for e in exprs for m in METRIC.findall(e)}
    variables = dashboard["templating"]["list"]
    queried |= {m for v in variables if v["type"] == "query" for m in METRIC.findall(json.dumps(v["query"]))}
    missing = sorted(queried - names)
    assert not missing, f"the dashboard queries metrics no exporter exposes: {missing}"
    assert len(queried) >= 15
    assert {"datasource", "job", "layer"} <= {v["name"] for v in variables}
    # every panel reads the datasource variable, and filters on the job variable
    for p in dashboard["panels"]:
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}"
            assert '$job' in t["expr"], t["expr"]
